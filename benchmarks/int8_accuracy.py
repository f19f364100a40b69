"""What int8 and int4 weights cost in accuracy (chapter 06, ``layers/quantize.py``): perplexity and greedy agreement.

For each way of running the default model, through the offline API (``minisgl.LLM``):

Every product of a quantized weight is quantized here, prefills and batches included (serving multiplies
inputs of more than ``WEIGHT_ONLY_MAX_ROWS`` or ``INT4_MAX_ROWS`` rows by the float weights it keeps):

- **perplexity** on a fixed text, the course's own chapter pages (``docs/chapters/*.md``), cut into
  ``--windows`` windows of ``--window`` tokens; each window is one prompt, scored token by token with
  ``prompt_logprobs`` (every token but a window's first). Lower is better; the float32 row is the model
  itself.
- **greedy agreement**: the test suite's oracle prompts (a chat question, a line of code, a long chat with
  a system prompt) and a few more, ``--new-tokens`` greedy tokens each; how many leading tokens equal the
  float32 run's (which equals transformers', as chapter 06's tests check), per prompt.

- **which matrices w8a8 hurts**: perplexity with the activations quantized (w8a8) in one kind of matrix
  only (qkv, o, gate_up, down, the LM head), every other product weight-only.
- **why int4wo-32 keeps the LM head int8**: a row with the LM head in int4 too (groups of 32, as the
  layers); and a row with groups of 64, which cut across the 32-weight blocks of the GGUF file the default
  model was made from (groups of 32 find those blocks' own sixteen levels);
- **how far rounding moves the checkpoint's own weights**: the relative error (norm of the difference over
  the norm of the weights) of int8 per row and int4 per 32, for each kind of matrix of the float32
  checkpoint, averaged over the layers.

    python benchmarks/int8_accuracy.py [--windows 8] [--window 512] [--new-tokens 48]
"""

import argparse
import gc
import math
import statistics
from pathlib import Path

from benchkit import record

RUNS = [("float32", "float32", ""), ("bfloat16", "bfloat16", ""), ("int8 weight-only", "bfloat16", "int8wo"),
        ("int8 w8a8", "bfloat16", "w8a8_int8"), ("int4wo-32 (LM head int8)", "bfloat16", "int4wo-32"),
        ("int4, LM head too", "bfloat16", "int4wo-32"), ("int4, groups of 64 (LM head int8)", "bfloat16", "int4wo-32")]
SYSTEM = ("You are a meticulous librarian in a small mountain town. You answer questions about books, reading "
          "and the history of libraries, briefly and kindly, and you never invent titles or authors. When you do "
          "not know something, you say so plainly and suggest where the reader could look it up.")
QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Which book should I read first?",
             "Explain what a hash table is.", "Write a haiku about the sea.", "How do vaccines work?"]
COLUMNS = {"weights": None, "perplexity": 3, "vs float32": 3, "agreeing tokens (median)": 0,
           "agreeing tokens (min)": 0, "prompts all agreeing": None}


def oracle_prompts(tokenizer) -> dict[str, list[int]]:
    def chat(question: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    prompts = {"chat": chat(QUESTIONS[0]), "code": tokenizer.encode("def fibonacci(n):"),
               "long": chat(QUESTIONS[1], SYSTEM)}
    prompts |= {f"q{i}": chat(q) for i, q in enumerate(QUESTIONS[2:])}
    return prompts


def text_windows(tokenizer, windows: int, size: int) -> list[list[int]]:
    pages = sorted((record.REPO_ROOT / "docs" / "chapters").glob("*.md"))
    ids = tokenizer.encode("\n\n".join(page.read_text() for page in pages))
    if len(ids) < windows * size:
        raise SystemExit(f"the pages hold {len(ids)} tokens, fewer than {windows} x {size}")
    step = len(ids) // windows  # spread over all the pages
    return [ids[i * step: i * step + size] for i in range(windows)]


def perplexity(llm, windows: list[list[int]]) -> float:
    from minisgl import SamplingParams

    scored = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=True))
    logprobs = [t.logprob for out in scored for t in out.prompt_logprobs if t.logprob is not None]
    return math.exp(-sum(logprobs) / len(logprobs))


KINDS = {"qkv": ".attn.qkv", "o": ".attn.o", "gate_up": ".mlp.gate_up", "down": ".mlp.down", "LM head": "embed"}


def w8a8_by_kind(windows: list[list[int]]) -> dict[str, float]:
    """Perplexity with w8a8 in one kind of matrix, the others weight-only: a w8a8 model whose other int8 weights
    lose their fbgemm product (``Int8Weight`` then multiplies weight-only, for every input)."""
    from minisgl import LLM

    llm = LLM(dtype="bfloat16", quantization="w8a8_int8", max_running_requests=8, context_length=1024)
    weights = [(name, module.weight.quantized) for name, module in llm.engine.model.named_modules()
               if getattr(getattr(module, "weight", None), "quantized", None) is not None]
    fbgemm = {name: int8.fbgemm for name, int8 in weights}
    found = {}
    for kind, suffix in KINDS.items():
        for name, int8 in weights:
            int8.fbgemm = fbgemm[name] if name.endswith(suffix) else None
        found[kind] = perplexity(llm, windows)
    del llm
    gc.collect()
    return found


