"""What structured output costs the scheduler: xgrammar's compile, mask and advance, per constraint kind,
with the default model's vocabulary (``minisgl/grammar.py``).

A constrained request pays three prices (see the epilogue of the book):

1. **compile**, once per distinct constraint, when the first request that carries it arrives
   (``Grammars.compile_later``); the same constraint again is a lookup in the kept grammars and a fresh matcher;
2. **mask**, every decode step: each constrained request's matcher fills its row of a bitmask
   (``fill_next_token_bitmask``), and ``apply_grammar_masks`` sets every forbidden token's logit to -inf
   on the batch's logits;
3. **advance**, every decode step: the scheduler feeds the chosen token to the matcher (``accept_token``).

Per constraint kind (``json_object``, a ``json_schema`` of a small object with a string, an integer and an
enum field, a ``regex`` of an ISO date, an ``ebnf`` grammar of arithmetic expressions) it times:

- the first compile (the grammar compiler itself, built once per server on the first constrained request,
  is timed on its own) and the cached lookup, median of ``--lookups``;
- driving matchers through a real valid output token by token (the output's text tokenized with the
  model's tokenizer, each token checked against the mask): per step, ``fill_next_token_bitmask`` of one
  row, ``apply_grammar_masks`` on a ``[--batch, vocab]`` float32 logits tensor whose rows are all
  constrained (``--batch`` matchers in the same state), and ``accept_token``; medians over the steps of
  ``--repeats`` drives, in microseconds.

Then the cost a decode step of ``--batch`` constrained requests pays (one ``apply_grammar_masks`` and
``--batch`` ``accept_token`` calls), against a decode step's time: ``--step-ms``, by default the ITL p50 at
concurrency 8 of the complete server in ``benchmarks/results/serve_ch06_peers.json`` if that file is there
(a streamed token every decode step, so about one decode step of 8 requests), else no comparison.

Run it from the repository root (under a minute on 2 CPU cores):

    python benchmarks/grammar_cost.py [--batch 8] [--repeats 5] [--step-ms 61]

The result goes to ``benchmarks/results/grammar_cost.md`` (``--output`` to change).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import xgrammar as xgr
from benchkit.record import REPO_ROOT, RESULTS, command_line, cpu_model, git_commit, load_line, write_result

sys.path.insert(0, str(REPO_ROOT))  # the top-level minisgl, the complete server

from minisgl.config import eos_token_ids, read_json  # noqa: E402
from minisgl.default_model import require_default_model  # noqa: E402
from minisgl.grammar import Grammars, apply_grammar_masks, unpack_bits  # noqa: E402

STEP_SOURCE = RESULTS / "serve_ch06_peers.json"

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["engineer", "designer", "manager"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
PERSON = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "engineer"})  # ", " and ": ", as xgrammar wants
ARITHMETIC = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
# kind: (the constraint as the scheduler gets it, a valid output, what the table calls it)
CASES = {
    "json_object": (("json_object", ""), PERSON, "any JSON object"),
    "json_schema": (("json_schema", json.dumps(PERSON_SCHEMA)), PERSON, "{name: string, age: integer, role: enum}"),
    "regex": (("regex", r"\d{4}-\d{2}-\d{2}"), "2024-05-17", r"`\d{4}-\d{2}-\d{2}`"),
    "ebnf": (("ebnf", ARITHMETIC), "(12+7)*3-40/(2+3)", "arithmetic expressions (nested parentheses)"),
}


def microseconds(start: float) -> float:
    return (time.perf_counter() - start) * 1e6


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q / 100))]


def default_step_ms() -> tuple[float | None, str]:
    """The complete server's ITL p50 at concurrency 8 from the peers benchmark, and where it came from."""
    if not STEP_SOURCE.is_file():
        return None, ""
    result = json.loads(STEP_SOURCE.read_text())
    for row in result.get("rows", []):
        if row.get("engine") == "minisgl" and row.get("mode") == "concurrency 8" and row.get("itl_p50_ms"):
            source = (f"ITL p50 at concurrency 8 of the complete server, {result.get('dtype', '')}, in "
                      f"`benchmarks/results/{STEP_SOURCE.name}` ({result.get('date', '')[:10]})")
            return float(row["itl_p50_ms"]), source
    return None, ""


