"""Chunked prefill: how long running requests stall while a long prompt is prefilled, with and without chunks.

Chapter 05's scheduler runs each step as one forward pass that holds a token for every running request
and at most ``--chunked-prefill-size`` prompt tokens of the requests being prefilled. Without chunking
(``0``) a new prompt goes in whole, in one step, and every running request waits for that step: its next
token comes after the whole prefill. With chunks, the prompt goes in over several steps, each about as
long as a chunk, and the running requests get a token after each of them.

What it measures, in one run on one machine, for each ``--chunked-prefill-sizes`` (256 and 0 by default),
each with its own chapter 05 server (the top-level package, ``--context-length`` 2600):

1. ``--streams`` (8) streamed requests with short prompts start and decode (``temperature: 0``,
   ``ignore_eos``, many tokens; the script cancels them when it is done with them);
2. once every one of them has streamed a few tokens, and ``--baseline`` (1) seconds later, one request with
   a prompt of about ``--long-tokens`` (2000) tokens is sent (``max_tokens`` 4);
3. the inter-token gaps of the running streams during its prefill, from the moment it was sent to its
   first token (every gap that overlaps that interval), give ITL p50, p99 and max; the gaps of the
   baseline second before it give the ITL of the same streams without a prefill beside them.

That is repeated ``--repeats`` (3) times per setting, each time with new streams and a long prompt of
different text (so that the radix cache cannot serve it from an earlier repeat), after one warm-up
repeat that is not measured. The long prompt's time to first token is reported too: chunking lets the
running requests go on, at some cost to the newcomer.

The target: a lower ITL p99 during the prefill with chunking than without.

Run it from the repository root:

    python benchmarks/chunked_prefill.py [--chunked-prefill-sizes 256 0] [--streams 8] [--long-tokens 2000]

The result goes to ``benchmarks/results/chunked_prefill.md`` (``--output`` to change) and ``.json``
beside it; ``plot_results.render`` then draws the chapter 05 plot.
"""

import argparse
import asyncio
import itertools
import os
import time

from benchkit import record, serving
from tqdm import tqdm

TITLE = "Chunked prefill: inter-token latency of running requests while a long prompt is prefilled"
FIRST_TOKENS = 4  # a stream counts as decoding once it has streamed this many pieces


def long_prompt(tokenizer, tokens: int, repeat: int) -> list[dict]:
    """A user message of about ``tokens`` tokens (templated), different text for every ``repeat``."""
    head = f"Report number {repeat + 1}: read these notes about the town carefully.\n\n"
    body = serving.notes(tokenizer, tokens - 40, start=repeat * 3)
    message = [{"role": "user", "content": f"{head}{body}\n\nWhat is the main idea of these notes?"}]
    return message


def stream_prompt(repeat: int, i: int) -> list[dict]:
    return [{"role": "user", "content": f"Story {repeat}-{i}: {serving.question(i)} Tell it at length."}]


async def one_repeat(url: str, model: str, tokenizer, args, repeat: int) -> dict:
    """Streams decoding, then the long prompt: the streams' gaps during its prefill, and just before it."""
    async with serving.http_client(args.streams) as client:
        watched = [serving.RequestResult(sent=0.0) for _ in range(args.streams)]  # filled in as the pieces arrive
        tasks = [
            asyncio.create_task(
                serving.send_one(client, url, model, stream_prompt(repeat, i), args.stream_tokens, watched[i])
            )
            for i in range(args.streams)
        ]
        try:
            while any(len(w.chunk_times) < FIRST_TOKENS for w in watched):  # until every stream decodes
                if failed := [t for t in tasks if t.done()]:
                    await failed[0]  # raises what went wrong, or:
                    raise RuntimeError("a stream ended before the long prompt: raise --stream-tokens")
                await asyncio.sleep(0.05)
            await asyncio.sleep(args.baseline)
            sent = time.perf_counter()
            long = await serving.send_one(client, url, model, long_prompt(tokenizer, args.long_tokens, repeat), 4)
            first = long.chunk_times[0]
            await asyncio.sleep(args.after)
            if any(t.done() for t in tasks):
                tqdm.write("warning: a stream ended during the measurement: raise --stream-tokens")
        finally:
            await serving.cancel_all(tasks)
        # Until the server has dropped the cancelled streams, so that the next repeat starts on its own.
        for _ in range(100):
            if (await client.get(url + "/state")).json()["running"] == 0:
                break
            await asyncio.sleep(0.2)
    gaps = [(a, b) for w in watched for a, b in itertools.pairwise(w.chunk_times)]
    return {
        "during": [b - a for a, b in gaps if b > sent and a < first],  # overlapping the long prompt's prefill
        "before": [b - a for a, b in gaps if sent - args.baseline <= b <= sent],  # ending in the baseline
        # Each gap at its end, relative to when the long prompt was sent: the plot's timeline.
        "timeline": sorted(
            (round(b - sent, 3), round((b - a) * 1000, 1)) for a, b in gaps if sent - args.baseline <= b <= first + 1
        ),
        "long_ttft": first - sent,
        "long_prompt_tokens": long.prompt_tokens,
        "long_cached_tokens": long.cached_tokens,
    }


COLUMNS = {
    "chunked prefill size": None, "gaps": None, "ITL p50 ms": 0, "ITL p99 ms": 0, "ITL max ms": 0,
    "ITL before p50 ms": 0, "long TTFT s": 2, "load at start": 2,
}


