"""Attention backends: the attention computation over the KV cache, behind one small interface
(introduced in chapter 03; the graph hooks in chapter 06).

A decoder layer's attention module (``layers/attention.py``) does what is the same everywhere:
project to q, k and v, normalize, rotate. What depends on how the KV cache is laid out, and on the
hardware, is hidden behind a backend, an ``AttentionBackend``:

- ``prepare(batch, positions)``, once per forward pass: work out what every layer will need to know
  about the batch (where each new token's key and value go, which cached positions each request may see) and
  keep it. Doing this once rather than in each of 30 layers saves work, and on a GPU it saves a wait
  for the device every time Python needs a number (``.tolist()``) from a tensor;
- ``forward(q, k, v, layer_id)``, once per layer: store the new keys and values in the cache, then
  attend over each request's cached sequence;
- the **graph hooks**, for CUDA graphs of decode steps (``engine/graphs.py``), where a step is recorded
  once and replayed without Python: ``init_graph_buffers`` allocates device buffers for the batch's
  metadata, ``prepare_for_capture`` points the backend at them, and ``prepare_for_replay`` fills them
  before each replay. Only a backend whose ``supports_graphs`` is true has them.

``torch`` (``torch_backend.py``) is written in plain PyTorch and is the reference every faster
backend is tested against; it runs eagerly and has no graph hooks. Chapter 06 adds ``triton``
(``triton_backend.py``), which has them, and ``make_backend`` picks one. The interface is a smaller
cousin of mini-sglang's ``BaseAttnBackend`` (``prepare_metadata``, ``init_capture_graph``,
``prepare_for_capture``, ``prepare_for_replay``) and of SGLang's attention backends.
"""

import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..core import Batch


# --8<-- [start:backend-interface]
class AttentionBackend(ABC):
    supports_graphs: ClassVar[bool] = False  # whether the graph hooks below work: engine/graphs.py asks

    @abstractmethod
    def prepare(self, batch: Batch, positions: torch.Tensor) -> None:
        """Once per forward pass, run eagerly. ``positions`` [tokens]: the batch's positions as a tensor,
        already made for the model's rotary."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [tokens, heads, d], k and v [tokens, kv_heads, d] for the batch's new tokens -> [tokens, heads, d]."""

    # The graph hooks: a captured decode step reads its batch from device buffers that stay put.
    def init_graph_buffers(self, max_batch_size: int, max_seq_len: int) -> None:
        """Once, before any capture: allocate the buffers a decode step of up to ``max_batch_size`` requests
        of up to ``max_seq_len`` tokens reads its batch from."""
        raise NotImplementedError(f"{type(self).__name__} has no CUDA graphs (supports_graphs is False)")

    def prepare_for_capture(self, size: int) -> None:
        """Instead of ``prepare``, before capturing the graph of ``size`` requests: read the batch from the
        first ``size`` rows of those buffers, whatever they hold, and size every kernel's grid for
        ``max_seq_len``, so that one recording serves every batch of that size."""
        raise NotImplementedError(f"{type(self).__name__} has no CUDA graphs (supports_graphs is False)")

    def prepare_for_replay(self, page_table: torch.Tensor, seq_lens: torch.Tensor,
                           new_locations: torch.Tensor) -> None:
        """Instead of ``prepare``, before each replay: copy this decode step's batch, padded to the graph's
        size with dummy requests and already on the device, into the buffers, with no wait for the device.
        ``page_table`` [size, width]: each request's pages, padded with the spare page to the widest of
        them; ``seq_lens`` [size]; ``new_locations`` [size], from ``paged.new_token_locations``."""
        raise NotImplementedError(f"{type(self).__name__} has no CUDA graphs (supports_graphs is False)")
# --8<-- [end:backend-interface]


BACKENDS = ("auto", "torch", "triton")


# --8<-- [start:make-backend]
def make_backend(name: str, kv_cache, compile_decode: bool = False) -> AttentionBackend:
    """``auto``: ``triton`` on a GPU, ``torch`` on a CPU. ``triton`` on a CPU runs the kernels in Triton's
    interpreter: right, and far too slow to serve with, but it is how the tests check the kernels here.
    The interpreter is switched on by ``TRITON_INTERPRET=1`` in the environment when the kernels are
    imported, so it is the caller's to set (the tests' ``conftest.py`` does): a library call leaves the
    process's environment alone. ``compile_decode``: the torch backend's decodes of mixed lengths through
    ``torch.compile`` (``--enable-torch-compile``); the triton backend has kernels of its own."""
    device = kv_cache.k.device
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(kv_cache, compile_decode)
    if compile_decode:
        raise ValueError(f"--enable-torch-compile compiles the torch attention backend's decode attention; "
                         f"the {name} backend has kernels of its own: choose --attention-backend torch, "
                         "or leave the flag out")
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention backend triton on a CPU runs the kernels in Triton's interpreter: set "
                             "TRITON_INTERPRET=1 in the environment before starting (for tests: far too slow to "
                             "serve with), or choose the attention backend torch, the CPU's default")
        from .triton_backend import TritonBackend  # triton is imported only by those who use it

        return TritonBackend(kv_cache)
    raise ValueError(f"attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
# --8<-- [end:make-backend]


__all__ = ["AttentionBackend", "BACKENDS", "make_backend"]
