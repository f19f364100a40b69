"""Grouped-query self-attention over the KV cache, for a batch of requests (introduced in chapter 01).

Grouped-query attention (GQA) gives several query heads one shared key/value head: SmolLM2 has 9 query
heads and 3 KV heads, so each KV head serves a group of 3 query heads and the KV cache is 3x smaller
than with one KV head per query head.

The projections q, k and v read the same input, so they are one fused ``qkv`` matrix (the loader fills
it from the checkpoint's three tensors). Every new token's key and value is written into its request's
cache slot first; attention then reads each request's whole cached sequence.

Chapter 02 runs many requests at once, and they have different lengths:

- **prefill**: each request brings its whole prompt; attention runs request by request
  (``causal_attention``), each one causal within itself;
- **decode**: each request brings one token; all of them attend at once (``decode_attention``),
  each query reading its own slot, with the positions past its length masked out.
"""

import torch
from torch import nn

from ..batch import Batch
from ..kv_cache import KVCache
from .norm import RMSNorm
from .rotary import apply_rotary


# --8<-- [start:attention-init]
class Attention(nn.Module):
    def __init__(
        self,
        layer_id: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm_eps: float | None,
    ):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv = nn.Linear(hidden_size, q_size + 2 * kv_size, bias=qkv_bias)
        self.o = nn.Linear(q_size, hidden_size, bias=o_bias)
        # Qwen3 normalizes each head of q and k before the rotation, which keeps logits tame.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
    # --8<-- [end:attention-init]

    # --8<-- [start:attention-forward]
    def forward(self, x, cos, sin, kv_cache: KVCache, batch: Batch) -> torch.Tensor:
        """x [tokens, hidden] holds the batch's new tokens end to end; returns [tokens, hidden]."""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = kv_cache.layer(self.layer_id)
        k_cache[batch.token_slots, batch.positions] = k  # every new token into its request's slot
        v_cache[batch.token_slots, batch.positions] = v
        if batch.is_prefill:
            out = prefill_attention(q, k_cache, v_cache, batch, self.scale)
        else:
            out = decode_attention(q, k_cache, v_cache, batch.slots, batch.seq_lens, batch.max_seq_len, self.scale)
        return self.o(out.reshape(tokens, self.num_heads * self.head_dim))
    # --8<-- [end:attention-forward]


# --8<-- [start:prefill-attention]
def prefill_attention(q, k_cache, v_cache, batch: Batch, scale: float) -> torch.Tensor:
    """Each request's new tokens attend causally to its own cached sequence; q is [tokens, heads, d]."""
    outputs, offset = [], 0
    for slot, seq_len, new in zip(batch.slots.tolist(), batch.seq_lens.tolist(), batch.new_lens):
        queries = q[offset : offset + new]
        outputs.append(causal_attention(queries, k_cache[slot, :seq_len], v_cache[slot, :seq_len], scale))
        offset += new
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
