"""The ``triton`` attention backend: attention over the paged KV cache with Triton kernels (introduced in
chapter 06).

The same interface as ``torch_backend.py``, and the same answers: the kernels (``kernels/``) read each
request's keys and values from its pages where they lie, instead of gathering a padded copy per layer.

- ``prepare`` builds the batch's page table once, as an int32 tensor [requests, pages] padded with the
  spare page, with the lengths the kernels need; the largest lengths stay Python ints, so that the
  kernels' grids are known without reading anything back from the GPU;
- ``forward`` stores the new keys and values (``store_kv``), then runs the decode kernel when every
  request has one new token, and the extend kernel otherwise (a decode token is an extend of one, so
  a mixed batch needs one launch, not two).
"""

from dataclasses import dataclass
from itertools import accumulate

import torch

from ..core import SPARE_PAGE, Batch
from ..kernels import paged_decode, paged_extend, store_kv
from ..kv_cache import KVCache
from .paged import token_locations


@dataclass
class TritonMetadata:
    new_locations: torch.Tensor  # [tokens] where each new token's keys and values go
    page_table: torch.Tensor  # [requests, pages] int32, padded with the spare page
    seq_lens: torch.Tensor  # [requests] int32, new tokens included
    new_lens: torch.Tensor | None  # [requests] int32 (None in a CUDA graph: decode only)
    q_starts: torch.Tensor | None  # [requests] int32: each request's first row in q
    all_decode: bool
    max_seq_len: int
    max_new: int


# --8<-- [start:triton-backend]
class TritonBackend:
    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.scale = kv_cache.k.shape[-1] ** -0.5
        self.metadata: TritonMetadata | None = None

    def prepare(self, batch: Batch, positions: torch.Tensor) -> None:
        device, page_size = self.kv_cache.k.device, self.kv_cache.page_size
        rows = [request.pages for request in batch.requests]
        width = max(len(row) for row in rows)
        as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        cached = [seq_len - new for seq_len, new in zip(batch.seq_lens, batch.new_lens)]
        self.metadata = TritonMetadata(
            new_locations=token_locations(rows, batch.seq_lens, page_size, cached, device=device),
            page_table=as_int32([row + [SPARE_PAGE] * (width - len(row)) for row in rows]),
            seq_lens=as_int32(batch.seq_lens),
            new_lens=as_int32(batch.new_lens),
            q_starts=as_int32([0, *accumulate(batch.new_lens)][:-1]),
            all_decode=all(new == 1 for new in batch.new_lens),
            max_seq_len=max(batch.seq_lens),
            max_new=max(batch.new_lens),
        )

    def use_static(self, page_table: torch.Tensor, seq_lens: torch.Tensor, new_locations: torch.Tensor,
                   max_seq_len: int) -> None:
        """For a CUDA graph of decode steps (``engine/graphs.py``): read the batch from these buffers, which
        the graph runner refills before each replay; the decode kernel's grid covers ``max_seq_len``."""
        self.metadata = TritonMetadata(new_locations, page_table, seq_lens, None, None, all_decode=True,
                                       max_seq_len=max_seq_len, max_new=1)

    def forward(self, q, k, v, layer_id: int) -> torch.Tensor:
        meta, page_size = self.metadata, self.kv_cache.page_size
        k_cache, v_cache = self.kv_cache.layer(layer_id)
        store_kv(k_cache, v_cache, meta.new_locations, k, v)
        if meta.all_decode:
            return paged_decode(q, k_cache, v_cache, meta.page_table, meta.seq_lens, page_size, self.scale,
                                meta.max_seq_len)
        return paged_extend(q, k_cache, v_cache, meta.page_table, meta.q_starts, meta.new_lens, meta.seq_lens,
                            page_size, self.scale, meta.max_new)
# --8<-- [end:triton-backend]
