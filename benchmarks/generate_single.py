"""Single-request decode speed: minisgl's ``Generator`` against transformers' ``generate``.

What it measures: tokens per second while *decoding* one request (batch size 1, greedy), for each
dtype, on the same model, the same chat prompt and the same machine, in one run:

- minisgl: ``Generator.generate`` with ``SamplingParams(max_tokens=N, ignore_eos=True)``
  (this includes our streaming detokenizer, since that is what a caller gets);
- transformers: ``AutoModelForCausalLM.generate`` with ``do_sample=False, max_new_tokens=N,
  min_new_tokens=N`` under ``torch.inference_mode()``.

Prefill is taken out the same way for both: a run that makes 1 new token costs prefill + one sample,
a run that makes N costs that plus N - 1 decode steps, so

    decode tok/s = (N - 1) / (time for N new tokens - time for 1 new token)

Each engine gets one warm-up run per dtype; then the two engines take turns, so that noise from the
machine hits both alike, and the table shows the median over ``--repeats`` rounds.

This is a chapter 01 benchmark: ``Generator`` is chapter 01's one-request loop, which chapter 02
replaced with the scheduler and server. So the script imports the frozen chapter 01 snapshot,
``chapters/01/minisgl/``, by putting ``chapters/01`` first on ``sys.path`` (ahead of the repository
root and of the editable install of the top-level package).

Run it from the repository root (``make bench`` calls it too):

    python benchmarks/generate_single.py [--model-path DIR] [--repeats 3] [--new-tokens 128]
                                         [--dtypes float32 bfloat16]

The table is printed and written to ``benchmarks/results/generate_single.md``, with the same numbers
and how they were measured in ``generate_single.json`` beside it; then ``plot_results.render`` draws
chapter 01's plot from that JSON.
"""

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from benchkit import record
from int8_weights import bandwidth
from tqdm import tqdm
from transformers import AutoModelForCausalLM

# Chapter 01's snapshot, not the top level: the top-level package no longer has ``minisgl.generate``.
sys.path.insert(0, str(record.REPO_ROOT / "chapters" / "01"))
from minisgl.default_model import require_default_model
from minisgl.generate import Generator
from minisgl.sampling import SamplingParams

PROMPT = "Write a short story about a robot who learns to paint."
COLUMNS = ["dtype", "minisgl tok/s", "transformers tok/s", "ratio (ours / transformers)", "tokens equal (prefix)",
           "minisgl % of floor", "transformers % of floor"]


def timed(fn, *args) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - start, tokens


def ours(gen: Generator, prompt_ids: list[int], n: int) -> list[int]:
    return gen.generate(prompt_ids, SamplingParams(max_tokens=n, ignore_eos=True)).token_ids


def theirs(model, input_ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,  # the model may not stop early on EOS, like ignore_eos
            pad_token_id=model.generation_config.eos_token_id,
        )
    return out[0, input_ids.shape[1] :].tolist()


