"""Tensor parallelism's price per decode step: TP 1 against TP 3 on this machine, and the collectives on paper.

What it measures, in one run on one machine (chapter 04):

1. **Decode step time** at TP 1 and at TP 3 (``--tp``), for each of ``--batch-sizes`` (1 and 16) and each
   ``--dtype`` (bfloat16): the engine (``minisgl.engine.Engine``) prefills a batch of requests with
   ``--prompt-len`` (32) fixed pseudo-random token ids each, runs ``--warmup`` decode steps, then times
   ``--steps`` (32) decode steps, greedy, one ``Engine.step`` each, driven as the scheduler drives them.
   The table gives the median step in ms and tokens/s (batch size / median step). Each TP size runs in
   its own processes, started by the test kit's ``run_ranks`` (``tests/kit/ranks.py``): gloo over TCP
   on 127.0.0.1, each rank with ``share_of_cores(tp)`` torch threads.
2. **The collectives**: how many one decode step makes, and what each costs here. The count comes from
   the model's structure: a row-parallel layer ends with an all-reduce, and every decoder layer has two
   (attention's ``o``, the MLP's ``down``); the vocabulary-parallel embedding adds one all-reduce and the
   LM head one all-gather: ``2 * num_layers + 1`` all-reduces and 1 all-gather, computed from the
   model's config and checked against the calls counted during a real step (the script wraps
   ``torch.distributed``'s functions while it decodes). In the TP ranks it then times
   ``--collective-repeats`` (200) all-reduces of a [batch, hidden] tensor and all-gathers of the
   [batch, vocab / tp] logits, in the model's dtype, alone (median, µs), so that

       collective time per step = count x median latency,

   and its share of the TP step. It also records the time rank 0 actually spent inside collectives
   during the timed steps, which includes waiting for slower ranks.
3. **On paper**: the same step's collectives on 3 GPUs joined by NVLink and on 3 nodes joined by
   400 Gb/s InfiniBand, from the count, the bytes of each collective, and approximate per-collective
   latencies and link bandwidths (``LINKS`` below, sources named there and in the result):

       time = count x latency + sum over collectives of (bytes each rank sends / link bandwidth)

   with a ring's traffic per rank (nccl-tests' ``doc/PERFORMANCE.md``): an all-reduce of S bytes sends
   2(n-1)/n x S, an all-gather of an S-byte result (n-1)/n x S.

Why TP 3 cannot be faster here: on a 2-core machine TP 1 already uses both cores, and 3 ranks get one
thread each, 3 threads on 2 cores. Tensor parallelism adds no compute; it splits the matmuls but every
rank still repeats the norms, residual additions, rotary and sampling, and each step adds dozens of
collectives, each a round trip through the kernel's TCP stack between processes that may not even be
running. The table puts numbers on that; the paper table shows what the same communication costs where
TP pays off (GPUs whose matmuls are the bottleneck, joined by links made for it).

Run it from the repository root (``make bench`` calls it too):

    python benchmarks/tp_decode.py [--dtype bfloat16] [--batch-sizes 1 16] [--steps 32] [--tp 3]

The table is printed and written to ``benchmarks/results/tp_decode.md`` (``--output`` to change), with
the same numbers and how they were measured in ``tp_decode.json`` beside it; then
``plot_results.render`` draws chapter 04's plot and its fragment for the book from that JSON.
"""

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from benchkit import record

# Chapter 04's minisgl, frozen in chapters/04 since chapter 05 (whose engine holds pages, not slots) took
# the top level; run_ranks hands this sys.path to every rank.
CHAPTER_ROOT = record.REPO_ROOT / "chapters" / "04"
sys.path.insert(0, str(CHAPTER_ROOT))
sys.path.insert(0, str(record.REPO_ROOT / "tests" / "kit"))  # the shared test kit, for run_ranks
from minisgl.config import tensor_parallel_problem
from minisgl.core import Batch, Request, SamplingParams
from minisgl.default_model import require_default_model
from minisgl.distributed import all_gather, all_reduce, tp_info
from minisgl.engine import Engine
from minisgl.models.config import ModelConfig
from ranks import run_ranks

