"""One row times each of the default model's weight matrices, in bfloat16: ``F.linear`` against oneDNN's
product on a prepacked weight (chapter 06's ``layers/linear.py``), and the machine's memory read speed.

Decoding one request multiplies one row by every weight, so a decode step's products are bounded by how
fast the weights stream from memory. Each shape is timed over 30 distinct matrices (one per layer), so
that no weight stays in the CPU's caches between two uses, as in a real decode step.

    python benchmarks/linear_prepack.py [--rows 1]
"""

import argparse
import os
import time

import torch
from benchkit.record import RESULTS, cpu_model

SHAPES = {  # name: (out features, in features) of SmolLM2-135M's matrices; 30 layers, one LM head
    "qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576),
}
LAYERS = 30


def seconds_per_call(fn, count: int, repeats: int = 10) -> float:
    for i in range(count):
        fn(i)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(count):
            fn(i)
    return (time.perf_counter() - start) / (repeats * count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="rows of the input (the batch of a decode step)")
    args = parser.parse_args()
    lines = [
        "# One row through each weight matrix, bfloat16: F.linear vs oneDNN on a prepacked weight", "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f}",
        f"- rows: {args.rows}; each shape over {LAYERS} distinct matrices (none stays in cache)", "",
        "| matrix | shape | F.linear µs | prepacked µs | speed-up | F.linear GB/s | prepacked GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    step = {"F.linear": 0.0, "prepacked": 0.0}
    for name, (n, k) in SHAPES.items():
        count = 1 if name == "lm_head" else LAYERS
        weights = [torch.randn(n, k).bfloat16() for _ in range(max(count, 4))]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, args.rows) for w in weights]
        x = torch.randn(args.rows, k).bfloat16()
        count = len(weights)
        plain = seconds_per_call(lambda i: torch.nn.functional.linear(x, weights[i]), count)
        fast = seconds_per_call(lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
                                count)
        uses = 1 if name == "lm_head" else LAYERS
        step["F.linear"] += plain * uses
        step["prepacked"] += fast * uses
        nbytes = n * k * 2
        lines.append(f"| {name} | {n} x {k} | {plain * 1e6:.1f} | {fast * 1e6:.1f} | {plain / fast:.2f}x | "
                     f"{nbytes / plain / 1e9:.1f} | {nbytes / fast / 1e9:.1f} |")
    big = torch.randn(64 * 2**20).bfloat16()
    read = seconds_per_call(lambda i: big.sum(), 1)
    bandwidth = big.numel() * 2 / read / 1e9
    weights_mb = sum(n * k * 2 * (1 if name == "lm_head" else LAYERS) for name, (n, k) in SHAPES.items()) / 1e6
    lines += [
        "",
        f"A whole decode step's products: F.linear {step['F.linear'] * 1e3:.1f} ms, prepacked "
        f"{step['prepacked'] * 1e3:.1f} ms. Memory read speed (the sum of 128 MB of bfloat16): {bandwidth:.1f} GB/s,"
        f" so reading the {weights_mb:.0f} MB of weights once takes at least {weights_mb / 1e3 / bandwidth * 1e3:.1f}"
        " ms.",
    ]
    (RESULTS / "linear_prepack.md").write_text("\n".join(lines) + "\n")
    # The chapter page includes the same without the title (``docs/chapters/06.md``).
    (RESULTS / "linear_prepack.book.md").write_text("\n".join(lines[2:]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
