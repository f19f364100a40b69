"""Every check that needs a CUDA GPU, in one command (introduced in chapter 06): ``make gpu-check``.

On a machine with a GPU, in this order, each step's outcome printed as it ends:

1. the GPU as torch sees it;
2. chapter 06's kernel tests compiled by Triton (not interpreted), against the torch backend;
3. every test marked ``cuda`` or ``ranks(n, backend="nccl")`` in every chapter (NCCL ones need as many GPUs);
4. greedy output with CUDA graphs on and off, and triton against torch, through the offline API;
5. a short benchmark: decode tokens/s of 32 requests and of one, graphs on and off.

It stops with a non-zero status at the first failing step. Meant to finish in a few minutes.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

CHECK_OUTPUTS = """
import sys, time, torch
from minisgl import LLM, SamplingParams
prompts = [f"Question {i}: name a city in Europe and say why it is famous." for i in range(32)]
params = SamplingParams(max_tokens=64, ignore_eos=True)
results = {}
for backend, graphs in (("torch", False), ("triton", False), ("triton", True)):
    llm = LLM(dtype="float32", attention_backend=backend, disable_cuda_graph=not graphs)
    results[backend, graphs] = [o.token_ids for o in llm.generate(prompts, params)]
    for size in (32, 1):
        batch = prompts[:size]
        llm.generate(batch, SamplingParams(max_tokens=8))  # warm-up
        torch.cuda.synchronize(); start = time.perf_counter()
        out = llm.generate(batch, SamplingParams(max_tokens=128, ignore_eos=True))
        torch.cuda.synchronize(); elapsed = time.perf_counter() - start
        print(f"{backend:6} graphs {'on ' if graphs else 'off'} batch {size:2}: "
              f"{sum(len(o.token_ids) for o in out) / elapsed:8.1f} tok/s")
    del llm; torch.cuda.empty_cache()
same = lambda a, b: sum(x == y for x, y in zip(results[a], results[b]))
print(f"triton vs torch, greedy: {same(('triton', False), ('torch', False))}/32 requests identical")
print(f"graphs on vs off, greedy: {same(('triton', True), ('triton', False))}/32 requests identical")
sys.exit(0 if same(('triton', True), ('triton', False)) == 32 else 1)
"""


def step(name: str, command: list[str], env: dict | None = None) -> None:
    print(f"===== {name}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}).returncode
    print(f"===== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {time.perf_counter() - started:.0f} s",
          flush=True)
    if code:
        sys.exit(code)


def main() -> None:
    step("the GPU", [PYTHON, "-c", "import torch; assert torch.cuda.is_available(), 'no CUDA GPU';"
                     "print(torch.cuda.get_device_name(), torch.version.cuda, torch.cuda.device_count(), 'GPUs')"])
    env = {"TRITON_INTERPRET": "0"}
    step("kernels, compiled", [PYTHON, "-m", "pytest", "-q", "-x", "chapters/06/tests/test_kernels.py",
                               "chapters/06/tests/test_triton_engine.py", "chapters/06/tests/test_graphs.py"], env)
    for chapter in sorted(p.name for p in (REPO_ROOT / "chapters").iterdir() if (p / "tests").is_dir()):
        step(f"chapter {chapter}, GPU tests", [PYTHON, "-m", "pytest", "-q", "-m", "cuda or ranks",
                                               f"chapters/{chapter}"], env)
    step("greedy and speed: graphs on and off", [PYTHON, "-c", CHECK_OUTPUTS], env)


if __name__ == "__main__":
    main()