# ---------------------------------------------------------------- the links on paper
# Approximate figures, to show orders of magnitude; a real cluster's depend on the NCCL version, its
# protocol for small messages, the topology and the software around it. Bandwidth is one direction's.
LINKS = [
    {
        "link": "3 GPUs in one node, NVLink 4",
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): NVLink 900 GB/s per GPU, both directions
        # together, so about 450 GB/s each way.
        "bandwidth_gb_s": 450,
        # Published nccl-tests all_reduce_perf runs within one NVLink/NVSwitch node: small messages
        # (bytes to tens of KB) take on the order of 10-20 µs.
        "latency_us": (10, 20),
        "source": "NVIDIA H100 datasheet (NVLink 900 GB/s per GPU, both directions); "
        "small-message latency: order of magnitude of published nccl-tests runs within a node",
    },
    {
        "link": "3 nodes, NDR InfiniBand 400 Gb/s",
        # NVIDIA ConnectX-7 / Quantum-2 NDR: 400 Gb/s per port = 50 GB/s each way.
        "bandwidth_gb_s": 50,
        # Published nccl-tests runs across InfiniBand nodes: small messages take on the order of 20-50 µs.
        "latency_us": (20, 50),
        "source": "NVIDIA ConnectX-7 (NDR, 400 Gb/s = 50 GB/s per port); small-message latency: order "
        "of magnitude of published nccl-tests runs across nodes",
    },
]
TRAFFIC_SOURCE = (
    "ring traffic per rank as in nccl-tests doc/PERFORMANCE.md: all-reduce 2(n-1)/n x S, all-gather (n-1)/n x S"
)


# ---------------------------------------------------------------- what runs in every rank


def collective_count(config) -> dict[str, int]:
    """The collectives one forward pass makes, from the model's structure: two row-parallel layers per
    decoder layer (attention's o, the MLP's down) and the embedding end with an all-reduce; the LM head
    ends with an all-gather. The same for prefill and decode: only the tensors' sizes differ."""
    return {"all_reduce": 2 * config.num_layers + 1, "all_gather": 1}


