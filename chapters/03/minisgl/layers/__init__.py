"""The building blocks of the decoder (introduced in chapter 01)."""

from .attention import Attention
from .mlp import SwiGLU
from .norm import RMSNorm
from .rotary import RotaryEmbedding

__all__ = ["Attention", "RMSNorm", "RotaryEmbedding", "SwiGLU"]
