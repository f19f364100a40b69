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
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import check_tp_size

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
    eos_token_ids: tuple[int, ...]

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
        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
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
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_path(cls, model_path: str | Path) -> "ModelConfig":
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model folder {model_path}")
        raw = json.loads(config_file.read_text())
        # Chat models often list extra end ids in generation_config.json (Qwen's <|endoftext|>, say).
        generation_file = Path(model_path) / "generation_config.json"
        if generation_file.is_file():
            extra = json.loads(generation_file.read_text()).get("eos_token_id")
            extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
            eos = raw.get("eos_token_id")
            eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
            raw["eos_token_id"] = list(dict.fromkeys(eos + extra))
        return cls.from_dict(raw)


# --8<-- [start:check-tensor-parallel]
def check_tensor_parallel(config: ModelConfig, tp_size: int) -> None:
    """Refuse a TP size the model cannot be split by (the launcher checks the same, before any rank starts)."""
    check_tp_size(tp_size, config.num_heads, config.num_kv_heads, config.intermediate_size)
# --8<-- [end:check-tensor-parallel]
