"""Where one decode step's time goes (chapter 06): matrix products, attention, sampling, Python.

One request (or ``--requests`` of them together) decodes ``--new-tokens`` greedy steps through the offline
API (``minisgl.LLM``: the scheduler and engine of the server, without its processes), once per
``--quantization`` value, under torch's profiler. The prompts are prefilled before the clock starts, so
only decode steps are measured. Every step's wall time is split into:

- **matmuls**: the self time of the matrix-product operators (oneDNN's prepacked bfloat16, the int8
  and int4 kernels of ``layers/quantize.py``);
- **attention**: the time inside the attention backend's ``forward`` (storing the new key and value,
  reading the pages, the kernel);
- **other tensor ops**: every other operator of the model's forward (norms, rotary, SiLU, adds, casts);
- **Python in the model**: the forward's time outside every operator (the layers' Python);
- **sampling**: the time inside ``Engine.step`` outside the forward (the sampler, ``tolist``);
- **scheduler**: the rest: building the batch, the scheduler's bookkeeping, the detokenizer. Messages
  between processes are not in this picture: in the server the tokenizer and detokenizer run in
  processes of their own, beside the steps.

The profiler adds its own cost to every operator, so the sum is larger than an unprofiled step; the
unprofiled ms per step (per token, for one request) is measured first and shown beside it.

    python benchmarks/step_profile.py [--quantization "" int8wo int4wo-32] [--new-tokens 64] [--requests 1 32]
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

from benchkit import record

MATMULS = ("mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "quantized::linear_dynamic",
           "aten::_weight_int4pack_mm_for_cpu", "aten::mm",
           "aten::addmm")
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
PARTS = ("matmuls", "attention", "other tensor ops", "Python in the model", "sampling", "scheduler")


def prompts_for(requests: int) -> list[str]:
    """One prompt, or ``requests`` prompts of different lengths (about 320 to 790 tokens, like the serving
    workload's), each opened by its own number so that the radix cache shares none of them."""
    if requests == 1:
        return [PROMPT]
    return [f"Request {i}. " + PROMPT * (20 + 30 * i // requests) for i in range(requests)]


def start_decoding(llm, prompts: list[str], new_tokens: int) -> list[str]:
    """Submit the prompts and step until every one of them is decoding (its prompt prefilled, its first token
    out), so that the steps that follow are decode steps only. Returns their uids, for ``llm.abort``."""
    from minisgl import SamplingParams
    from minisgl.messages import TokenizeRequest

    params = SamplingParams(max_tokens=new_tokens + 8, ignore_eos=True)  # room for every step measured
    uids = [f"profile-{next(llm.uids)}" for _ in prompts]
    llm.submit([llm.tokenizer.tokenize(TokenizeRequest(uid, replace(params), text=prompt))
                for uid, prompt in zip(uids, prompts)])
    while llm.scheduler.waiting or llm.scheduler.prefilling:
        run_steps(llm, 1)
    return uids


def run_steps(llm, steps: int) -> None:
    for _ in range(steps):
        output = llm.scheduler.step()
        if output is not None:
            llm.detokenizer.detokenize(output)


def profile(quantization: str, new_tokens: int, requests: int = 1, compile_attention: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from minisgl import LLM

    llm = LLM(dtype="bfloat16", quantization=quantization, max_running_requests=max(4, requests),
              context_length=1024, enable_torch_compile=compile_attention)
    prompts = prompts_for(requests)
    llm.abort(start_decoding(llm, prompts, new_tokens))  # warm-up (and the prompts into the radix cache)
    uids = start_decoding(llm, prompts, new_tokens)
    start = time.perf_counter()
    run_steps(llm, new_tokens)
    unprofiled_ms = (time.perf_counter() - start) * 1e3 / new_tokens
    llm.abort(uids)

    # Label the parts: the attention backend's forward, the engine's forward (the model and the LM head), the
    # whole engine step.
    backend = llm.engine.attention
    plain_attention, plain_forward, plain_step = backend.forward, llm.engine.forward, llm.engine.step

    def labelled(name, fn):
        def run(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return run

    backend.forward = labelled("part:attention", plain_attention)
    llm.engine.forward = labelled("part:forward", plain_forward)
    llm.engine.step = labelled("part:step", plain_step)
    uids = start_decoding(llm, prompts, new_tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_steps(llm, new_tokens)
        wall = (time.perf_counter() - start) * 1e3
    backend.forward, llm.engine.forward, llm.engine.step = plain_attention, plain_forward, plain_step
    llm.abort(uids)

    events = {e.key: e for e in prof.key_averages()}
    inclusive = lambda name: events[name].cpu_time_total / 1e3  # noqa: E731  (ms)
    steps = events["part:step"].count
    matmuls = sum(events[name].self_cpu_time_total / 1e3 for name in MATMULS if name in events)
    python_in_model = events["part:forward"].self_cpu_time_total / 1e3  # in the forward, outside every operator
    model, attention, step = inclusive("part:forward"), inclusive("part:attention"), inclusive("part:step")
    other = model - matmuls - attention - python_in_model
    parts = {"matmuls": matmuls, "attention": attention, "other tensor ops": other,
             "Python in the model": python_in_model, "sampling": step - model, "scheduler": wall - step}
    per_step = {name: ms / steps for name, ms in parts.items()}
    return {"quantization": quantization or "none (bfloat16)", "requests": requests, "steps": steps,
            "attention": "compiled" if compile_attention else "eager",
            "unprofiled_ms_per_step": unprofiled_ms,
            "profiled_ms_per_step": wall / steps, **{f"{k}_ms": v for k, v in per_step.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", nargs="+", default=["", "int8wo", "int4wo-32"])
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps measured (and profiled)")
    parser.add_argument("--requests", type=int, nargs="+", default=[1],
                        help="requests decoding together; more than 1: prompts of about 320 to 790 tokens")
    parser.add_argument("--enable-torch-compile", action="store_true",
                        help="for more than 1 request, also a row with the server's --enable-torch-compile")
    parser.add_argument("--output", type=Path, default=record.RESULTS / "step_profile.md")
    args = parser.parse_args()
    start = record.start_run("minisgl", busy_threshold=0.5)
    rows = [profile(q, args.new_tokens, n, compiled) for n in args.requests for q in args.quantization
            for compiled in ([False, True] if args.enable_torch_compile and n > 1 else [False])]
    from minisgl.default_model import default_model_path

    result = {**record.run_info("step_profile", "One decode step, part by part", start, default_model_path(),
                                packages=("torch",)), "new_tokens": args.new_tokens,
              "requests": args.requests,
              "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]}
    header = ["requests", "weights", "attention", "step ms (unprofiled)", "profiled step ms",
              *(f"{p} ms" for p in PARTS)]
    table = [[r["requests"], r["quantization"], r["attention"], f"{r['unprofiled_ms_per_step']:.1f}",
              f"{r['profiled_ms_per_step']:.1f}",
              *(f"{r[p + '_ms']:.2f} ({100 * r[p + '_ms'] / r['profiled_ms_per_step']:.0f}%)" for p in PARTS)]
             for r in result["rows"]]
    lines = [*record.opening_lines(result),
             f"- {record.versions_text(result['versions'])}; commit {result['commit']}; model {result['model']}",
             f"- {args.new_tokens} decode steps of {' and of '.join(map(str, args.requests))} requests (prefill done "
             "before the clock starts), greedy, offline API, bfloat16 activations; torch's profiler",
             f"- command: `{result['command']}`", "",
             *record.markdown_table(header, table, "l" + "r" * (len(header) - 1))]
    record.write_result(args.output, "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    main()
