"""A decode step's matrix products in bfloat16, int8 and int4, against this machine's memory bandwidth (chapter 06).

Decoding multiplies a few rows by every weight matrix of the model, so the products are bounded by how fast
the weights stream from memory. This measures, in one run:

- **the bandwidth**: a copy of a 512 MB tensor (it reads 512 MB and writes 512 MB) and a triad
  (``a = b + s * c``: two reads and a write), best of ``--repeats``, in GB/s of bytes moved;
- **each kernel on each weight shape** of the default model (qkv, o, gate_up, down, the LM head), at 1, 2,
  4, 8 and 32 rows, in the order a real decode step runs them (30 layers, then the head), so that no weight
  is still in the CPU's caches when it is used again: oneDNN's product on prepacked bfloat16 (what serving
  uses without ``--quantization``), torch's weight-only int8 kernel (``int8wo``), fbgemm's dynamic
  int8 x int8 product (``w8a8_int8``), and torch's int4 kernel with a scale per 32 weights in the layers and
  the int8 weight-only one in the LM head (``int4wo-32``, as ``quantize_model`` mixes them);
- **the floor**: the bytes a step reads divided by the bandwidth, and how close each kernel comes to it.

    python benchmarks/int8_weights.py [--repeats 5]
"""

import argparse
import os
import time
from pathlib import Path

import torch
from benchkit import record

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # out x in
LM_HEAD = (49152, 576)
LAYERS = 30
ROWS = (1, 2, 4, 8, 32)
KERNELS = ("bfloat16 prepacked", "int8 weight-only", "int8 w8a8", "int4wo-32")
# Bytes a weight costs in the layers and in the LM head: int4 is half a byte plus a bfloat16 scale and zero
# per 32 weights; the scales of int8's rows are left out (4 bytes per row of hundreds).
BYTES_PER_WEIGHT = {"bfloat16 prepacked": (2, 2), "int8 weight-only": (1, 1), "int8 w8a8": (1, 1),
                    "int4wo-32": (0.5 + 4 / 32, 1)}
KERNEL_OF = {"": "bfloat16 prepacked", "int8wo": "int8 weight-only", "w8a8_int8": "int8 w8a8", "int4wo-32": "int4wo-32"}


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth(repeats: int = 5, megabytes: int = 512) -> dict[str, float]:
    """GB/s of a large copy and of a triad (bytes read and written), best of ``repeats``: the most this
    machine's memory gives one process using every core."""
    n = megabytes * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    copy = best_seconds(lambda: a.copy_(b), repeats)
    triad = best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    return {"copy": 2 * n * 4 / copy / 1e9, "triad": 3 * n * 4 / triad / 1e9}


def make_product(kernel: str, weight: torch.Tensor, lm_head: bool = False):
    from minisgl.layers.quantize import Int4Weight, Int8Weight

    if kernel == "bfloat16 prepacked":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if kernel == "int4wo-32":
        return Int8Weight(weight, "int8wo") if lm_head else Int4Weight(weight)
    return Int8Weight(weight, "int8wo" if kernel == "int8 weight-only" else "w8a8_int8")


def step_times(kernel: str, rows: int, repeats: int) -> dict[str, float]:
    """Seconds per decode step spent in each matrix (all 30 layers' together), the median of ``repeats`` steps."""
    generator = torch.Generator().manual_seed(0)
    layers = [{name: make_product(kernel, (torch.randn(shape, generator=generator) * 0.05).bfloat16())
               for name, shape in SHAPES.items()} for _ in range(LAYERS)]
    head = make_product(kernel, (torch.randn(LM_HEAD, generator=generator) * 0.05).bfloat16(), lm_head=True)
    inputs = {name: torch.randn(rows, k).bfloat16() for name, (_, k) in SHAPES.items()}
    steps = []
    for _ in range(repeats + 1):  # the first is a warm-up
        spent = dict.fromkeys([*SHAPES, "lm_head"], 0.0)
        for layer in layers:
            for name, product in layer.items():
                start = time.perf_counter()
                product(inputs[name])
                spent[name] += time.perf_counter() - start
        start = time.perf_counter()
        head(inputs["qkv"])
        spent["lm_head"] += time.perf_counter() - start
        steps.append(spent)
    return {name: sorted(step[name] for step in steps[1:])[repeats // 2] for name in steps[0]}


def weight_bytes(kernel: str) -> int:
    layer, head = BYTES_PER_WEIGHT[kernel]
    return round(layer * LAYERS * sum(n * k for n, k in SHAPES.values()) + head * LM_HEAD[0] * LM_HEAD[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=record.RESULTS / "int8_weights.md")
    args = parser.parse_args()
    start = record.start_run("minisgl/layers", busy_threshold=0.5)
    measured = bandwidth(args.repeats)
    peak = max(measured.values())
    rows_out = []
    for rows in ROWS:
        for kernel in KERNELS:
            spent = step_times(kernel, rows, args.repeats)
            total = sum(spent.values())
            floor = weight_bytes(kernel) / (peak * 1e9)
            rows_out.append({"rows": rows, "kernel": kernel, **{f"{k}_ms": round(v * 1e3, 2) for k, v in spent.items()},
                             "step_ms": round(total * 1e3, 2), "floor_ms": round(floor * 1e3, 2),
                             "of_floor_pct": round(100 * floor / total)})
    from minisgl.default_model import default_model_path

    title = "A decode step's products: bfloat16, int8 and int4 against the bandwidth"
    result = {**record.run_info("int8_weights", title, start, default_model_path(), packages=("torch",)),
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "bandwidth_gb_s": {k: round(v, 1) for k, v in measured.items()},
              "weights_mb": {k: round(weight_bytes(k) / 1e6, 1) for k in KERNELS},
              "rows": rows_out}
    header = ["rows", "kernel", "qkv ms", "o ms", "gate_up ms", "down ms", "LM head ms", "step ms", "floor ms",
              "% of floor"]
    table = [[r["rows"], r["kernel"], *(f"{r[k + '_ms']:.2f}" for k in [*SHAPES, "lm_head"]), f"{r['step_ms']:.2f}",
              f"{r['floor_ms']:.2f}", r["of_floor_pct"]] for r in rows_out]
    lines = [
        *record.opening_lines(result),
        f"- {record.versions_text(result['versions'])}, {result['threads']} threads; commit {result['commit']}",
        f"- bandwidth (best of {args.repeats}, 512 MB tensors): copy {measured['copy']:.1f} GB/s, triad "
        f"{measured['triad']:.1f} GB/s; the floor below uses the larger",
        f"- weights a step reads: {result['weights_mb']['bfloat16 prepacked']:.0f} MB in bfloat16, "
        f"{result['weights_mb']['int8 weight-only']:.0f} MB in int8 (plus 4 bytes of scale per row), "
        f"{result['weights_mb']['int4wo-32']:.0f} MB in int4wo-32 (the layers in int4 with a bfloat16 scale and zero "
        "per 32 weights, the LM head in int8)",
        f"- each cell: the median of {args.repeats} steps of 30 layers and the LM head, every matrix distinct",
        f"- command: `{result['command']}`",
        "",
        *record.markdown_table(header, table, "rl" + "r" * (len(header) - 2)),
    ]
    record.write_result(args.output, "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
