"""``--enable-torch-compile``: the torch backend's decodes of mixed lengths through ``torch.compile``.

``decode_attention_formula`` must be ``paged_decode_attention`` written another way (checked eagerly, on small
sizes); compiled, it must give the same numbers, compile once for batches of any size and length (the
dynamic marks), and leave the greedy tokens of the real model as they were. Compiling needs a C++ compiler:
without one those tests are skipped, and say so.
"""

import shutil

import pytest
import torch

from minisgl.attention import make_backend
from minisgl.attention.paged import decode_attention_formula, padded_locations, paged_decode_attention
from minisgl.attention.torch_backend import TorchBackend
from minisgl.core import Batch, Request, SamplingParams
from minisgl.kv_cache import KVCache

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="torch.compile on a CPU writes C++ and needs a compiler (c++ or g++)")
PAGE = 4


def random_decode(heads: int, kv_heads: int, lengths: list[int], seed: int = 0):
    """A cache of random keys and values, pages handed out in a shuffled order, and one query per request."""
    generator = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(64 * PAGE, kv_heads, 16, generator=generator) for _ in range(2))
    pages = (torch.randperm(63, generator=generator) + 1).tolist()  # page 0 is the spare
    rows = []
    for length in lengths:
        needed = -(-length // PAGE)
        rows.append(pages[:needed])
        pages = pages[needed:]
    q = torch.randn(len(lengths), heads, 16, generator=generator)
    return q, k_cache, v_cache, rows


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 1), (2, 2)], ids=["gqa", "one-kv-head", "mha"])
def test_the_decode_formula_is_paged_decode_attention(heads, kv_heads):
    lengths = [9, 3, 14, 1]  # mixed, not multiples of the page size, one of a single token
    q, k_cache, v_cache, rows = random_decode(heads, kv_heads, lengths)
    locations = padded_locations(rows, lengths, PAGE)
    seq_lens = torch.tensor(lengths)
    expected = paged_decode_attention(q, k_cache, v_cache, locations, seq_lens, 0.25)
    torch.testing.assert_close(decode_attention_formula(q, k_cache, v_cache, locations, seq_lens, 0.25), expected)


def decode_batch(rows: list[list[int]], lengths: list[int]) -> Batch:
    requests = [Request(f"r{i}", list(range(length - 1)), SamplingParams(), pages=row)
                for i, (row, length) in enumerate(zip(rows, lengths))]
    for request in requests:
        request.cached_len, request.output_ids = len(request.prompt_ids), [5]
    return Batch(requests, [1] * len(requests))


@needs_compiler
def test_compiled_decode_gives_the_eager_result_and_compiles_once_for_every_batch():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a compilation of an earlier test must not be counted as this one's
    for lengths in ([9, 3, 14, 6], [5, 22, 11], [2, 7]):  # other sizes, other longest lengths
        q, k_cache, v_cache, rows = random_decode(4, 2, lengths, seed=len(lengths))
        eager, compiled = (TorchBackend(KVCache(1, 64, PAGE, 2, 16, torch.float32, "cpu"), compile_decode=flag)
                           for flag in (False, True))
        outputs = []
        for backend in (eager, compiled):
            backend.kv_cache.k[0].copy_(k_cache)
            backend.kv_cache.v[0].copy_(v_cache)
            backend.prepare(decode_batch(rows, lengths), torch.tensor([n - 1 for n in lengths]))
            new_k, new_v = k_cache[:len(lengths)].clone(), v_cache[:len(lengths)].clone()  # this step's own
            outputs.append(backend.forward(q, new_k, new_v, 0))
        torch.testing.assert_close(outputs[1], outputs[0])
    assert counters["stats"]["unique_graphs"] == 1, "one compilation should serve batches of every size and length"


def test_the_flag_is_refused_with_the_triton_backend():
    cache = KVCache(1, 8, PAGE, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="--enable-torch-compile compiles the torch attention backend"):
        make_backend("triton", cache, compile_decode=True)


@pytest.mark.real_model
@needs_compiler
def test_the_real_model_says_the_same_with_compiled_attention(model_path):
    """Three prompts of different lengths decode together: every step has decodes of mixed lengths."""
    from minisgl import LLM

    prompts = ["Name a color.", "Write a short poem about the sea and the wind over the waves at night.",
               "What is two plus two? Answer with one word, then explain why in a sentence."]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    replies = [[c.token_ids for c in LLM(model_path, dtype="float32", enable_torch_compile=flag).generate(prompts,
                                                                                                          params)]
               for flag in (False, True)]
    assert replies[1] == replies[0]
