"""Fixtures for chapter 03's tests: a real multi-process server, and the pieces it is made of."""

import os
from pathlib import Path

import pytest
import torch
from processes import ServerProcess


@pytest.fixture(scope="session")
def start_server(request):
    """Start servers of this chapter's code; each is stopped at the end, even when a test fails."""
    started = []

    def start(*args) -> ServerProcess:
        server = ServerProcess(request.config.minisgl_root, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="session")
def model_path() -> Path:
    from minisgl.default_model import require_default_model

    return require_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.08 * noise)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama: the scheduler's bookkeeping is real, its tokens are noise."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=255, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_scheduler(tiny_llama):
    from minisgl.engine import Engine
    from minisgl.scheduler import Scheduler

    def make(slots=2, max_prefill_length=4096):
        engine = Engine(tiny_llama, "float32", "cpu", slots, 64)
        return Scheduler(engine, slots, max_prefill_length, eos_ids={255})

    return make


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
