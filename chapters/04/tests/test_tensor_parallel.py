"""Whole models split across ranks: the same logits and tokens as one rank, and no rank with the whole model.

Tiny random Llama (attention biases on q, k, v and o, untied), Qwen2 (biases on q, k, v; tied) and
Qwen3 (q/k norms; tied) checkpoints run at TP 2 and 4. Their 4 query heads and 2 KV heads split evenly
at TP 2 and are shared at TP 4 (two ranks per KV head); a vocabulary of 251 tokens, which neither 2 nor
4 divides, pads the last rank's block of the embedding and the LM head.
"""

from pathlib import Path

import pytest
import torch

from minisgl.core import Batch, Request, SamplingParams
from minisgl.models import ModelConfig, check_tensor_parallel
from ranks import run_ranks

PROMPTS = [[3, 17, 42, 99, 5, 250, 7], [128, 64, 77], [1, 33, 200, 9, 9, 14, 15, 16, 90, 91, 92]]


def _perturb(model: torch.nn.Module) -> None:
    """Give every parameter distinct values (random init leaves norms at 1 and biases at 0)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.08 * noise)


def build_tiny_checkpoint(architecture: str, folder: Path) -> Path:
    import transformers

    settings = dict(
        vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=architecture != "llama", attention_bias=architecture == "llama",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=250, bos_token_id=1,
    )
    config = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": lambda **kw: transformers.Qwen3Config(**kw, head_dim=24),
    }[architecture](**settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    return build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def run_requests(model_path: Path, prompts: list[list[int]], greedy_steps: int, sampled_steps: int = 0):
    """Prefill ``prompts`` in one batch, then decode them together: the logits of every greedy step, then
    the tokens of seeded sampled steps. Runs at whatever TP size this process is in."""
    from minisgl.engine import Engine

    engine = Engine(model_path, "float32", "cpu", len(prompts), 64)
    requests = [Request(str(i), prompt, SamplingParams()) for i, prompt in enumerate(prompts)]
    for slot, request in enumerate(requests):
        request.slot = slot

    def advance(tokens: list[int]) -> None:
        for request, token in zip(requests, tokens):
            request.cached_len = request.seq_len
            request.output_ids.append(token)

    logits = []
    for step in range(greedy_steps):
        logits.append(engine.forward(Batch(requests, is_prefill=step == 0)))
        advance(logits[-1].argmax(dim=-1).tolist())
    sampled = []
    for i, request in enumerate(requests):
        request.params = SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i)
        request.generator = engine.new_generator(request.params.seed)
    for _ in range(sampled_steps):
        sampled.append(engine.step(Batch(requests, is_prefill=False)))
        advance(sampled[-1])
    return logits, sampled


@torch.inference_mode()
def test_tp_1_logits_match_transformers(tiny_checkpoint):
    """The reference the ranks are held to: at TP 1 the parallel layers are the dense model."""
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    (logits,), _ = run_requests(tiny_checkpoint, PROMPTS, greedy_steps=1)
    expected = torch.stack([oracle(torch.tensor([prompt])).logits[0, -1] for prompt in PROMPTS])
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.ranks(4)
@pytest.mark.parametrize("n", [2, 4], ids=["tp2", "tp4-kv-shared"])
def test_logits_at_tp_n_equal_tp_1(tiny_checkpoint, n):
    expected, _ = run_requests(tiny_checkpoint, PROMPTS, greedy_steps=3)
    ranks = run_ranks(n, run_requests, tiny_checkpoint, PROMPTS, 3, 4)
    for r, (logits, sampled) in enumerate(ranks):
        for step, (got, want) in enumerate(zip(logits, expected)):
            assert got.shape == want.shape == (len(PROMPTS), 251)
            error = (got - want).abs().max().item()
            assert error <= 1e-5, f"TP {n}, rank {r}, step {step}: logits differ from TP 1 by up to {error:.3g}"
            assert torch.equal(got, ranks[0][0][step]), f"TP {n}: rank {r}'s logits differ from rank 0's"
        assert sampled == ranks[0][1], f"TP {n}: rank {r} sampled {sampled}, rank 0 sampled {ranks[0][1]}"


def shapes_in_a_rank(model_path: Path) -> tuple[dict, tuple]:
    from minisgl.engine import Engine

    engine = Engine(model_path, "float32", "cpu", 2, 32)
    return {name: tuple(p.shape) for name, p in engine.model.named_parameters()}, tuple(engine.kv_cache.k.shape)


@pytest.mark.ranks(4)
def test_no_rank_holds_the_whole_model(tiny_llama):
    """At TP 4 with 4 query heads and 2 KV heads: one query head and one (shared) KV head per rank."""
    d, hidden, intermediate, vocab_rows = 16, 64, 96, 63  # 63 = ceil(251 / 4)
    whole = {name: shape for name, shape in shapes_in_a_rank(tiny_llama)[0].items()}
    expected = {
        "embed.weight": (vocab_rows, hidden),
        "lm_head.weight": (vocab_rows, hidden),
        "layers.0.attn.qkv.weight": ((1 + 2 * 1) * d, hidden),  # 1 query head, its KV head's k and v
        "layers.0.attn.qkv.bias": ((1 + 2 * 1) * d,),
        "layers.0.attn.o.weight": (hidden, 1 * d),
        "layers.0.attn.o.bias": (hidden,),  # whole on every rank; only rank 0 adds it
        "layers.0.mlp.gate_up.weight": (2 * intermediate // 4, hidden),
        "layers.0.mlp.down.weight": (hidden, intermediate // 4),
        "layers.0.input_norm.weight": (hidden,),
    }
    for r, (shapes, kv_cache_shape) in enumerate(run_ranks(4, shapes_in_a_rank, tiny_llama)):
        assert shapes.keys() == whole.keys()
        for name, shape in expected.items():
            assert shapes[name] == shape, f"rank {r}: {name} has shape {shapes[name]}, expected {shape}"
        # [layers, slots, max_seq_len, kv_heads, head_dim]: one KV head, not the model's two
        assert kv_cache_shape == (2, 2, 32, 1, d), f"rank {r}'s KV cache has shape {kv_cache_shape}"
        held = sum(torch.Size(s).numel() for s in shapes.values())
        assert held < sum(torch.Size(s).numel() for s in whole.values()) / 2


def test_a_tp_size_the_model_cannot_be_split_by_is_refused_naming_the_numbers():
    smollm2 = dict(
        architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    )
    config = ModelConfig.from_dict(smollm2)
    for ok in (1, 3):
        check_tensor_parallel(config, ok)
    with pytest.raises(ValueError, match=r"--tp-size 2 does not divide the model's 9 attention heads: .*\(1, 3\)"):
        check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match=r"--tp-size 9 does not divide the model's 1536 MLP intermediate features"):
        check_tensor_parallel(config, 9)
    twelve_heads = ModelConfig.from_dict(smollm2 | dict(num_attention_heads=12, intermediate_size=96))
    with pytest.raises(ValueError, match=r"--tp-size 2 and the model's 3 KV heads do not divide one another"):
        check_tensor_parallel(twelve_heads, 2)
    check_tensor_parallel(ModelConfig.from_dict(smollm2 | dict(vocab_size=49153)), 3)  # a vocabulary is padded


def greedy_tokens(model_path: Path, prompt: list[int], count: int) -> list[int]:
    from minisgl.engine import Engine

    engine = Engine(model_path, "float32", "cpu", 1, 128)
    request = Request("r", prompt, SamplingParams())
    request.slot = 0
    for step in range(count):
        token = engine.step(Batch([request], is_prefill=step == 0))[0]
        request.cached_len = request.seq_len
        request.output_ids.append(token)
    return request.output_ids


@pytest.mark.real_model
@pytest.mark.ranks(3)
def test_the_default_model_at_tp_3_says_what_tp_1_and_transformers_say(model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    tp3 = run_ranks(3, greedy_tokens, model_path, ids, 8, timeout=300)
    tp1 = greedy_tokens(model_path, ids, 8)
    oracle = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    expected = oracle.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    # transformers stops at the end-of-turn token; our loop does not
    said = f"TP 1 said {tokenizer.decode(tp1)!r}, transformers {tokenizer.decode(expected)!r}"
    assert len(expected) >= 4 and tp1[: len(expected)] == expected, said
    for r, tokens in enumerate(tp3):
        assert tokens == tp1, f"TP 3 rank {r} said {tokenizer.decode(tokens)!r}, TP 1 {tokenizer.decode(tp1)!r}"
