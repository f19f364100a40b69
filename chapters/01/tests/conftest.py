"""Fixtures for chapter 01's tests: tiny random checkpoints and the real default model."""

import shutil
from pathlib import Path

import pytest
import torch


def _perturb(model: torch.nn.Module) -> None:
    """Random init leaves norm weights at 1 and biases at 0, where a swapped norm or a dropped bias
    would go unnoticed; give every parameter distinct values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.08 * noise)


def build_tiny_checkpoint(
    architecture: str, folder: Path, tie: bool, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a randomly initialized transformers model of ``architecture`` as safetensors in ``folder``."""
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=255,
        bos_token_id=1,
    ) | overrides
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        # Qwen3 with a head_dim that is not hidden_size / heads, as in the real Qwen3 models
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=24),
    }[architecture]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model)
    if tie:
        model.tie_weights()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    return build_tiny_checkpoint


@pytest.fixture(scope="session", params=["llama", "llama-biased", "qwen2", "qwen3"])
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny random model per architecture: Llama untied (and once with attention biases, which Llama
    puts on q, k, v and o), Qwen2 (biases on q, k, v only) and Qwen3 with tied embeddings."""
    arch, _, variant = request.param.partition("-")
    overrides = {"attention_bias": True} if variant == "biased" else {}
    return build_tiny_checkpoint(arch, tmp_path_factory.mktemp(request.param), tie=arch != "llama", **overrides)


@pytest.fixture(scope="session")
def hf_model():
    """Load a checkpoint with transformers: the oracle."""
    from transformers import AutoModelForCausalLM

    return lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model_path() -> Path:
    from minisgl.default_model import require_default_model

    return require_default_model()


@pytest.fixture(scope="session")
def generator(model_path):
    """Our generator on the real default model, in float32 (the precision the oracle is compared in)."""
    from minisgl.generate import Generator

    return Generator(model_path, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture
def copy_checkpoint(tmp_path):
    """Copy a checkpoint folder somewhere it can be damaged."""

    def copy(source: Path) -> Path:
        target = tmp_path / "damaged"
        shutil.copytree(source, target)
        return target

    return copy