def new_matcher(grammars: Grammars, constraint):
    """What the scheduler does on a request's arrival (with no compile thread): the grammar, compiled or
    kept, and a fresh matcher on it."""
    return grammars.matcher(constraint, grammars.compile_later(constraint, None).result())


def drive(grammars: Grammars, constraint, ids: list[int], eos: int, batch: int, vocab: int, logits: torch.Tensor):
    """One pass through the output ``ids``: per step, the time of one row's fill, of the batch's mask, of
    the bitmask's application alone (the mask without its fills) and of one accept (µs). ``batch`` matchers
    advance in lockstep so that every row of the batch is constrained."""
    matchers = [new_matcher(grammars, constraint) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    work = torch.empty_like(logits)
    fill, mask, apply, xgr_apply, accept = [], [], [], [], []
    for token in [*ids, eos]:
        start = time.perf_counter()
        matchers[0].fill_next_token_bitmask(bitmask, 0)
        fill.append(microseconds(start))
        for row, matcher in enumerate(matchers[1:], 1):
            matcher.fill_next_token_bitmask(bitmask, row)
        work.copy_(logits)
        start = time.perf_counter()
        work.masked_fill_(~unpack_bits(bitmask, vocab), float("-inf"))  # what apply_grammar_masks does
        apply.append(microseconds(start))
        expected = work.clone()
        work.copy_(logits)
        start = time.perf_counter()
        xgr.apply_token_bitmask_inplace(work, bitmask)  # xgrammar's own CPU loop, for comparison
        xgr_apply.append(microseconds(start))
        if not torch.equal(work, expected):
            raise SystemExit("unpack_bits and xgrammar's apply_token_bitmask_inplace disagree")
        work.copy_(logits)
        start = time.perf_counter()
        apply_grammar_masks(work, matchers)
        mask.append(microseconds(start))
        if work[0, token] == float("-inf"):
            raise SystemExit(f"token {token} of the valid output is masked: the output does not fit the grammar")
        start = time.perf_counter()
        accepted = matchers[0].accept_token(token)
        accept.append(microseconds(start))
        accepted = all([accepted] + [m.accept_token(token) for m in matchers[1:]])
        if not accepted:
            raise SystemExit(f"the matcher refused token {token}")
    if not matchers[0].is_terminated():
        raise SystemExit("the matcher did not end after the output and the end token")
    return fill, mask, apply, xgr_apply, accept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="constrained rows of the logits (requests in a step)")
    parser.add_argument("--repeats", type=int, default=5, help="drives through each valid output")
    parser.add_argument("--lookups", type=int, default=200, help="cached lookups timed per constraint")
    parser.add_argument("--step-ms", type=float, default=None,
                        help="a decode step's time at --batch requests, ms (default: from serve_ch06_peers.json)")
    parser.add_argument("--model-path", default=None, help="Hugging Face folder (default: the course's default model)")
    parser.add_argument("--output", type=Path, default=RESULTS / "grammar_cost.md", help="the markdown result")
    args = parser.parse_args()
    step_ms, step_source = (args.step_ms, "given with --step-ms") if args.step_ms else default_step_ms()

    load_before, started = os.getloadavg(), time.perf_counter()
    from transformers import AutoTokenizer

    model_path = Path(args.model_path) if args.model_path else require_default_model()
    raw = read_json(model_path / "config.json")
    eos_ids = eos_token_ids(model_path, raw, read_json(model_path / "tokenizer_config.json") or {})
    vocab = raw["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    grammars = Grammars(model_path, vocab, set(eos_ids))
    start = time.perf_counter()
    grammars.compiler()
    setup_ms = (time.perf_counter() - start) * 1e3
    logits = torch.randn(args.batch, vocab, dtype=torch.float32)

    rows = []
    for kind, (constraint, output, described) in CASES.items():
        start = time.perf_counter()
        new_matcher(grammars, constraint)
        first_ms = (time.perf_counter() - start) * 1e3
        lookups = []
        for _ in range(args.lookups):
            start = time.perf_counter()
            new_matcher(grammars, constraint)
            lookups.append(microseconds(start))
        ids = tokenizer.encode(output, add_special_tokens=False)
        fill, mask, apply, xgr_apply, accept = [], [], [], [], []
        for _ in range(args.repeats):
            times = drive(grammars, constraint, ids, eos_ids[0], args.batch, vocab, logits)
            for samples, more in zip((fill, mask, apply, xgr_apply, accept), times):
                samples += more
        per_step = statistics.median(mask) + args.batch * statistics.median(accept)
        rows.append({
            "kind": kind, "described": described, "output": output, "tokens": len(ids), "first_ms": first_ms,
            "lookup_us": statistics.median(lookups), "fill_us": statistics.median(fill),
            "fill_p90_us": percentile(fill, 90), "mask_us": statistics.median(mask),
            "mask_p90_us": percentile(mask, 90), "apply_us": statistics.median(apply),
            "xgr_apply_us": statistics.median(xgr_apply),
            "accept_us": statistics.median(accept), "step_us": per_step,
        })
        print(f"{kind}: {rows[-1]}", file=sys.stderr)
    load_after, elapsed = os.getloadavg(), time.perf_counter() - started

    lines = [
        "# Structured output: what xgrammar's compile, mask and advance cost per constraint kind", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; whole run {elapsed:.0f} s",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        load_line(load_before, load_after),
        f"- python {platform.python_version()}, torch {torch.__version__}, xgrammar {version('xgrammar')}; "
        f"minisgl commit {git_commit('minisgl/grammar.py')}",
        f"- model: {model_path.name}, vocabulary {vocab}; the grammar compiler (the tokenizer's "
        f"{vocab} tokens analysed, once per server): {setup_ms:.0f} ms",
        f"- mask: `apply_grammar_masks` on [{args.batch}, {vocab}] float32 logits, all {args.batch} rows "
        f"constrained; each valid output driven {args.repeats} times token by token, the end token included",
        f"- command: `{command_line('grammar_cost')}`",
        "",
        "| constraint | the valid output | tokens | first compile ms | cached lookup µs | fill one row µs (p90) "
        f"| mask batch {args.batch} µs (p90) | of which applying the bitmask µs | xgrammar's apply µs | accept µs "
        f"| per step, batch {args.batch}, µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']}: {r['described']} | `{r['output']}` | {r['tokens']} | {r['first_ms']:.1f} | "
            f"{r['lookup_us']:.1f} | {r['fill_us']:.1f} ({r['fill_p90_us']:.1f}) | {r['mask_us']:.1f} "
            f"({r['mask_p90_us']:.1f}) | {r['apply_us']:.1f} | {r['xgr_apply_us']:.1f} | {r['accept_us']:.1f} | "
            f"{r['step_us']:.0f} |"
        )
    lines += [
        "",
        "Medians over every step of every drive (p90 in brackets). cached lookup: compile_later and matcher for a "
        "constraint already compiled, a fresh matcher included (what a request pays on arrival after the first). "
        f"mask: one call of `apply_grammar_masks`, which fills the {args.batch} rows' bitmask and applies it; "
        "applying: the bitmask unpacked to booleans and `masked_fill_` (`grammar.unpack_bits`), on the same bitmask "
        "already filled; xgrammar's apply: `xgr.apply_token_bitmask_inplace` on it instead (its CPU loop, whose "
        "time grows with the number of forbidden tokens), which minisgl measured and replaced. "
        f"per step: mask + {args.batch} x accept, the grammar's work in one decode step of {args.batch} "
        "constrained requests.",
        "",
    ]
    if step_ms:
        for r in rows:
            r["share"] = r["step_us"] / (step_ms * 1e3)
        worst = max(rows, key=lambda r: r["share"])
        lines += [
            f"Against a decode step of {step_ms:g} ms ({step_source}): the grammar adds "
            + ", ".join(f"{r['kind']} {100 * r['share']:.2f}%" for r in rows)
            + f" (at most {worst['step_us'] / 1e3:.2f} ms, {worst['kind']}).",
        ]
    else:
        lines.append("No decode step time was given (`--step-ms`) or found, so no comparison.")
    write_result(args.output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
