"""The decoder against transformers, on tiny random Llama, Qwen2 and Qwen3 checkpoints."""

import pytest
import torch

from minisgl.layers.attention import cached_attention
from minisgl.layers.rotary import RotaryEmbedding, apply_rotary
from minisgl.models import ModelConfig, load_model

PROMPT = torch.tensor([3, 17, 42, 99, 5, 250, 7, 128, 64, 1, 33, 200])


@pytest.mark.exercise("rope", "kv-attention")
@torch.inference_mode()
def test_full_sequence_logits_match_transformers(tiny_checkpoint, hf_model):
    ours = load_model(tiny_checkpoint, torch.float32)
    expected = hf_model(tiny_checkpoint)(PROMPT[None]).logits[0]
    actual = ours.logits(ours(PROMPT, 0, ours.new_kv_cache(len(PROMPT))))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-4


@pytest.mark.exercise("kv-attention")
@torch.inference_mode()
def test_prefill_then_decode_matches_full_recompute(tiny_checkpoint):
    model = load_model(tiny_checkpoint, torch.float32)
    full = model.logits(model(PROMPT, 0, model.new_kv_cache(len(PROMPT))))
    cache, split = model.new_kv_cache(len(PROMPT)), 5
    steps = [model.logits(model(PROMPT[:split], 0, cache))]
    for position in range(split, len(PROMPT)):
        steps.append(model.logits(model(PROMPT[position : position + 1], position, cache)))
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, make_tiny_checkpoint):
    single = make_tiny_checkpoint("qwen2", tmp_path / "single", tie=False)
    sharded = make_tiny_checkpoint("qwen2", tmp_path / "sharded", tie=False, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_model(single), load_model(sharded)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_config_reads_each_family(tiny_checkpoint):
    config = ModelConfig.from_path(tiny_checkpoint)
    family = config.architecture
    assert config.qkv_bias == (family == "Qwen2ForCausalLM" or config.o_bias)
    assert config.qk_norm == (family == "Qwen3ForCausalLM")
    assert config.head_dim == (24 if family == "Qwen3ForCausalLM" else 16)
    assert config.tie_word_embeddings == (family != "LlamaForCausalLM")


@pytest.mark.exercise("rope")
def test_apply_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    tokens, heads, head_dim = 7, 3, 16
    q, k = torch.randn(tokens, heads, head_dim), torch.randn(tokens, heads, head_dim)
    positions = torch.tensor([0, 1, 2, 10, 11, 50, 99])
    rope = RotaryEmbedding(head_dim, theta=10000.0, max_positions=128)
    cos, sin = rope(positions)
    # transformers wants full-width cos/sin ([tokens, head_dim], both halves equal) and heads first
    full_cos, full_sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos, full_sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), expected_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), expected_k[0].transpose(0, 1))


@pytest.mark.exercise("rope")
def test_rotation_keeps_length_and_depends_on_relative_position():
    torch.manual_seed(1)
    rope = RotaryEmbedding(16, theta=10000.0, max_positions=64)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(q_pos, k_pos):
        qr = apply_rotary(q, *rope(torch.tensor([q_pos])))
        kr = apply_rotary(k, *rope(torch.tensor([k_pos])))
        return (qr * kr).sum()

    torch.testing.assert_close(apply_rotary(q, *rope(torch.tensor([9]))).norm(), q.norm())
    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.exercise("kv-attention")
@pytest.mark.parametrize("start, new_tokens", [(0, 6), (4, 3), (9, 1)])
def test_cached_attention_matches_sdpa(start, new_tokens):
    torch.manual_seed(2)
    heads, kv_heads, d, capacity = 6, 2, 8, 16
    total = start + new_tokens
    q_all = torch.randn(total, heads, d)
    k_all, v_all = torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)
    k_cache, v_cache = torch.zeros(capacity, kv_heads, d), torch.zeros(capacity, kv_heads, d)
    k_cache[:start], v_cache[:start] = k_all[:start], v_all[:start]  # the past, already cached

    out = cached_attention(q_all[start:], k_all[start:], v_all[start:], k_cache, v_cache, start, d**-0.5)

    expected = torch.nn.functional.scaled_dot_product_attention(
        q_all.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)[start:]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(k_cache[:total], k_all)  # the new keys and values were cached
    torch.testing.assert_close(v_cache[:total], v_all)