def measure(runners: dict, n: int, repeats: int, bar: tqdm) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Median decode tok/s of each runner, and the tokens each made in its last run."""
    for run in runners.values():  # warm-up: first calls pay for lazy init, allocator growth, oneDNN kernels
        run(n)
        bar.update(1)
    rates = {name: [] for name in runners}
    tokens = {}
    for _ in range(repeats):
        for name, run in runners.items():  # alternate engines within a round
            t_one, _ = timed(run, 1)
            t_all, tokens[name] = timed(run, n)
            rates[name].append((n - 1) / (t_all - t_one))
            bar.update(1)
    return {name: statistics.median(r) for name, r in rates.items()}, tokens


def report(result: dict) -> str:
    """The markdown result, from the JSON's fields."""
    new_tokens, threads = result["new_tokens"], result["torch_threads"]
    rows = [
        [r["dtype"], f"{r['minisgl_tok_s']:.1f}", f"{r['transformers_tok_s']:.1f}",
         f"{r['ratio_ours_transformers']:.2f}", f"{r['tokens_equal_prefix']}/{new_tokens}",
         f"{r['minisgl_of_floor']:.0f}", f"{r['transformers_of_floor']:.0f}"]
        for r in result["rows"]
    ]
    lines = [
        f"# {result['title']}",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']}, {threads} torch threads (of {result['cores']} cores)",
        (
            f"- load average (1 min) before / after: {result['load_before'][0]:.2f} / {result['load_after'][0]:.2f} "
            f"(the run itself adds up to {threads})"
        ),
        f"- {', '.join(f'{name} {v}' for name, v in result['versions'].items())}",
        f"- commit: {result['commit']}",
        (
            f"- model: {result['model']}; prompt of {result['prompt_tokens']} tokens; {new_tokens} new tokens, "
            f"greedy; median of {result['repeats']} repeats after one warm-up"
        ),
        f"- decode tok/s = {new_tokens - 1} / (time for {new_tokens} new tokens - time for 1)",
        f"- % of floor: the time the weights ({result['parameters'] / 1e6:.0f} M parameters) take to stream at the "
        f"memory bandwidth measured in the same run ({result['bandwidth_gb_s']:.1f} GB/s, the best of a large copy "
        "and a triad), over the time a token took",
        f"- command: `{result['command']}`",
        "",
        *record.markdown_table(COLUMNS, rows, "lrrrrrr"),
        "",
        "tokens equal (prefix): how many leading greedy tokens the two made alike. In bfloat16 the two",
        "implementations round differently, so their greedy tokens may part early; float32 must match.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="Hugging Face folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per dtype; the median is reported")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per timed run")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode time is the difference from a 1-token run)")
    model_path = Path(args.model_path) if args.model_path else require_default_model()

    start = record.start_run("chapters/01", busy_threshold=0.5)
    peak = max(bandwidth().values())  # GB/s, in this run: the floor of a token is its weights' bytes over it
    rows = []
    bar = tqdm(total=len(args.dtypes) * 2 * (1 + args.repeats), desc="generate_single", unit="run")
    for dtype in args.dtypes:
        bar.set_postfix_str(f"{dtype}: loading")
        gen = Generator(model_path, dtype=dtype, device="cpu")
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        prompt_ids = gen.encode(PROMPT)  # one chat-templated prompt, fed to both as token ids
        input_ids = torch.tensor([prompt_ids])
        bar.set_postfix_str(dtype)
        rates, tokens = measure(
            {
                "minisgl": functools.partial(ours, gen, prompt_ids),
                "transformers": functools.partial(theirs, hf, input_ids),
            },
            args.new_tokens,
            args.repeats,
            bar,
        )
        same = record.common_prefix(tokens["minisgl"], tokens["transformers"])
        mine, theirs_rate = rates["minisgl"], rates["transformers"]
        parameters = sum(p.numel() for p in hf.parameters())  # a tied embedding once: it is the LM head
        floor_s = parameters * getattr(torch, dtype).itemsize / (peak * 1e9)
        # Rounded as the table prints them: the JSON holds exactly the table's numbers.
        values = [dtype, round(mine, 1), round(theirs_rate, 1), round(mine / theirs_rate, 2), same,
                  round(100 * floor_s * mine), round(100 * floor_s * theirs_rate)]
        rows.append(dict(zip(map(record.column_key, COLUMNS), values)))
        prompt_tokens = len(prompt_ids)
        del gen, hf
    bar.close()

    result = {
        "benchmark": "generate_single",
        "title": "Single-request decode speed",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": record.cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_before": [round(x, 2) for x in start.load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()
        },
        "commit": start.commit,
        "command": record.command_line("generate_single"),
        "model": model_path.name,
        "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "bandwidth_gb_s": round(peak, 1),
        "parameters": parameters,
        "rows": rows,
    }
    # Its plot and fragment for the book, chapter 01's.
    record.write_result(record.RESULTS / "generate_single.md", report(result), result)


if __name__ == "__main__":
    main()
