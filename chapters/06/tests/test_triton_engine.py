"""The engine with ``--attention-backend triton`` against ``torch``: the same greedy tokens.

A tiny random Llama (2 layers, 4 query heads on 2 KV heads) runs through the scheduler with each backend:
prompts that share a prefix (so that later ones start after cached pages), a prompt longer than the
prefill chunk (so that chunks mix with decode tokens in one batch), and enough new tokens to decode past
a page boundary. On a CPU the kernels run in Triton's interpreter.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is available on Linux only: its kernels cannot run here")

from minisgl.core import SamplingParams
from minisgl.engine import Engine
from minisgl.messages import UserRequest, pack_ids
from minisgl.scheduler import Scheduler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY_EOS = 255


def greedy_replies(model_path, backend: str) -> dict[str, list[int]]:
    engine = Engine(model_path, "float32", DEVICE, 41, 4, 128, attention_backend=backend)
    scheduler = Scheduler(engine, 4, 12, {TINY_EOS}, "radix")
    shared = list(range(3, 23))  # 20 tokens: 5 pages of 4, cached after the first request's prefill
    prompts = {
        "first": shared + [30, 31],
        "long": list(range(40, 70)),  # 30 tokens: three chunks of at most 12
        "second": shared + [50, 51, 52],
    }
    replies: dict[str, list[int]] = {uid: [] for uid in prompts}
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    scheduler.handle(UserRequest("first", pack_ids(prompts["first"]), params))
    for step in range(60):
        if step == 2:  # after the first prompt is in the tree
            for uid in ("long", "second"):
                scheduler.handle(UserRequest(uid, pack_ids(prompts[uid]), params))
        output = scheduler.step()
        if output is not None:
            for out in output.outputs:
                if out.token >= 0:
                    replies[out.uid].append(out.token)
        if step > 2 and not scheduler.has_work:
            break
    assert scheduler.prefix_hits >= 20, "the second prompt should have started after the shared, cached pages"
    return replies


def test_triton_backend_says_what_torch_says(tiny_llama):
    expected = greedy_replies(tiny_llama, "torch")
    assert all(len(tokens) == 7 for tokens in expected.values()), expected
    assert greedy_replies(tiny_llama, "triton") == expected


def test_auto_picks_torch_on_a_cpu_and_triton_on_a_gpu(tiny_llama):
    engine = Engine(tiny_llama, "float32", DEVICE, 41, 4, 128, attention_backend="auto")
    assert type(engine.attention).__name__ == ("TritonBackend" if DEVICE == "cuda" else "TorchBackend")
    with pytest.raises(ValueError, match="choose one of auto, torch, triton"):
        Engine(tiny_llama, "float32", DEVICE, 41, 4, 128, attention_backend="flash")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels are compiled: no interpreter to ask for")
def test_triton_on_a_cpu_asks_for_the_interpreter_and_leaves_the_environment_alone(monkeypatch):
    """``make_backend`` is a library call: it never sets ``TRITON_INTERPRET`` itself, it says what to set."""
    from minisgl.attention import make_backend
    from minisgl.kv_cache import KVCache

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cache = KVCache(1, 4, 4, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 .* or choose the attention backend torch"):
        make_backend("triton", cache)
    assert "TRITON_INTERPRET" not in os.environ
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(make_backend("triton", cache)).__name__ == "TritonBackend"
