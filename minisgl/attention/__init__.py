"""Attention backends: the attention computation over the KV cache, behind one small interface
(introduced in chapter 03).

A decoder layer's attention module (``layers/attention.py``) does what is the same everywhere:
project to q, k and v, normalize, rotate. What depends on how the KV cache is laid out, and on the
hardware, is hidden behind a backend:

- ``prepare(batch, positions)``, once per forward pass: work out what every layer will need to know
  about the batch (where each new token's key and value go, which cached positions each request may see) and
  keep it. Doing this once rather than in each of 30 layers saves work, and on a GPU it saves a wait
  for the device every time Python needs a number (``.tolist()``) from a tensor;
- ``forward(q, k, v, layer_id)``, once per layer: store the new keys and values in the cache, then
  attend over each request's cached sequence.

``torch`` (``torch_backend.py``) is written in plain PyTorch and is the reference every faster
backend is tested against; chapter 06 adds ``triton`` beside it (``triton_backend.py``), and
``make_backend`` picks one.
"""

import os
from typing import Protocol

import torch

from ..core import Batch
from .torch_backend import TorchBackend


class AttentionBackend(Protocol):
    def prepare(self, batch: Batch, positions: torch.Tensor) -> None:
        """``positions`` [tokens]: the batch's positions as a tensor, already made for the model's rotary."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [tokens, heads, d], k and v [tokens, kv_heads, d] for the batch's new tokens -> [tokens, heads, d]."""
        ...


BACKENDS = ("auto", "torch", "triton")


# --8<-- [start:make-backend]
def make_backend(name: str, kv_cache) -> AttentionBackend:
    """``auto``: ``triton`` on a GPU, ``torch`` on a CPU. ``triton`` on a CPU runs the kernels in Triton's
    interpreter: right, and far too slow to serve with, but it is how the tests check the kernels here."""
    device = kv_cache.k.device
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchBackend(kv_cache)
    if name == "triton":
        if device.type == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: import after
        from .triton_backend import TritonBackend  # triton is imported only by those who use it

        return TritonBackend(kv_cache)
    raise ValueError(f"attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
# --8<-- [end:make-backend]


__all__ = ["AttentionBackend", "BACKENDS", "TorchBackend", "make_backend"]
