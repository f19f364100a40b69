"""The ``torch`` attention backend: grouped-query attention over a KV cache of slots, in plain PyTorch
(introduced in chapter 03).

Grouped-query attention (GQA) gives several query heads one shared key/value head: SmolLM2 has 9 query
heads and 3 KV heads, so each KV head serves a group of 3 query heads and the KV cache is 3x smaller
than with one KV head per query head.

Every new token's key and value is written into its request's cache slot first; attention then reads
each request's whole cached sequence. Requests in a batch have different lengths:

- **prefill**: each request brings its whole prompt; attention runs request by request
  (``causal_attention``), each one causal within itself;
- **decode**: each request brings one token; all of them attend at once (``decode_attention``),
  each query reading its own slot, with the positions past its length masked out.
"""

from dataclasses import dataclass

import torch

from ..core import Batch
from ..kv_cache import KVCache


@dataclass
class TorchMetadata:
    """What every layer needs to know about one batch, worked out once by ``prepare``."""

    is_prefill: bool
    token_slots: torch.Tensor  # [tokens] the cache slot of each new token's request
    positions: torch.Tensor  # [tokens] each new token's position in its sequence
    slots: torch.Tensor  # [requests] each request's slot
    seq_lens: torch.Tensor  # [requests] each request's length, its new tokens included
    max_seq_len: int  # the longest of seq_lens, as a Python int
    # prefill only: (slot, first new token's row in q, new tokens, sequence length), as Python ints
    spans: list[tuple[int, int, int, int]]


# --8<-- [start:torch-backend]
class TorchBackend:
    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.scale = kv_cache.k.shape[-1] ** -0.5  # 1 / sqrt(head_dim)
        self.metadata: TorchMetadata | None = None

    def prepare(self, batch: Batch, positions: torch.Tensor) -> None:
        device = self.kv_cache.k.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        spans, offset = [], 0
        for slot, new, seq_len in zip(batch.slots, batch.new_lens, batch.seq_lens):
            spans.append((slot, offset, new, seq_len))
            offset += new
        self.metadata = TorchMetadata(
            is_prefill=batch.is_prefill,
            token_slots=as_tensor([slot for slot, _, new, _ in spans for _ in range(new)]),
            positions=positions,
            slots=as_tensor(batch.slots),
            seq_lens=as_tensor(batch.seq_lens),
            max_seq_len=max(batch.seq_lens),
            spans=spans,
        )

    def forward(self, q, k, v, layer_id: int) -> torch.Tensor:
        meta = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_id)
        k_cache[meta.token_slots, meta.positions] = k  # every new token into its request's slot
        v_cache[meta.token_slots, meta.positions] = v
        if meta.is_prefill:
            return prefill_attention(q, k_cache, v_cache, meta.spans, self.scale)
        return decode_attention(q, k_cache, v_cache, meta.slots, meta.seq_lens, meta.max_seq_len, self.scale)
# --8<-- [end:torch-backend]


# --8<-- [start:prefill-attention]
def prefill_attention(q, k_cache, v_cache, spans, scale: float) -> torch.Tensor:
    """Each request's new tokens attend causally to its own cached sequence; q is [tokens, heads, d]."""
    outputs = []
    for slot, offset, new, seq_len in spans:
        queries = q[offset : offset + new]
        outputs.append(causal_attention(queries, k_cache[slot, :seq_len], v_cache[slot, :seq_len], scale))
    return torch.cat(outputs)
# --8<-- [end:prefill-attention]


# --8<-- [start:causal-attention]
def causal_attention(q, keys, values, scale: float) -> torch.Tensor:
    """Causal GQA of one sequence's n newest tokens against all of its T tokens.

    q [n, heads, d] holds positions T - n .. T - 1; keys, values [T, kv_heads, d]. Returns [n, heads, d].
    """
    n, num_heads, head_dim = q.shape
    total, num_kv_heads = keys.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [kv_heads, T, d]
    # Query head h uses KV head h // group, so gather each group's queries beside their KV head:
    # [kv_heads, group * n, d], row r being query token r % n of head r // n within the group.
    q = q.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * n, head_dim)
    scores = (q @ keys.transpose(1, 2)).float() * scale  # [kv_heads, group * n, T]
    if n > 1:  # one new token may see every cached position; several must not see each other's future
        query_pos = torch.arange(total - n, total, device=q.device).repeat(group)
        key_pos = torch.arange(total, device=q.device)
        scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    out = scores.softmax(dim=-1).to(values.dtype) @ values  # [kv_heads, group * n, d]
    return out.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
# --8<-- [end:causal-attention]


# --8<-- [start:decode-attention]
def decode_attention(q, k_cache, v_cache, slots, seq_lens, max_seq_len: int, scale: float) -> torch.Tensor:
    """One new token per request, all requests at once.

    q [requests, heads, d]; k_cache, v_cache [slots, max_seq_len, kv_heads, d]; request b lives in
    slot ``slots[b]`` and has ``seq_lens[b]`` cached tokens (its new one included). Returns [requests, heads, d].
    """
    # --8<-- [start:ex-decode-attention]
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    # Gather every request's keys and values into a padded rectangle [requests, kv_heads, T, d].
    keys = k_cache[slots, :max_seq_len].permute(0, 2, 1, 3)
    values = v_cache[slots, :max_seq_len].permute(0, 2, 1, 3)
    q = q.view(batch, num_kv_heads, group, head_dim)  # query heads grouped under their KV head
    scores = (q @ keys.transpose(2, 3)).float() * scale  # [requests, kv_heads, group, T]
    padding = torch.arange(max_seq_len, device=q.device)[None, :] >= seq_lens[:, None]  # [requests, T]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1).to(values.dtype) @ values  # [requests, kv_heads, group, d]
    return out.reshape(batch, num_heads, head_dim)
    # --8<-- [end:ex-decode-attention]
# --8<-- [end:decode-attention]
