"""One layer's decode attention on a CPU, eager against compiled (chapter 06's ``--enable-torch-compile``).

The torch backend attends for a batch of decodes of different lengths with ``paged_decode_attention``:
gather every request's keys and values into a padded rectangle, then ``scaled_dot_product_attention`` with
a mask. ``--enable-torch-compile`` runs ``decode_attention_formula`` through ``torch.compile`` instead (the
backend's ``compiled_decode_attention``), where the gather is fused into the loops that read the keys. This
times both on the default model's shapes (9 query heads on 3 KV heads of 64) in bfloat16, for ``--requests``
of lengths drawn between ``--shortest`` and ``--longest`` (seeded), and the gather alone: what the eager
path pays before any arithmetic.

Both are checked against each other before timing. In each of ``--repeats`` rounds every variant of every
batch runs once, in a shuffled order, so that noise from the machine hits all alike; the table shows the
median in milliseconds. The first compiled call of a run compiles (a few seconds); it is left out.

    python benchmarks/decode_attention.py [--requests 1 8 32] [--repeats 50]
"""

import argparse
import random
from pathlib import Path

from benchkit import record
from benchkit.timing import shuffled_medians

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 9, 3, 64, 16  # SmolLM2-135M's attention, the server's page size


def workload(requests: int, shortest: int, longest: int, seed: int) -> dict:
    """A bfloat16 cache whose pages are handed out in a scrambled order, one query per request."""
    import torch

    from minisgl.attention.paged import SPARE_PAGE, padded_locations

    rng = random.Random(seed)
    lengths = [rng.randint(shortest, longest) for _ in range(requests)] if requests > 1 else [longest]
    needed = [-(-length // PAGE_SIZE) for length in lengths]
    num_pages = 1 + sum(needed) * 5 // 4  # the spare page, the requests' pages and a quarter more
    free = [page for page in range(num_pages) if page != SPARE_PAGE]
    rng.shuffle(free)  # a pool after churn: a request's pages lie anywhere
    rows = []
    for n in needed:
        rows.append(free[:n])
        free = free[n:]
    generator = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(num_pages * PAGE_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
                        .to(torch.bfloat16) for _ in range(2))
    q = torch.randn(requests, HEADS, HEAD_DIM, generator=generator).to(torch.bfloat16)
    # One request: one length, the backend's unmasked path (seq_lens None), which is what it runs then.
    seq_lens = torch.tensor(lengths) if requests > 1 else None
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "locations": padded_locations(rows, lengths, PAGE_SIZE),
            "seq_lens": seq_lens, "lengths": lengths}


def variants(w: dict, compiled) -> dict:
    from minisgl.attention.paged import paged_decode_attention

    args = (w["q"], w["k_cache"], w["v_cache"], w["locations"], w["seq_lens"], HEAD_DIM**-0.5)
    flat = w["locations"].flatten()
    calls = {
        "gather alone": lambda: (w["k_cache"].index_select(0, flat), w["v_cache"].index_select(0, flat)),
        "eager (gather + SDPA)": lambda: paged_decode_attention(*args),
    }
    if w["seq_lens"] is not None:  # the backend compiles only batches of mixed lengths
        calls["compiled formula"] = lambda: compiled(*args)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--shortest", type=int, default=320, help="fewest cached tokens of a request")
    parser.add_argument("--longest", type=int, default=800, help="most cached tokens of a request")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=record.RESULTS / "decode_attention.md")
    args = parser.parse_args()
    start = record.start_run("minisgl", busy_threshold=0.5)

    import torch

    from minisgl.attention.torch_backend import compiled_decode_attention
    from minisgl.default_model import default_model_path

    compiled, rng, rows = compiled_decode_attention(), random.Random(args.seed), []
    for requests in args.requests:
        w = workload(requests, args.shortest, args.longest, args.seed)
        calls = variants(w, compiled)
        if "compiled formula" in calls:
            gap = float((calls["compiled formula"]().float() - calls["eager (gather + SDPA)"]().float()).abs().max())
            if gap > 3e-2:  # bfloat16 outputs: a few units of their last place
                raise SystemExit(f"{requests} requests: compiled and eager differ by {gap:.2g}")
        ms = shuffled_medians(calls, args.repeats, rng)
        lengths = w["lengths"]
        rows.append({"requests": requests, "tokens": sum(lengths), "longest": max(lengths),
                     "threads": torch.get_num_threads(), **{key: round(value, 3) for key, value in ms.items()}})

    result = {**record.run_info("decode_attention", "One layer's decode attention, eager against compiled", start,
                                default_model_path(), packages=("torch",)), "repeats": args.repeats,
              "shortest": args.shortest, "longest": args.longest, "rows": rows}
    from plot_results import decode_attention_table  # here: it imports matplotlib

    lines = [*record.opening_lines(result),
             f"- {record.versions_text(result['versions'])}; commit {result['commit']}",
             f"- {HEADS} query heads on {KV_HEADS} KV heads of {HEAD_DIM}, bfloat16, pages of {PAGE_SIZE}; lengths "
             f"{args.shortest}..{args.longest} (seed {args.seed}); {torch.get_num_threads()} threads; median ms of "
             f"{args.repeats} rounds",
             f"- command: `{result['command']}`", "",
             *decode_attention_table(rows, digits=3)]
    record.write_result(args.output, "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    main()
