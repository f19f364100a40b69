"""The engine: runs one batch through the model and samples each request's next token (introduced in chapter 02)."""

from .engine import Engine

__all__ = ["Engine"]
