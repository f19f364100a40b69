"""Model configuration read from a checkpoint's ``config.json`` (introduced in chapter 01).

Three families share one decoder; they differ only in a few switches:

==========  =====================  ======================  ====================  ===========================
family      ``architectures``      bias on q/k/v           bias on o             RMSNorm on q and k per head
==========  =====================  ======================  ====================  ===========================
Llama       LlamaForCausalLM       ``attention_bias``      ``attention_bias``    no
Qwen2       Qwen2ForCausalLM       always                  never                 no
Qwen3       Qwen3ForCausalLM       ``attention_bias``      ``attention_bias``    yes
==========  =====================  ======================  ====================  ===========================

Settings this course does not implement (RoPE scaling, MLP biases, sliding-window attention) are
refused with an error here, rather than silently giving wrong output later. So is a tensor-parallel
size that the model's heads or MLP cannot be split by (``check_tensor_parallel``).

This is the one reader of ``config.json``'s model settings: the launcher (``minisgl/config.py``) checks a
model with it before any process starts, and each scheduler builds its model from it. So the module is
plain Python with no import from the rest of the package (the launcher's config sits above the models,
and the API server, which runs the launcher, never loads torch). Which tokens end a reply is not here:
that is a fact about serving, which the launcher gathers from several files (``eos_token_ids`` there).
"""

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        architecture = (raw.get("architectures") or ["<none given>"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}: minisgl runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 keeps rope settings in `rope_parameters`; older files use `rope_theta`
        # and `rope_scaling` at the top level. Only plain RoPE is taught here.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r}: minisgl implements 'default' RoPE")
        if raw.get("mlp_bias"):
            raise ValueError("unsupported setting mlp_bias=true: minisgl's MLP has no biases")
        if raw.get("use_sliding_window"):
            raise ValueError("unsupported setting use_sliding_window=true: minisgl attends to the whole context")
        num_heads = raw["num_attention_heads"]
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=architecture == "Qwen2ForCausalLM" or raw.get("attention_bias", False),
            o_bias=architecture != "Qwen2ForCausalLM" and raw.get("attention_bias", False),
            qk_norm=architecture == "Qwen3ForCausalLM",
        )

    @classmethod
    def from_path(cls, model_path: str | Path) -> "ModelConfig":
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model folder {model_path}")
        return cls.from_dict(json.loads(config_file.read_text(encoding="utf-8")))


# --8<-- [start:check-tensor-parallel]
def tensor_parallel_problem(tp_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> str | None:
    """Why a model cannot be split across ``tp_size`` ranks, or None if it can (introduced in chapter 04).

    Every rank gets the same number of query heads and the same slice of the MLP. KV heads are split
    the same way when there are at least as many as ranks; with fewer, each is held by a group of ranks
    (replicated), which works when the ranks divide evenly among them. The vocabulary need not divide:
    the embedding and the LM head pad it (``layers/embedding.py``).
    """
    if num_heads % tp_size:
        return f"does not divide the model's {num_heads} attention heads"
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        return f"and the model's {num_kv_heads} KV heads do not divide one another"
    if intermediate_size % tp_size:
        return f"does not divide the model's {intermediate_size} MLP intermediate features"
    return None


def check_tensor_parallel(config: ModelConfig, tp_size: int) -> None:
    """Refuse a TP size the model cannot be split by, naming the numbers and the sizes that work. The launcher
    calls it before any rank starts, and each rank again when it builds the model (``load_model``)."""
    if tp_size < 1:
        raise ValueError(f"--tp-size must be at least 1, got {tp_size}")
    shape = config.num_heads, config.num_kv_heads, config.intermediate_size
    problem = tensor_parallel_problem(tp_size, *shape)
    if problem:
        sizes = [n for n in range(1, config.num_heads + 1) if tensor_parallel_problem(n, *shape) is None]
        raise ValueError(f"--tp-size {tp_size} {problem}: use a TP size the model can be split by "
                         f"({', '.join(map(str, sizes))})")
# --8<-- [end:check-tensor-parallel]
