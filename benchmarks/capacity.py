"""Capacity: how many of the serving workload's requests fit in the KV cache at once, slots against pages.

Chapter 03 gives every running request one slot of ``--context-length`` tokens, whatever it needs, so a
KV memory budget of B tokens runs B / context_length requests at once. Chapter 05 gives a request
``ceil((prompt + max_tokens) / page_size)`` pages, what it can need at most, and admits waiting requests
while their pages are free; the same budget then holds as many requests as their real lengths allow.

What it measures, in one run on one machine:

1. **computed**: the requests of ``serve_workload.py``'s workload (the same ``--requests`` and ``--seed``:
   64 and 0), their prompts tokenized the way the server does it. Slots: ``budget // context_length``.
   Pages: the requests in order, each taking its pages, until the next one does not fit (how the
   scheduler admits: first come, first served, never skipping ahead).
2. **seen in /state** (``--observe``, both cache types by default): the chapter 05 server with exactly
   that budget (``--num-pages budget / page_size + 1``, the spare page included) and
   ``--max-running-requests`` as high as the workload, so that only pages limit it. All the requests are
   sent together (20 ms apart, so that they reach the scheduler in the workload's order), ``/state`` is
   polled, and its largest ``running`` count is the number admitted together (once nobody has been
   admitted for 10 s, several steps, while some still wait). Nobody finishes meanwhile
   (every request asks for 16 tokens or more, and the prompts are still being prefilled), so that count
   is the capacity; then the requests are cancelled. With the radix cache, a request admitted after
   another with the same beginning has had its first chunk computed needs fewer pages, so it can fit a
   few more.

The budget defaults to chapter 03's as the serving benchmark runs it: ``--slots`` (32) of
``--context-length`` (1024) tokens.

Run it from the repository root:

    python benchmarks/capacity.py [--slots 32] [--context-length 1024] [--page-size 16] [--observe naive radix]

The result goes to ``benchmarks/results/capacity.md`` (``--output`` to change) and ``.json`` beside it;
``plot_results.render`` then draws the chapter 05 plot.
"""

import argparse
import asyncio
import json
import statistics
import time

from benchkit import record, serving
from tqdm import tqdm

TITLE = "Capacity: requests of the serving workload at once in one KV memory budget, slots vs pages"


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def greedy_pages(lengths: list[int], page_size: int, usable_pages: int) -> int:
    """How many requests, in order, get their pages before the next one does not fit."""
    used = 0
    for count, length in enumerate(lengths):
        used += pages_for(length, page_size)
        if used > usable_pages:
            return count
    return len(lengths)