def measure(size: int, args, tokenizer) -> dict:
    """One server with ``--chunked-prefill-size size``: a warm-up repeat, then ``--repeats`` measured ones."""
    with serving.start_server("top", args, ("--chunked-prefill-size", str(size))) as server:
        model = serving.served_model(server, f"chunked prefill {size}")
        load = os.getloadavg()[0]
        runs = []
        for repeat in tqdm(range(args.repeats + 1), desc=f"chunked prefill {size}", unit="repeat"):
            # Repeat 0 warms up (first long prefill of the process); its text is its own, like every repeat's.
            outcome = asyncio.run(one_repeat(server.url, model, tokenizer, args, repeat))
            if repeat:
                runs.append(outcome)
    during = [g for r in runs for g in r["during"]]
    before = [g for r in runs for g in r["before"]]
    ttft = [r["long_ttft"] for r in runs]
    values = [
        size, len(during), serving.percentile(during, 50) * 1000, serving.percentile(during, 99) * 1000,
        max(during, default=float("nan")) * 1000,
        serving.percentile(before, 50) * 1000, sorted(ttft)[len(ttft) // 2], load,
    ]
    return {
        **record.table_row(COLUMNS, values), "long_ttft_each_s": [round(t, 2) for t in ttft],
        "long_prompt_tokens": runs[0]["long_prompt_tokens"],
        "long_cached_tokens": [r["long_cached_tokens"] for r in runs],
        "timeline": runs[0]["timeline"], "timeline_long_ttft_s": round(runs[0]["long_ttft"], 3),
    }


def report(run: dict) -> str:
    """The markdown result, from the JSON's fields."""
    lines = record.run_lines(run) + [
        f"- server (the top-level package, chapter 05), one per setting: `{run['server']}`"
        + serving.threads_note(run["threads"]),
        (
            f"- workload: {run['streams']} streamed requests (short prompts, max_tokens {run['stream_tokens']}, "
            f"cancelled after the measurement) decoding; then one {run['long_prompt_tokens']}-token prompt (max_tokens "
            f"4); {run['repeats']} repeats after a warm-up, different text each time; temperature 0, ignore_eos"
        ),
        "",
        *record.columns_table(COLUMNS, run["rows"]),
        "",
        run["verdict"],
        "",
        "gaps: inter-token gaps of the running streams that overlap the long prompt's prefill (from sending it to",
        "its first token), over all repeats; ITL p50/p99/max are of those. ITL before: the same streams' gaps that end",
        f"in the {run['baseline_s']:g} s before the long prompt was sent. long TTFT: its time to first token, median "
        "of",
        "the repeats. Numbers move with the machine's load (last column); compare rows of one run.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunked-prefill-sizes", type=int, nargs="+", default=[256, 0],
                        help="server settings to compare (0: no chunking)")
    parser.add_argument("--streams", type=int, default=8, help="requests decoding when the long prompt arrives")
    parser.add_argument("--stream-tokens", type=int, default=2000,
                        help="max_tokens of the streams: enough to outlast the measurement (they are cancelled)")
    parser.add_argument("--long-tokens", type=int, default=2000, help="about how long the long prompt is")
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats per setting (after one warm-up)")
    parser.add_argument("--baseline", type=float, default=1.0, help="seconds of plain decoding before the prompt")
    parser.add_argument("--after", type=float, default=0.5, help="seconds of decoding kept after its first token")
    serving.add_server_options(parser, max_running_requests=0, context_length=2600, output="chunked_prefill.md")
    args = parser.parse_args()
    args.max_running_requests = args.max_running_requests or args.streams + 1
    serving.stop_on_sigterm()

    model_path, tokenizer = serving.model_and_tokenizer(args)
    long_len = len(serving.chat_prompt_ids(tokenizer, long_prompt(tokenizer, args.long_tokens, 0)))
    if long_len + 4 > args.context_length or args.stream_tokens + 60 > args.context_length:
        parser.error(f"--context-length {args.context_length} is too short for the prompts and --stream-tokens")

    start = record.start_run("minisgl")
    rows = [measure(size, args, tokenizer) for size in args.chunked_prefill_sizes]
    long_len = rows[0]["long_prompt_tokens"] or long_len  # as the server counted it (each repeat's text differs)

    chunked = [r for r in rows if r["chunked_prefill_size"]]
    whole = next((r for r in rows if not r["chunked_prefill_size"]), None)
    verdict = ""
    if chunked and whole:
        best = min(chunked, key=lambda r: r["itl_p99_ms"])
        met = best["itl_p99_ms"] < whole["itl_p99_ms"]
        verdict = (
            f"**During the prefill of a {long_len}-token prompt, chunks of {best['chunked_prefill_size']} keep the "
            f"running requests' ITL p99 at {best['itl_p99_ms']} ms against {whole['itl_p99_ms']} ms without chunking "
            f"({whole['itl_p99_ms'] / best['itl_p99_ms']:.1f}x lower; target: lower): "
            f"{'target met' if met else 'target NOT met'}**"
        )
    run = record.run_info("chunked_prefill", TITLE, start, model_path
    )
    run.update({
        "server": serving.server_command(args, "--chunked-prefill-size", "N"), "dtype": args.dtype,
        "threads": args.threads or None, "streams": args.streams, "stream_tokens": args.stream_tokens,
        "long_prompt_tokens": long_len, "repeats": args.repeats, "baseline_s": args.baseline, "rows": rows,
        "verdict": verdict,
    })
    record.write_result(args.output, report(run), run)


if __name__ == "__main__":
    main()
