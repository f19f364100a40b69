"""How to lay out a paged KV cache: token-major against heads-major, measured on decode attention.

What it measures (chapter 05): one layer's decode attention over a paged cache, plain PyTorch on the CPU,
for two ways of storing a layer's keys (and values) in memory:

- **token-major** ``[num_pages * page_size, kv_heads, head_dim]``: a token's heads side by side, a
  location is a row (what ``minisgl/attention/paged.py`` uses);
- **heads-major** ``[kv_heads, num_pages * page_size, head_dim]``: each head's tokens side by side, a
  location is a column of rows, one per head.

The workload: ``--requests`` (32) requests of about ``--tokens`` (400, +-10%, seeded) cached tokens each,
``--heads`` / ``--kv-heads`` (9 / 3, SmolLM2's) of ``--head-dim`` (64), one new query token each. The pool
holds a quarter more pages than the requests fill, plus the spare page 0, and hands them out in
scrambled order, as a pool does after requests have come and gone. Every request's locations come from
``minisgl.attention.paged.padded_locations``, padded to the longest request with the spare page.

For each dtype and page size, each layout is timed

- gathering the requests' keys and values into a padded [requests, kv_heads, T, d] rectangle, with
  ``index_select`` and with indexing by a tensor (``cache[locations]``), alone;
- the whole decode attention: that gather, then ``scaled_dot_product_attention`` with the padding mask;
- the ``index_select`` gather then attention written out (matmul, mask, softmax, matmul), as chapter 02
  wrote it, to show what SDPA is worth.

All variants compute the same thing, and are checked against ``paged_decode_attention`` before timing.
In each of ``--repeats`` (100) rounds every variant of every dtype and page size runs once, in a shuffled
order, so that noise from the machine hits all alike; the table shows the median in milliseconds, after two
warm-up calls each.

Run it from the repository root:

    python benchmarks/kv_layout.py [--page-sizes 1 16] [--dtypes float32 bfloat16] [--repeats 100]

The table is printed and written to ``benchmarks/results/kv_layout.md`` (``--output`` to change).
"""

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit.record import REPO_ROOT, RESULTS, command_line, cpu_model, git_commit, warn_if_busy, write_result
from benchkit.timing import shuffled_medians
from tqdm import tqdm

sys.path.insert(0, str(REPO_ROOT))  # the top-level minisgl: chapter 05's, the one with pages
from minisgl.attention.paged import SPARE_PAGE, padded_locations, paged_decode_attention

LAYOUTS = ("token-major", "heads-major")
COLUMNS = [
    "dtype", "page size", "layout", "gather, index_select", "index_select + SDPA", "gather, cache[loc]",
    "cache[loc] + SDPA", "index_select + written-out attention",
]


# ---------------------------------------------------------------- the workload