def kv_bytes_per_token(model_path, dtype: str) -> int:
    """Keys and values of one token, every layer: what one token of the budget costs in memory."""
    config = json.loads((model_path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * (2 if dtype == "bfloat16" else 4)


async def peak_running(url: str, model: str, workload, poll_s: float = 0.2, settle_s: float = 10.0,
                       stagger_s: float = 0.02, limit_s: float = 300) -> tuple[int, int]:
    """Send every request at once; poll /state until admission has stopped (someone waits and ``running`` has
    not changed for ``settle_s``, or nobody waits any more); cancel them. Returns (peak running, waiting then)."""
    n = len(workload.messages)
    async with serving.http_client(n) as client:
        tasks = []
        for i in range(n):  # a little apart, so that they reach the scheduler in the workload's order
            request = serving.send_one(client, url, model, workload.messages[i], workload.max_tokens[i])
            tasks.append(asyncio.create_task(request))
            await asyncio.sleep(stagger_s)
        peak, waiting, changed, start = 0, n, time.monotonic(), time.monotonic()
        try:
            while time.monotonic() - start < limit_s:
                await asyncio.sleep(poll_s)
                state = (await client.get(url + "/state")).json()
                if state["running"] > peak:
                    peak, changed = state["running"], time.monotonic()
                waiting = state["waiting"]
                arrived = state["running"] + state["waiting"] >= n
                if arrived and (waiting == 0 or time.monotonic() - changed >= settle_s):
                    break
                if any(task.done() for task in tasks):  # finished (or failed): from now on the count could grow
                    tqdm.write("warning: a request ended before admission stopped; counting up to here")
                    break
        finally:
            await serving.cancel_all(tasks)
    return peak, waiting


COLUMNS = {"KV cache": None, "how": None, "requests at once": None, "tokens held": None, "waiting then": None}


def report(run: dict, per_token: int) -> str:
    """The markdown result, from the JSON's fields and the KV cache's bytes per token."""
    work, rows = run["workload"], run["rows"]
    lines = record.run_lines(run) + [
        (
            f"- budget: {run['budget_tokens']} tokens of KV cache ({run['slots']} x {run['context_length']}; "
            f"{run['budget_mib']} MiB in {run['dtype']}, {per_token} bytes a token)"
        ),
        (
            f"- workload: `serve_workload.py`'s {work['requests']} requests (seed {work['seed']}), prompt + "
            f"max_tokens {work['tokens_min']}..{work['tokens_max']} tokens (mean {work['tokens_mean']}, "
            f"total {work['tokens_total']})"
        ),
    ]
    if any(row["how"] == "seen in /state" for row in rows):
        lines.append(f"- server, to confirm (all requests sent together, /state polled): `{run['server']}`")
    lines += [
        "",
        *record.columns_table(COLUMNS, rows, left=2),
        "",
        run["verdict"],
        "",
        "computed: slots, budget // context_length; pages, the requests in order while their pages",
        "(ceil((prompt + max_tokens) / page_size) each) fit. seen in /state: the largest running count while",
        "every request of the workload waited to be admitted. tokens held: what the admitted requests' slots or",
        "pages can hold.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests of the serving workload")
    parser.add_argument("--seed", type=int, default=0, help="the serving workload's seed")
    parser.add_argument("--slots", type=int, default=32, help="the budget: this many slots of --context-length")
    parser.add_argument("--page-size", type=int, default=16, help="chapter 05's page size")
    parser.add_argument("--observe", nargs="*", default=["naive", "radix"], choices=["naive", "radix"],
                        help="cache types to confirm with /state under load (none: only compute)")
    serving.add_server_options(parser, max_running_requests=0, context_length=1024, output="capacity.md")
    args = parser.parse_args()
    args.max_running_requests = args.max_running_requests or args.requests  # only pages may limit admission
    serving.stop_on_sigterm()

    model_path, tokenizer = serving.model_and_tokenizer(args)
    workload = serving.make_workload(tokenizer, args.requests, args.seed)
    lengths = [len(p) + m for p, m in zip(workload.prompt_ids, workload.max_tokens)]
    if max(lengths) > args.context_length:
        parser.error(f"a request needs {max(lengths)} tokens, over --context-length {args.context_length}")
    budget = args.slots * args.context_length
    usable = budget // args.page_size

    start = record.start_run("minisgl")
    slots = min(budget // args.context_length, args.requests)
    paged = greedy_pages(lengths, args.page_size, usable)
    pages_label = f"pages of {args.page_size} tokens"
    held = sum(pages_for(n, args.page_size) for n in lengths[:paged]) * args.page_size
    rows = [
        [f"slots of {args.context_length} tokens", "computed", slots, slots * args.context_length,
         args.requests - slots],
        [pages_label, "computed", paged, held, args.requests - paged],
    ]
    for cache_type in args.observe:
        extra = ("--page-size", str(args.page_size), "--num-pages", str(usable + 1), "--cache-type", cache_type)
        with serving.start_server("top", args, extra) as server:
            model = serving.served_model(server, cache_type)
            peak, waiting = asyncio.run(peak_running(server.url, model, workload))
            tqdm.write(f"{cache_type}: {peak} running at once, {waiting} waiting")
        rows.append([f"{pages_label}, {cache_type} cache", "seen in /state", peak, None, waiting])
    table = [{record.column_key(h): v for h, v in zip(COLUMNS, row)} for row in rows]

    per_token = kv_bytes_per_token(model_path, args.dtype)
    run = record.run_info("capacity", TITLE, start, model_path)
    verdict = (
        f"**In the memory of {args.slots} slots of {args.context_length} tokens, pages of {args.page_size} tokens "
        f"hold {paged} of the workload's requests at once, {paged / slots:.2f}x the {slots} slots**"
        + (f" (seen in /state: {', '.join(str(r[2]) + ' with ' + r[0].split(', ')[-1] for r in rows[2:])})."
           if rows[2:] else ".")
    )
    run.update({
        "dtype": args.dtype, "page_size": args.page_size, "slots": args.slots, "context_length": args.context_length,
        "budget_tokens": budget, "budget_mib": round(budget * per_token / 2**20),
        "server": serving.server_command(
            args, "--page-size", str(args.page_size), "--num-pages", str(usable + 1), "--cache-type", "naive|radix"
        ),
        "workload": {
            "requests": args.requests, "seed": args.seed, "tokens_min": min(lengths), "tokens_max": max(lengths),
            "tokens_mean": round(statistics.mean(lengths)), "tokens_total": sum(lengths),
        },
        "rows": table, "verdict": verdict,
    })
    record.write_result(args.output, report(run, per_token), run)


if __name__ == "__main__":
    main()