def rounding_errors(model_path: Path) -> dict[str, dict[str, float]]:
    """Relative error of each way of rounding, per kind of matrix of the checkpoint (its float32 weights)."""
    from safetensors.torch import load_file

    from minisgl.layers.quantize import dequantize, dequantize_groups, quantize_groups, quantize_per_channel

    found: dict[str, dict[str, list[float]]] = {}
    for path in sorted(model_path.glob("*.safetensors")):
        for name, weight in load_file(path).items():
            if weight.dim() != 2:
                continue
            weight = weight.float()
            ways = {"int8 per row": dequantize(*quantize_per_channel(weight)),
                    "int4 per 32": dequantize_groups(*quantize_groups(weight))}
            kind = name.split(".")[-2]  # q_proj, ..., embed_tokens
            for way, back in ways.items():
                found.setdefault(kind, {}).setdefault(way, []).append(((back - weight).norm() / weight.norm()).item())
    return {kind: {way: statistics.mean(errors) for way, errors in ways.items()} for kind, ways in found.items()}


def measure(dtype: str, quantization: str, windows: list[list[int]], prompts: dict, new_tokens: int,
            head_int4: bool = False, group: int = 32) -> dict:
    from minisgl import LLM, SamplingParams
    from minisgl.layers.linear import lm_head_of
    from minisgl.layers.quantize import INT4_GROUP, Int4Weight

    llm = LLM(dtype=dtype, quantization=quantization, max_running_requests=8, context_length=1024)
    if head_int4:
        head = lm_head_of(llm.engine.model).weight
        head.quantized = Int4Weight(head.detach())
    for module in llm.engine.model.modules():  # every product quantized, prefills and batches included (serving
        weight = getattr(module, "weight", None)   # sends those to the float weights)
        quantized = getattr(weight, "quantized", None)
        if isinstance(quantized, Int4Weight) and group != INT4_GROUP:  # from the float weight, kept on a CPU
            quantized = weight.quantized = Int4Weight(weight.detach(), group)
        if quantized is not None:
            quantized.max_rows = None
    found = perplexity(llm, windows)
    greedy = llm.generate(list(prompts.values()), SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    del llm
    gc.collect()
    return {"perplexity": found, "tokens": {name: out.token_ids for name, out in zip(prompts, greedy)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--output", type=Path, default=record.RESULTS / "int8_accuracy.md")
    args = parser.parse_args()
    start = record.start_run("minisgl")
    from transformers import AutoTokenizer

    from minisgl.default_model import default_model_path

    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    windows, prompts = text_windows(tokenizer, args.windows, args.window), oracle_prompts(tokenizer)
    measured = {label: measure(dtype, q, windows, prompts, args.new_tokens, head_int4="LM head too" in label,
                               group=64 if "groups of 64" in label else 32) for label, dtype, q in RUNS}
    by_kind = w8a8_by_kind(windows)
    errors = rounding_errors(model_path)
    reference = measured["float32"]
    rows = []
    for label, *_ in RUNS:
        m = measured[label]
        agree = [record.common_prefix(m["tokens"][name], reference["tokens"][name]) for name in prompts]
        m["agreeing"] = dict(zip(prompts, agree))
        rows.append(record.table_row(COLUMNS, [
            label, m["perplexity"], m["perplexity"] / reference["perplexity"], statistics.median(agree), min(agree),
            f"{sum(a == args.new_tokens for a in agree)} of {len(agree)}"]))
    result = {
        **record.run_info("int8_accuracy", "int8 and int4 weights: perplexity and greedy agreement with float32", start,
                          model_path, packages=("torch", "transformers")),
        "windows": args.windows, "window": args.window, "new_tokens": args.new_tokens, "rows": rows,
        "agreeing": {label: measured[label]["agreeing"] for label, *_ in RUNS},
        "scored_tokens": sum(len(w) - 1 for w in windows),
        "w8a8_by_kind": {kind: round(p, 3) for kind, p in by_kind.items()},
        "rounding_error_pct": {kind: {way: round(100 * e, 3) for way, e in ways.items()}
                               for kind, ways in errors.items()},
    }
    lines = [
        *record.opening_lines(result),
        f"- {record.versions_text(result['versions'])}; commit {result['commit']}; model {result['model']}",
        f"- perplexity: {result['scored_tokens']} tokens of the course's chapter pages, {args.windows} windows of "
        f"{args.window} tokens; greedy: {len(prompts)} chat and code prompts, {args.new_tokens} tokens each, "
        "compared with the float32 run (which is transformers' greedy output)",
        f"- command: `{result['command']}`",
        "",
        *record.columns_table(COLUMNS, rows),
        "",
        "Agreeing tokens per prompt: " + "; ".join(
            f"{label}: " + ", ".join(f"{name} {n}" for name, n in measured[label]["agreeing"].items())
            for label, *_ in RUNS[1:]),
        "",
        "Perplexity with w8a8 in one kind of matrix only, the others weight-only: " + "; ".join(
            f"{kind} {p:.2f} ({p / reference['perplexity']:.3f}x)" for kind, p in by_kind.items()),
        "",
        "How far rounding moves the float32 checkpoint's weights (relative error, mean over the layers): " + "; ".join(
            f"{kind} " + ", ".join(f"{way} {e:.3f}%" for way, e in ways.items())
            for kind, ways in result["rounding_error_pct"].items()),
    ]
    record.write_result(args.output, "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    main()
