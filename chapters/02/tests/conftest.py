"""Fixtures for chapter 02's tests: tiny random checkpoints, engines and schedulers, a live server process."""

from pathlib import Path

import pytest
import torch


def _perturb(model: torch.nn.Module) -> None:
    """Give every parameter distinct values (random init leaves norms at 1 and biases at 0)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.08 * noise)


def build_tiny_checkpoint(architecture: str, folder: Path, **overrides) -> Path:
    import transformers

    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=architecture != "llama",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=255, bos_token_id=1,
    ) | overrides
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


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    return build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def hf_model():
    from transformers import AutoModelForCausalLM

    return lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model_path() -> Path:
    from minisgl.default_model import require_default_model

    return require_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_scheduler(tiny_llama, tokenizer):
    """A scheduler over a tiny random model (fast; its tokens are noise, its bookkeeping is real)."""
    from minisgl.engine import Engine
    from minisgl.scheduler import Scheduler

    def make(slots=2, context_length=64, max_prefill_length=4096):
        engine = Engine(tiny_llama, "float32", "cpu", slots, context_length)
        return Scheduler(engine, tokenizer, max_running_requests=slots, max_prefill_length=max_prefill_length)

    return make


@pytest.fixture(scope="session")
def real_engine(model_path):
    """The default model in float32 with 4 slots; shared, so tests must leave every slot free."""
    from minisgl.engine import Engine

    return Engine(model_path, "float32", "cpu", num_slots=4, context_length=512)


@pytest.fixture
def real_scheduler(real_engine, tokenizer):
    from minisgl.scheduler import Scheduler

    scheduler = Scheduler(real_engine, tokenizer, max_running_requests=4, max_prefill_length=4096)
    yield scheduler
    assert len(real_engine.kv_cache.free_slots) == 4, "a test left a KV cache slot allocated"


class Collector:
    """Gathers the outputs of requests run by hand (no threads): rid -> text, tokens, finish reason."""

    def __init__(self):
        self.text, self.tokens, self.finish = {}, {}, {}

    def __call__(self, out):
        self.text[out.rid] = self.text.get(out.rid, "") + out.text
        self.tokens[out.rid] = self.tokens.get(out.rid, []) + out.token_ids
        if out.finish_reason:
            self.finish[out.rid] = out.finish_reason


@pytest.fixture
def collector():
    return Collector()


@pytest.fixture
def run_until_done():
    """Step a scheduler on this thread until every request in ``rids`` has finished."""

    def run(scheduler, collector, rids, max_steps=10_000):
        for _ in range(max_steps):
            if all(rid in collector.finish for rid in rids):
                return
            scheduler.receive(block=False)
            scheduler.step()
        raise AssertionError(f"requests did not finish in {max_steps} steps")

    return run


@pytest.fixture(scope="module")
def server(request):
    """This chapter's ``python -m minisgl`` as a process on a free port (float32, 4 slots); always stopped."""
    from server_process import TEST_SERVER_ARGS, ServerProcess

    with ServerProcess(request.config.minisgl_root, *TEST_SERVER_ARGS) as process:
        yield process
