"""bfloat16 weights prepacked for oneDNN on the CPU (``layers/linear.py``'s ``prepack_for_cpu``) must change
nothing but the speed: the same logits, bit for bit, for one row (decode) and for many (a prefill)."""

import pytest
import torch

from minisgl.layers.linear import linear, prepack_for_cpu
from minisgl.models import load_model

needs_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU has no fast bfloat16 (oneDNN), so nothing is prepacked",
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_a_prepacked_weight_gives_the_same_product(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 96, generator=generator).to(torch.bfloat16)
    bias = torch.randn(300, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x, weight, bias)
    weight.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    assert torch.equal(linear(x, weight, bias), expected)


@needs_bf16
def test_a_prepacked_model_says_the_same(tiny_llama):
    plain, packed = load_model(tiny_llama, torch.bfloat16), load_model(tiny_llama, torch.bfloat16)
    # per layer qkv, o, gate_up and down; the LM head (the tiny model's embedding is not tied: not packed)
    assert prepack_for_cpu(packed) == 2 * 4 + 1
    assert prepack_for_cpu(load_model(tiny_llama, torch.float32)) == 0  # only bfloat16 is packed
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 9):
            x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
            for layer_plain, layer_packed in zip(plain.layers, packed.layers):
                assert torch.equal(layer_plain.mlp(x), layer_packed.mlp(x))
            assert torch.equal(plain.logits(x), packed.logits(x))
