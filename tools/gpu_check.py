"""Every check that needs a CUDA GPU, in one command (introduced in chapter 06): ``make gpu-check``.

On a machine with a GPU, in this order, each step's outcome printed as it ends:

1. the GPU as torch sees it;
2. chapter 06's kernel tests compiled by Triton (not interpreted), against the torch backend;
3. every test marked ``cuda`` in every chapter (the ``ranks`` tests use gloo on the CPU: CI runs them);
4. where there are 3 GPUs or more: the OpenAI contract suite against a server at TP 3 over NCCL;
5. greedy output with CUDA graphs on and off, overlap scheduling on and off, and triton against torch, through
   the offline API;
6. a short benchmark: decode tokens/s of 32 requests and of one, graphs on and off, overlap on and off, and
   transformers' ``generate`` on the same GPU as the baseline.

It stops with a non-zero status at the first failing step; ``--keep-going`` runs every step and fails at the
end instead (for a GPU lent for a few minutes, where one run must say everything). Meant to finish in a
few minutes.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAILED: list[str] = []
KEEP_GOING = False

CHECK_OUTPUTS = """
import sys, time, torch
from minisgl import LLM, SamplingParams
prompts = [f"Question {i}: name a city in Europe and say why it is famous." for i in range(32)]
params = SamplingParams(max_tokens=64, ignore_eos=True)
results = {}
runs = [("float32", "torch", False, False), ("float32", "triton", False, False), ("float32", "triton", True, False),
        ("float32", "triton", True, True), ("bfloat16", "triton", False, False), ("bfloat16", "triton", True, False),
        ("bfloat16", "triton", True, True)]
for dtype, backend, graphs, overlap in runs:
    llm = LLM(dtype=dtype, attention_backend=backend, disable_cuda_graph=not graphs,
              **{"enable_overlap_schedule" if overlap else "disable_overlap_schedule": True})
    results[dtype, backend, graphs, overlap] = [o.token_ids for o in llm.generate(prompts, params)]
    for size in (32, 1):
        batch = prompts[:size]
        llm.generate(batch, SamplingParams(max_tokens=8))  # warm-up
        torch.cuda.synchronize(); start = time.perf_counter()
        out = llm.generate(batch, SamplingParams(max_tokens=128, ignore_eos=True))
        torch.cuda.synchronize(); elapsed = time.perf_counter() - start
        print(f"{dtype:8} {backend:6} graphs {'on ' if graphs else 'off'} overlap {'on ' if overlap else 'off'} "
              f"batch {size:2}: {sum(len(o.token_ids) for o in out) / elapsed:8.1f} tok/s", flush=True)
    del llm; torch.cuda.empty_cache()
# The baseline, on the same GPU in the same run: transformers' generate, bfloat16, 128 new tokens, greedy.
from transformers import AutoModelForCausalLM, AutoTokenizer
from minisgl.default_model import require_default_model
path = require_default_model()
tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
for size in (32, 1):
    inputs = tokenizer(prompts[:size], return_tensors="pt", padding=True).to("cuda")
    for timed in (False, True):
        torch.cuda.synchronize(); start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=128 if timed else 8, min_new_tokens=128 if timed else 8,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        torch.cuda.synchronize(); elapsed = time.perf_counter() - start
    print(f"transformers generate bfloat16 batch {size:2}: {size * 128 / elapsed:8.1f} tok/s", flush=True)
same = lambda a, b: sum(x == y for x, y in zip(results[a], results[b]))
print(f"float32 triton vs torch, greedy: {same(runs[1], runs[0])}/32 identical")
graphs = [same((dtype, 'triton', True, False), (dtype, 'triton', False, False)) for dtype in ("float32", "bfloat16")]
print(f"graphs on vs off, greedy: {graphs[0]}/32 identical in float32, {graphs[1]}/32 in bfloat16")
overlap = [same((dtype, 'triton', True, True), (dtype, 'triton', True, False)) for dtype in ("float32", "bfloat16")]
print(f"overlap on vs off (graphs on), greedy: {overlap[0]}/32 identical in float32, {overlap[1]}/32 in bfloat16")
sys.exit(0 if graphs == [32, 32] and overlap == [32, 32] else 1)
"""

def step(name: str, command: list[str], env: dict | None = None, allowed: tuple[int, ...] = (0,)) -> None:
    print(f"===== {name}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}).returncode
    print(f"===== {name}: {'ok' if code in allowed else f'FAILED ({code})'} in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    if code not in allowed:
        FAILED.append(name)
        if not KEEP_GOING:
            sys.exit(code)


def gpu_count() -> int:
    out = subprocess.run([PYTHON, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                         text=True)
    return int(out.stdout.strip() or 0)


def main() -> None:
    global KEEP_GOING
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-going", action="store_true", help="run every step even after one fails")
    KEEP_GOING = parser.parse_args().keep_going
    step("the GPU", [PYTHON, "-c", "import torch; assert torch.cuda.is_available(), 'no CUDA GPU';"
                     "print(torch.cuda.get_device_name(), torch.version.cuda, torch.cuda.device_count(), 'GPUs')"])
    env = {"TRITON_INTERPRET": "0"}
    tests = [f"chapters/06/tests/{name}.py" for name in ("test_kernels", "test_triton_engine", "test_graphs",
                                                         "test_llm", "test_server_triton")]
    step("kernels, engine, offline API and server, compiled", [PYTHON, "-m", "pytest", "-q", *tests], env)
    for chapter in sorted(p.name for p in (REPO_ROOT / "chapters").iterdir() if (p / "tests").is_dir()):
        # pytest exits 5 when a chapter has no cuda-marked test: that is not a failure
        step(f"chapter {chapter}, GPU tests", [PYTHON, "-m", "pytest", "-q", "-m", "cuda", f"chapters/{chapter}"],
             env, allowed=(0, 5))
    if gpu_count() >= 3:
        step("TP 3 over NCCL, the OpenAI contract", [PYTHON, "-m", "pytest", "-q", "-x",
                                                      "chapters/06/tests/test_server_tp.py"], env)
    else:
        print(f"===== TP over NCCL: skipped, it needs 3 GPUs (found {gpu_count()})", flush=True)
    step("greedy and speed: graphs and overlap on and off", [PYTHON, "-c", CHECK_OUTPUTS], env)
    print(f"===== failed: {', '.join(FAILED)}" if FAILED else "===== every step passed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
