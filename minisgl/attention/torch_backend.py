"""The ``torch`` attention backend: grouped-query attention over a paged KV cache, in plain PyTorch
(introduced in chapter 03).

Grouped-query attention (GQA) gives several query heads one shared key/value head: SmolLM2 has 9 query
heads and 3 KV heads, so each KV head serves a group of 3 query heads and the KV cache is 3x smaller
than with one KV head per query head.

Every new token's key and value is written into its page first; attention then reads each request's
whole cached sequence through its page table (``attention/paged.py`` does the work). A batch may mix:

- requests with one new token (decode): all of them attend at once (``paged_decode_attention``);
- requests with several (a prompt, a chunk of one, a prompt after a cached prefix): one by one, each
  causal with the mask aligned bottom-right (``paged_extend_attention``).

It has no CUDA graph hooks (``supports_graphs = False``): the reference runs eagerly, on any device.
With ``compile_decode`` (the server's ``--enable-torch-compile``, chapter 06) a batch of decodes of
different lengths runs ``decode_attention_formula`` through ``torch.compile`` instead: the same numbers
within float rounding, about twice as fast on a CPU, after a compilation of a few seconds on the first
such batch (inductor keeps what it compiled on disk, so a later start reads it back).
"""

from dataclasses import dataclass

import torch

from ..core import Batch
from ..kv_cache import KVCache
from . import AttentionBackend
from .paged import (
    decode_attention_formula,
    new_token_locations,
    padded_locations,
    paged_decode_attention,
    paged_extend_attention,
    store_kv,
)


@dataclass
class TorchMetadata:
    """What every layer needs to know about one batch, worked out once by ``prepare``."""

    new_locations: torch.Tensor  # [tokens] where each new token's keys and values go
    decode_rows: torch.Tensor  # [decode requests] the row of q of each request with one new token
    decode_locations: torch.Tensor | None  # [decode requests, T] their positions' locations, padded
    decode_seq_lens: torch.Tensor | None  # [decode requests]; None: all of one length, nothing to mask
    # the others: (first row in q, new tokens, cached tokens before them, locations of their whole sequence)
    extends: list[tuple[int, int, int, torch.Tensor]]


# --8<-- [start:torch-backend]
class TorchBackend(AttentionBackend):
    supports_graphs = False  # the reference runs eagerly, every step: no CUDA graph hooks

    def __init__(self, kv_cache: KVCache, compile_decode: bool = False):
        self.kv_cache = kv_cache
        self.scale = kv_cache.k.shape[-1] ** -0.5  # 1 / sqrt(head_dim)
        self.metadata: TorchMetadata | None = None
        self.mixed_decode = compiled_decode_attention() if compile_decode else paged_decode_attention

    def prepare(self, batch: Batch, positions: torch.Tensor) -> None:
        device = self.kv_cache.k.device
        # Every request's locations, once; each use below is a part of them.
        locations = padded_locations(batch.page_tables, batch.seq_lens,
                                     self.kv_cache.page_size, device)  # [requests, T]
        starts = [seq_len - new for seq_len, new in zip(batch.seq_lens, batch.new_lens)]
        decode, extends, offset = [], [], 0
        for b, (new, seq_len, start) in enumerate(zip(batch.new_lens, batch.seq_lens, starts)):
            if new == 1:
                decode.append((b, offset))
            else:
                extends.append((offset, new, start, locations[b, :seq_len]))
            offset += new
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        self.metadata = TorchMetadata(
            new_locations=as_long(new_token_locations(batch, self.kv_cache.page_size)),
            decode_rows=as_long([row for _, row in decode]),
            # cut to the longest decode request: a long prompt chunk in the batch must not widen their gather
            decode_locations=locations[as_long([b for b, _ in decode]), : max(batch.seq_lens[b] for b, _ in decode)]
            if decode else None,
            decode_seq_lens=None if len({batch.seq_lens[b] for b, _ in decode}) <= 1
            else as_long([batch.seq_lens[b] for b, _ in decode]),
            extends=extends,
        )

    def forward(self, q, k, v, layer_id: int) -> torch.Tensor:
        meta = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_id)
        store_kv(k_cache, v_cache, meta.new_locations, k, v)  # every new token into its page
        if not meta.extends:  # decodes only (one stream's every step): q's rows are theirs, in order
            return self.decode(q, k_cache, v_cache)
        out = torch.empty_like(q)
        if meta.decode_locations is not None:
            out[meta.decode_rows] = self.decode(q[meta.decode_rows], k_cache, v_cache)
        for offset, new, cached, locations in meta.extends:
            out[offset : offset + new] = paged_extend_attention(
                q[offset : offset + new], k_cache, v_cache, locations, cached, self.scale
            )
        return out

    def decode(self, q, k_cache, v_cache) -> torch.Tensor:
        """The decode requests' attention: SDPA unmasked when they are of one length, else ``mixed_decode``."""
        meta = self.metadata
        attend = paged_decode_attention if meta.decode_seq_lens is None else self.mixed_decode
        return attend(q, k_cache, v_cache, meta.decode_locations, meta.decode_seq_lens, self.scale)
# --8<-- [end:torch-backend]


# --8<-- [start:compiled-decode]
def compiled_decode_attention():
    """``decode_attention_formula`` compiled once for every batch: the number of requests and their longest
    length are marked dynamic (the kernel takes them as arguments), the heads and head size stay constants
    that inductor unrolls its loops by. Without the marks the first batch's sizes would be baked in and the
    next batch would compile again; with ``dynamic=True`` everything would be symbolic, the head size
    included, and the loops slower (measured: 2.8 against 2.2 ms a layer for 32 requests)."""
    compiled = torch.compile(decode_attention_formula)

    def attend(q, k_cache, v_cache, locations, seq_lens, scale):
        for tensor, dim in ((q, 0), (locations, 0), (locations, 1), (seq_lens, 0)):
            torch._dynamo.mark_dynamic(tensor, dim)
        return compiled(q, k_cache, v_cache, locations, seq_lens, scale)
    return attend
# --8<-- [end:compiled-decode]
