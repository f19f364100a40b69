"""The ``triton`` attention backend: attention over the paged KV cache with Triton kernels (introduced in
chapter 06).

The same interface as ``torch_backend.py``, and the same answers: the kernels (``kernels/``) read each
request's keys and values from its pages where they lie, instead of gathering a padded copy per layer.

- ``prepare`` works out the batch's metadata once: where the new tokens go
  (``paged.new_token_locations``), the page table as an int32 tensor [requests, pages] padded with the
  spare page, and the lengths the kernels need, sent to the device in one copy; the largest lengths stay
  Python ints, so that the kernels' grids are known without reading anything back from the GPU;
- ``forward`` stores the new keys and values (``store_kv``), then runs the decode kernel when every
  request has one new token, and the extend kernel otherwise (a decode token is an extend of one, so
  a mixed batch needs one launch, not two);
- the graph hooks (``supports_graphs = True``): a CUDA graph of decode steps (``engine/graphs.py``)
  reads the same metadata from buffers allocated once (``init_graph_buffers``). ``prepare_for_capture``
  points the backend at their first rows, with the decode kernel's grid sized for the whole context,
  and ``prepare_for_replay`` copies each step's metadata into them, device to device.
"""

from dataclasses import dataclass, replace
from itertools import accumulate, chain

import torch

from ..core import SPARE_PAGE, Batch, pages_for
from ..kernels import paged_decode, paged_extend, store_kv
from ..kv_cache import KVCache
from . import AttentionBackend
from .paged import new_token_locations


@dataclass
class TritonMetadata:
    new_locations: torch.Tensor  # [tokens] int32: where each new token's keys and values go
    page_table: torch.Tensor  # [requests, pages] int32, padded with the spare page
    seq_lens: torch.Tensor  # [requests] int32, new tokens included
    new_lens: torch.Tensor | None  # [requests] int32 (None in a CUDA graph: decode only)
    q_starts: torch.Tensor | None  # [requests] int32: each request's first row in q
    all_decode: bool
    max_seq_len: int
    max_new: int


def to_device(lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Lists of ints as int32 tensors on ``device``, in one copy; on a GPU an asynchronous one, from pinned
    memory (a tensor made from a list straight on the GPU is a copy that waits, one per list)."""
    host = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.int32, pin_memory=device.type == "cuda")
    return list(host.to(device, non_blocking=True).split([len(values) for values in lists]))


# --8<-- [start:triton-backend]
class TritonBackend(AttentionBackend):
    supports_graphs = True

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.scale = kv_cache.k.shape[-1] ** -0.5
        self.metadata: TritonMetadata | None = None
        self.graph_buffers: TritonMetadata | None = None  # init_graph_buffers

    def prepare(self, batch: Batch, positions: torch.Tensor) -> None:
        page_size = self.kv_cache.page_size
        rows = batch.page_tables
        width = max(len(row) for row in rows)
        table = [page for row in rows for page in row + [SPARE_PAGE] * (width - len(row))]
        new_locations, table, seq_lens, new_lens, q_starts = to_device(
            [new_token_locations(batch, page_size), table, batch.seq_lens, batch.new_lens,
             [0, *accumulate(batch.new_lens)][:-1]], self.kv_cache.k.device)
        self.metadata = TritonMetadata(
            new_locations, table.view(len(rows), width), seq_lens, new_lens, q_starts,
            all_decode=all(new == 1 for new in batch.new_lens),
            max_seq_len=max(batch.seq_lens),
            max_new=max(batch.new_lens),
        )

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

    # --8<-- [start:graph-hooks]
    def init_graph_buffers(self, max_batch_size: int, max_seq_len: int) -> None:
        device, page_size = self.kv_cache.k.device, self.kv_cache.page_size
        as_int32 = dict(dtype=torch.int32, device=device)
        self.graph_buffers = TritonMetadata(  # filled like dummy requests: all on the spare page
            new_locations=torch.full((max_batch_size,), SPARE_PAGE * page_size, **as_int32),
            page_table=torch.full((max_batch_size, pages_for(max_seq_len, page_size)), SPARE_PAGE, **as_int32),
            seq_lens=torch.ones(max_batch_size, **as_int32),
            new_lens=None, q_starts=None, all_decode=True, max_seq_len=max_seq_len, max_new=1,
        )

    def prepare_for_capture(self, size: int) -> None:
        buffers = self.graph_buffers  # the decode kernel's grid: max_seq_len, the whole context
        self.metadata = replace(buffers, new_locations=buffers.new_locations[:size],
                                page_table=buffers.page_table[:size], seq_lens=buffers.seq_lens[:size])

    def prepare_for_replay(self, page_table: torch.Tensor, seq_lens: torch.Tensor,
                           new_locations: torch.Tensor) -> None:
        buffers, (size, width) = self.graph_buffers, page_table.shape
        if width > buffers.page_table.shape[1]:
            raise ValueError(f"a request of {width} pages in a graph made for {buffers.page_table.shape[1]}")
        # Columns past `width` keep earlier steps' pages: no request reads them, for the kernel reads a
        # request's page table only up to its length, and its own pages cover that.
        buffers.page_table[:size, :width].copy_(page_table)
        buffers.seq_lens[:size].copy_(seq_lens)
        buffers.new_locations[:size].copy_(new_locations)
    # --8<-- [end:graph-hooks]