def workload(args, page_size: int, dtype: torch.dtype, seed: int) -> dict:
    """Queries, a token-major cache, the same cache heads-major, and where each request's tokens are."""
    rng = random.Random(seed)
    lengths = [rng.randint(args.tokens * 9 // 10, args.tokens * 11 // 10) for _ in range(args.requests)]
    needed = [-(-length // page_size) for length in lengths]  # pages per request, rounded up
    num_pages = 1 + sum(needed) * 5 // 4  # the spare page, the requests' pages and a quarter more
    free = [page for page in range(num_pages) if page != SPARE_PAGE]
    rng.shuffle(free)  # a pool after churn: consecutive positions rarely sit in consecutive pages
    rows = []
    for n in needed:
        rows.append(free[:n])
        free = free[n:]
    generator = torch.Generator().manual_seed(seed)
    shape = (num_pages * page_size, args.kv_heads, args.head_dim)
    k_tokens = torch.randn(shape, generator=generator).to(dtype)
    v_tokens = torch.randn(shape, generator=generator).to(dtype)
    return {
        "q": torch.randn(args.requests, args.heads, args.head_dim, generator=generator).to(dtype),
        "token-major": (k_tokens, v_tokens),
        "heads-major": (k_tokens.transpose(0, 1).contiguous(), v_tokens.transpose(0, 1).contiguous()),
        "locations": padded_locations(rows, lengths, page_size),
        "seq_lens": torch.tensor(lengths),
        "scale": args.head_dim**-0.5,
    }


# ---------------------------------------------------------------- gathers: cache -> [requests, kv_heads, T, d]


def gather_token_major(cache, locations, use_index_select: bool):
    requests, width = locations.shape
    if use_index_select:
        rows = cache.index_select(0, locations.flatten()).view(requests, width, *cache.shape[1:])
    else:
        rows = cache[locations]  # [requests, T, kv_heads, d]
    return rows.transpose(1, 2)


def gather_heads_major(cache, locations, use_index_select: bool):
    requests, width = locations.shape
    if use_index_select:
        rows = cache.index_select(1, locations.flatten()).view(cache.shape[0], requests, width, cache.shape[2])
    else:
        rows = cache[:, locations]  # [kv_heads, requests, T, d]
    return rows.transpose(0, 1)


GATHERS = {"token-major": gather_token_major, "heads-major": gather_heads_major}


# ---------------------------------------------------------------- attention over the gathered rectangle


def sdpa(q, keys, values, seq_lens, scale):
    requests, heads, d = q.shape
    q = q.view(requests, keys.shape[1], -1, d)  # query head h reads KV head h // group
    visible = torch.arange(keys.shape[2])[None, :] < seq_lens[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :], scale=scale)


def written_out(q, keys, values, seq_lens, scale):
    requests, heads, d = q.shape
    q = q.view(requests, keys.shape[1], -1, d)
    scores = (q @ keys.transpose(2, 3)).float() * scale  # [requests, kv_heads, group, T]
    padding = torch.arange(keys.shape[2])[None, :] >= seq_lens[:, None]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).to(values.dtype) @ values


def variants(w: dict) -> dict:
    """(layout, what) -> a call that does it; every one of them runs on the same workload."""
    q, locations, seq_lens, scale = w["q"], w["locations"], w["seq_lens"], w["scale"]
    calls = {}
    for layout in LAYOUTS:
        (k_cache, v_cache), gather = w[layout], GATHERS[layout]

        def kv(use_index_select, k_cache=k_cache, v_cache=v_cache, gather=gather):
            return gather(k_cache, locations, use_index_select), gather(v_cache, locations, use_index_select)

        calls[layout, "gather, index_select"] = lambda kv=kv: kv(True)
        calls[layout, "index_select + SDPA"] = lambda kv=kv: sdpa(q, *kv(True), seq_lens, scale)
        calls[layout, "gather, cache[loc]"] = lambda kv=kv: kv(False)
        calls[layout, "cache[loc] + SDPA"] = lambda kv=kv: sdpa(q, *kv(False), seq_lens, scale)
        calls[layout, "index_select + written-out attention"] = lambda kv=kv: written_out(q, *kv(True), seq_lens, scale)
    return calls


def check(w: dict, calls: dict, dtype: torch.dtype) -> None:
    """Every variant that attends must give what minisgl's paged_decode_attention gives."""
    expected = paged_decode_attention(w["q"], *w["token-major"], w["locations"], w["seq_lens"], w["scale"])
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for (layout, what), call in calls.items():
        if "gather" not in what:
            got = call().reshape(expected.shape)
            gap = float((got.float() - expected.float()).abs().max())
            if gap > tolerance:
                raise SystemExit(f"{layout}, {what}: differs from paged_decode_attention by {gap:.2g}")


def measure(calls: dict, repeats: int, rng: random.Random, bar: tqdm) -> dict:
    """Median ms of each call, every dtype, page size, layout and variant in one shuffle (``shuffled_medians``)."""
    return shuffled_medians(calls, repeats, rng, after_round=lambda: bar.update(1))


# ---------------------------------------------------------------- the report


def verdict(rows: list[dict]) -> list[str]:
    """Which layout is faster for the whole decode attention (index_select + SDPA), config by config; within
    5% counts as level, which is less than the run-to-run noise on a shared machine."""
    lines, ratios = [], []
    for dtype, page_size in dict.fromkeys((row["dtype"], row["page size"]) for row in rows):
        ms = {row["layout"]: row["index_select + SDPA"] for row in rows
              if (row["dtype"], row["page size"]) == (dtype, page_size)}
        ratio = ms["heads-major"] / ms["token-major"]
        ratios.append(ratio)
        faster = "level (within 5%)" if abs(ratio - 1) < 0.05 else f"{min(ms, key=ms.get)} is faster"
        lines.append(f"- {dtype}, page size {page_size}: heads-major / token-major = {ratio:.2f}, {faster}")
    mean = statistics.geometric_mean(ratios)
    lines.append(f"- over all {len(ratios)}: heads-major / token-major = {mean:.2f} (geometric mean)")
    return lines


def report(args, rows: list[dict], load_before, load_after, lengths: list[int]) -> str:
    lines = [
        "# Paged KV cache layout: token-major against heads-major, one layer's decode attention",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads (of {os.cpu_count()} cores)",
        (
            f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
            f"(the run itself adds up to {torch.get_num_threads()})"
        ),
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- commit: {git_commit('minisgl', 'benchmarks/kv_layout.py')}",
        (
            f"- workload: {args.requests} requests of {min(lengths)}..{max(lengths)} cached tokens, one new query "
            f"each; {args.heads} query heads, {args.kv_heads} KV heads, head_dim {args.head_dim}; pages in "
            f"scrambled order; one layer"
        ),
        f"- median ms of {args.repeats} rounds (every variant of every row once a round, shuffled) after two warm-ups",
        f"- command: `{command_line('kv_layout')}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---:|---|" + "---:|" * (len(COLUMNS) - 3),
    ]
    for row in rows:
        cells = [str(row["dtype"]), str(row["page size"]), row["layout"]]
        lines.append("| " + " | ".join(cells + [f"{row[c]:.2f}" for c in COLUMNS[3:]]) + " |")
    lines += [
        "",
        "Which layout is faster for the whole decode attention (index_select + SDPA):",
        "",
        *verdict(rows),
        "",
        "A gather copies each request's keys and values into a padded [requests, kv_heads, T, d] rectangle;",
        "`index_select` and `cache[loc]` gather the same rows. Token-major copies one contiguous row of",
        "kv_heads x head_dim values per token; heads-major copies kv_heads rows of head_dim values per token, from",
        "places far apart. SmolLM2 runs 30 such layers per decode step.",
    ]
    return "\n".join(lines) + "\n"


def book_fragment(rows: list[dict], load_before, load_after) -> str:
    """What chapter 05's page shows (``--8<-- "benchmarks/results/kv_layout.book.md"``): the gather and the
    whole attention per layout, and their ratio."""
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()} ({os.cpu_count()} cores), load average "
        f"(1 min) {load_before[0]:.2f} before the run and {load_after[0]:.2f} after; one layer's decode attention, "
        f"median ms (`{command_line('kv_layout')}`):",
        "",
        "| dtype | page size | gather, token-major | gather, heads-major | whole attention, token-major "
        "| whole attention, heads-major | heads-major / token-major |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, page_size in dict.fromkeys((row["dtype"], row["page size"]) for row in rows):
        by_layout = {row["layout"]: row for row in rows if (row["dtype"], row["page size"]) == (dtype, page_size)}
        token, heads = by_layout["token-major"], by_layout["heads-major"]
        gather, whole = "gather, index_select", "index_select + SDPA"
        lines.append(
            f"| {dtype} | {page_size} | {token[gather]:.2f} | {heads[gather]:.2f} | {token[whole]:.2f} "
            f"| {heads[whole]:.2f} | {heads[whole] / token[whole]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=400, help="cached tokens per request, about (+-10%%)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "kv_layout.md")
    args = parser.parse_args()
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")

    load_before = os.getloadavg()  # other work on the machine skews every number; say how much there was
    warn_if_busy(load_before[0], threshold=0.5)
    calls, lengths = {}, []
    for dtype_name in args.dtypes:
        for page_size in args.page_sizes:
            w = workload(args, page_size, getattr(torch, dtype_name), args.seed)
            config = variants(w)
            check(w, config, getattr(torch, dtype_name))
            calls |= {(dtype_name, page_size, *key): call for key, call in config.items()}
            lengths = w["seq_lens"].tolist()
    bar = tqdm(total=args.repeats, desc="kv_layout", unit="round")
    ms = measure(calls, args.repeats, random.Random(args.seed), bar)
    bar.close()
    rows = []
    for dtype_name in args.dtypes:
        for page_size in args.page_sizes:
            for layout in LAYOUTS:
                row = {"dtype": dtype_name, "page size": page_size, "layout": layout}
                rows.append(row | {key[-1]: t for key, t in ms.items() if key[:3] == (dtype_name, page_size, layout)})
    load_after = os.getloadavg()
    write_result(args.output, report(args, rows, load_before, load_after, lengths))
    if args.output == RESULTS / "kv_layout.md":  # the default run is the one the book shows
        args.output.with_suffix(".book.md").write_text(book_fragment(rows, load_before, load_after))


if __name__ == "__main__":
    main()
