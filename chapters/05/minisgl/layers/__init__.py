"""The building blocks of the decoder (introduced in chapter 01)."""

from .attention import Attention
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    Shard,
    kv_head_shard,
    whole,
)
from .mlp import SwiGLU
from .norm import RMSNorm
from .rotary import RotaryEmbedding

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "Shard",
    "SwiGLU",
    "VocabParallelEmbedding",
    "kv_head_shard",
    "whole",
]