class CollectiveLog:
    """While active, counts and times every all-reduce and all-gather the model calls.

    ``minisgl.distributed`` calls ``torch.distributed``'s functions through the module (``dist.all_reduce``),
    so replacing them there catches every call. Records (name, bytes of this rank's input, seconds).
    """

    NAMES = ("all_reduce", "all_gather")

    def __init__(self):
        self.calls: list[tuple[str, int, float]] = []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self.timed(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            tensor = args[0] if name == "all_reduce" else args[1]  # all_gather(parts, x)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.calls.append((name, tensor.nbytes, time.perf_counter() - start))
            return result

        return wrapper


def make_requests(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list:
    """Requests with fixed pseudo-random prompts (the same in every rank and at every TP size), greedy."""
    rng = random.Random(seed)
    return [
        Request(f"r{i}", [rng.randrange(vocab_size) for _ in range(prompt_len)], SamplingParams(ignore_eos=True))
        for i in range(batch_size)
    ]


def run_step(engine, requests: list, is_prefill: bool) -> None:
    """One forward pass of the batch, then what the scheduler does with its tokens."""
    tokens = engine.step(Batch(requests, is_prefill))
    for request, token in zip(requests, tokens):
        request.cached_len = request.seq_len  # everything it had is in the cache now
        request.output_ids.append(token)


def decode(engine, batch_size: int, options: dict) -> dict:
    """Prefill a batch, warm up, then time decode steps; with the collectives each step made."""
    requests = make_requests(batch_size, options["prompt_len"], engine.config.vocab_size, options["seed"])
    for slot, request in enumerate(requests):
        request.slot, request.generator = slot, engine.new_generator(0)
    run_step(engine, requests, is_prefill=True)
    for _ in range(options["warmup"]):  # the first steps pay for lazy init and allocator growth
        run_step(engine, requests, is_prefill=False)
    step_s, in_collectives_s = [], []
    with CollectiveLog() as log:
        for _ in range(options["steps"]):
            log.calls.clear()
            start = time.perf_counter()
            run_step(engine, requests, is_prefill=False)
            step_s.append(time.perf_counter() - start)
            in_collectives_s.append(sum(seconds for _, _, seconds in log.calls))
    calls = log.calls  # the last step's
    return {
        "step_ms": statistics.median(step_s) * 1000,
        "in_collectives_ms": statistics.median(in_collectives_s) * 1000,
        "counted": dict(Counter(name for name, _, _ in calls)),
        "bytes_in": {name: nbytes for name, nbytes, _ in calls},  # per call; every call of a kind is alike
        "tokens": [request.output_ids for request in requests],
    }


def median_us(fn, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def time_collectives(engine, batch_size: int, repeats: int) -> dict:
    """Median latency of the step's two collectives, alone: all-reduce of [batch, hidden], all-gather
    of this rank's [batch, vocab / tp] logits, in the model's dtype (zeros: sums stay finite)."""
    hidden = torch.zeros(batch_size, engine.config.hidden_size, dtype=engine.dtype)
    logits = torch.zeros(batch_size, engine.model.embed.rows, dtype=engine.dtype)
    return {
        "all_reduce_us": median_us(lambda: all_reduce(hidden), repeats),
        "all_gather_us": median_us(lambda: all_gather(logits, dim=-1), repeats),
    }


def rank_main(model_path: str, dtypes: list[str], batch_sizes: list[int], options: dict) -> dict:
    """In each rank (``run_ranks`` has joined the group and set the threads): every dtype and batch size."""
    context = options["prompt_len"] + options["warmup"] + options["steps"] + 1
    runs = []
    for dtype in dtypes:
        engine = Engine(model_path, dtype, "cpu", num_slots=max(batch_sizes), context_length=context)
        for batch_size in batch_sizes:
            run = {"dtype": dtype, "batch": batch_size, **decode(engine, batch_size, options)}
            if tp_info().size > 1:
                run.update(time_collectives(engine, batch_size, options["collective_repeats"]))
            runs.append(run)
        del engine
    return {"rank": tp_info().rank, "threads": torch.get_num_threads(), "runs": runs}


# ---------------------------------------------------------------- the table


# (header, JSON key, decimals: None prints the value as it is)
COLUMNS = [
    ("dtype", "dtype", None),
    ("batch", "batch", None),
    ("TP", "tp", None),
    ("threads per rank", "threads_per_rank", None),
    ("step ms (median)", "step_ms", 1),
    ("tok/s", "tok_s", 1),
    ("speed vs TP 1", "speed_vs_tp1", 2),
    ("collectives per step", "collectives_per_step", None),
    ("all-reduce µs", "all_reduce_us", 0),
    ("all-gather µs", "all_gather_us", 0),
    ("count × latency ms", "collective_ms", 1),
    ("share of step", "collective_share", 0),
    ("in collectives ms (rank 0)", "in_collectives_ms", 1),
    ("same tokens as TP 1", "same_tokens", None),
]


def table_rows(tp: int, base: dict, parallel: dict, counts: dict) -> list[dict]:
    """The table's rows, rounded as printed: per dtype and batch size, TP 1 then TP ``tp``."""
    rows = []
    per_step = sum(counts.values())
    for one, many in zip(base["runs"], parallel["runs"]):
        collective_ms = sum(counts[name] * many[f"{name}_us"] for name in counts) / 1e3
        same = sum(record.common_prefix(a, b) for a, b in zip(one["tokens"], many["tokens"]))  # over all requests
        for size, result, run in [(1, base, one), (tp, parallel, many)]:
            values = [
                run["dtype"], run["batch"], size, result["threads"], run["step_ms"],
                run["batch"] / run["step_ms"] * 1000, one["step_ms"] / run["step_ms"],
                per_step if size > 1 else 0,
                run.get("all_reduce_us"), run.get("all_gather_us"),
                collective_ms if size > 1 else None,
                100 * collective_ms / run["step_ms"] if size > 1 else None,
                run["in_collectives_ms"] if size > 1 else None,
                same if size > 1 else None,
            ]
            rows.append({key: record.rounded(v, digits) for (_, key, digits), v in zip(COLUMNS, values)})
    return rows


def cell(value, digits, header: str, tokens: int, batch: int) -> str:
    if value is None:
        return "-"
    if header == "share of step":
        return f"{value}%"
    if header == "same tokens as TP 1":
        return f"{value}/{tokens * batch}"
    return f"{value:.{digits}f}" if digits else str(value)


# ---------------------------------------------------------------- on paper


def paper_rows(config, tp: int, rows: list[dict]) -> list[dict]:
    """The TP step's communication on each link in ``LINKS``, per dtype and batch size."""
    counts = collective_count(config)
    rows_per_rank = -(-config.vocab_size // tp)  # the padded vocabulary block, as in layers/embedding.py
    out = []
    for row in (r for r in rows if r["tp"] > 1):
        size = 2 if row["dtype"] == "bfloat16" else 4
        reduce_bytes = row["batch"] * config.hidden_size * size
        gather_bytes = row["batch"] * rows_per_rank * tp * size  # the whole result every rank ends with
        ring = (tp - 1) / tp
        sent = counts["all_reduce"] * 2 * ring * reduce_bytes + counts["all_gather"] * ring * gather_bytes
        for link in LINKS:
            latency = [sum(counts.values()) * us / 1e3 for us in link["latency_us"]]
            bandwidth_us = sent / (link["bandwidth_gb_s"] * 1e9) * 1e6
            out.append({
                "link": link["link"], "dtype": row["dtype"], "batch": row["batch"],
                "all_reduces": counts["all_reduce"], "all_reduce_bytes": reduce_bytes,
                "all_gathers": counts["all_gather"], "all_gather_bytes": gather_bytes,
                "latency_us": list(link["latency_us"]), "bandwidth_gb_s": link["bandwidth_gb_s"],
                "bytes_sent": round(sent), "latency_ms": [round(x, 2) for x in latency],
                "bandwidth_us": round(bandwidth_us, 1), "total_ms": [round(x + bandwidth_us / 1e3, 2) for x in latency],
                "here_ms": row["collective_ms"],
            })
    return out


def paper_table(paper: list[dict], tp: int) -> list[str]:
    lines = [
        "| link | dtype | batch | collectives (bytes each) | latency µs each | GB/s | latency term ms "
        "| bandwidth term µs | per step ms | here (gloo, measured) ms |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in paper:
        lo, hi = p["latency_us"]
        lines.append(
            f"| {p['link']} | {p['dtype']} | {p['batch']} | "
            f"{p['all_reduces']} all-reduce ({kb(p['all_reduce_bytes'])}) + "
            f"{p['all_gathers']} all-gather ({kb(p['all_gather_bytes'])}) | {lo}-{hi} | {p['bandwidth_gb_s']} "
            f"| {span(p['latency_ms'])} | {p['bandwidth_us']:.1f} | {span(p['total_ms'])} | {p['here_ms']:.1f} |"
        )
    return lines


def kb(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f} KiB" if nbytes >= 1024 else f"{nbytes} B"


def span(pair: list[float]) -> str:
    return f"{pair[0]:.2f}-{pair[1]:.2f}"


# ---------------------------------------------------------------- the report


def why(result: dict) -> list[str]:
    """The numbers that say why TP is not faster here, one line per dtype and batch size."""
    tp, lines = result["tp"], []
    rows = result["rows"]
    for one, many in zip(rows[::2], rows[1::2]):
        lines.append(
            f"- {many['dtype']}, batch {many['batch']}: TP {tp} takes {many['step_ms']:.1f} ms a step against "
            f"{one['step_ms']:.1f} ms at TP 1 ({many['speed_vs_tp1']:.2f}x the speed). Its "
            f"{many['collectives_per_step']} collectives cost {many['collective_ms']:.1f} ms by their measured "
            f"latency ({many['collective_share']}% of the step); rank 0 spent {many['in_collectives_ms']:.1f} ms "
            "inside them, waiting for the other ranks included."
        )
    return lines


def report(result: dict) -> str:
    tp, threads = result["tp"], result["threads"]
    tokens = result["warmup"] + result["steps"] + 1
    table = [[cell(row[key], digits, header, tokens, row["batch"]) for header, key, digits in COLUMNS]
             for row in result["rows"]]
    counted = result["collectives_counted"]
    lines = [
        *record.opening_lines(result),
        f"- {record.versions_text(result['versions'])}; commit {result['commit']}",
        (
            f"- model: {result['model']} ({result['num_layers']} layers, hidden {result['hidden_size']}, "
            f"vocabulary {result['vocab_size']})"
        ),
        (
            f"- work: a batch of requests with {result['prompt_len']}-token prompts (fixed pseudo-random ids), "
            f"prefilled, {result['warmup']} warm-up decode steps, then the median of {result['steps']} timed "
            f"decode steps (`Engine.step`), greedy; collectives alone: median of {result['collective_repeats']}"
        ),
        (
            f"- ranks: TP 1 in one process with {threads['1']} torch threads, TP {tp} in {tp} processes with "
            f"{threads[str(tp)]} each (`share_of_cores({tp})`: {tp * threads[str(tp)]} threads on "
            f"{result['cores']} cores); gloo over TCP on 127.0.0.1"
        ),
        f"- command: `{result['command']}`",
        "",
        *record.markdown_table([header for header, _, _ in COLUMNS], table, "l" + "r" * (len(COLUMNS) - 1)),
        "",
        f"Collectives per decode step: {result['collectives']['all_reduce']} all-reduces "
        f"(2 per layer x {result['num_layers']} + 1 for the embedding) and {result['collectives']['all_gather']} "
        f"all-gather (the LM head's logits), from the model's config; counted during a step: "
        f"{counted.get('all_reduce', 0)} and {counted.get('all_gather', 0)}.",
        "count x latency: the collectives' count times their median latency timed alone; share: of the median "
        f"TP {tp} step. in collectives: the time rank 0 spent inside them during a step (median), which also holds "
        "the waits for ranks that were slower to get there.",
        f"same tokens as TP 1: of the batch's greedy tokens ({tokens} per request), how many TP {tp} made alike, "
        "each request counted up to its first difference. In bfloat16 the all-reduces add the ranks' partial "
        "products, rounded, in another order than one matmul does, so a near tie can go the other way and the "
        "request's tokens part from there; float32 should match.",
        "",
        f"## Why TP {tp} is not faster on this machine",
        "",
        f"TP 1 already uses all {result['cores']} cores; {tp} ranks of {threads[str(tp)]} thread share the same "
        f"cores, so tensor parallelism adds no compute here. It only splits the matmuls, while every rank still "
        "runs the norms, residual additions, rotary and sampling of the whole batch, and adds collectives:",
        "",
        *why(result),
        "",
        "## The same step on paper",
        "",
        f"The TP {tp} decode step's communication, on links made for it: time = count x latency + bytes each rank "
        f"sends / bandwidth, with {TRAFFIC_SOURCE}. The latencies are approximate orders of magnitude for small "
        "messages; compute is not included.",
        "",
        *paper_table(result["paper"], tp),
        "",
        *[f"- {link['link']}: {link['source']}." for link in result["links"]],
    ]
    return "\n".join(lines) + "\n"


def describe(args, model_path: Path, config, start: record.Start) -> dict:
    title = f"Tensor parallelism on this machine: decode step at TP 1 and TP {args.tp}, and its collectives"
    return {
        **record.run_info("tp_decode", title, start, model_path, packages=("torch",)),
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "tp": args.tp,
        "dtypes": args.dtype,
        "batch_sizes": args.batch_sizes,
        "prompt_len": args.prompt_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "collective_repeats": args.collective_repeats,
        "seed": args.seed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="Hugging Face folder (default: the course's default model)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="requests decoded together")
    parser.add_argument("--tp", type=int, default=3, help="the TP size compared with TP 1")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens in each request's prompt")
    parser.add_argument("--warmup", type=int, default=3, help="decode steps run before the timed ones")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps; the median is reported")
    parser.add_argument("--collective-repeats", type=int, default=200, help="timed calls of each collective alone")
    parser.add_argument("--seed", type=int, default=0, help="fixes the prompts")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the ranks of one TP size may take")
    parser.add_argument("--output", type=Path, default=record.RESULTS / "tp_decode.md", help="the markdown result")
    args = parser.parse_args()

    model_path = Path(args.model_path) if args.model_path else require_default_model()
    config = ModelConfig.from_path(model_path)
    problem = tensor_parallel_problem(args.tp, config.num_heads, config.num_kv_heads, config.intermediate_size)
    if args.tp < 2 or problem:
        parser.error(f"--tp {args.tp}: {problem if args.tp >= 2 else 'compare TP 1 with at least 2'}")
    options = {
        "prompt_len": args.prompt_len, "warmup": args.warmup, "steps": args.steps,
        "collective_repeats": args.collective_repeats, "seed": args.seed,
    }

    start = record.start_run("chapters/04/minisgl", busy_threshold=0.5)
    results = {}
    for tp in (1, args.tp):
        print(f"TP {tp}: {tp} rank(s), {', '.join(args.dtype)}, batch sizes {args.batch_sizes} ...", file=sys.stderr)
        ranks = run_ranks(tp, rank_main, str(model_path), args.dtype, args.batch_sizes, options, timeout=args.timeout)
        results[tp] = ranks[0]  # every rank ran every step; rank 0 speaks for them
        results[tp]["step_ms_by_rank"] = [[round(run["step_ms"], 2) for run in r["runs"]] for r in ranks]

    counts = collective_count(config)
    counted = results[args.tp]["runs"][0]["counted"]
    if counted != counts:
        print(f"warning: counted {counted} collectives in a step, the model's structure says {counts}", file=sys.stderr)
    rows = table_rows(args.tp, results[1], results[args.tp], counts)
    result = {
        **describe(args, model_path, config, start),
        "threads": {str(tp): results[tp]["threads"] for tp in results},
        "collectives": counts,
        "collectives_counted": counted,
        "collective_bytes_in": results[args.tp]["runs"][0]["bytes_in"],
        "step_ms_by_rank": {str(tp): results[tp]["step_ms_by_rank"] for tp in results},
        "rows": rows,
        "paper": paper_rows(config, args.tp, rows),
        "links": [{**link, "latency_us": list(link["latency_us"])} for link in LINKS],
        "traffic": TRAFFIC_SOURCE,
    }
    record.write_result(args.output, report(result), result)  # with chapter 04's plot and fragment, into results/


if __name__ == "__main__":
    main()
