"""Grouped-query self-attention over a contiguous KV cache (introduced in chapter 01).

Grouped-query attention (GQA) gives several query heads one shared key/value head: SmolLM2 has 9 query
heads and 3 KV heads, so each KV head serves a group of 3 query heads and the KV cache is 3x smaller
than with one KV head per query head.

The projections q, k and v read the same input, so they are one fused ``qkv`` matrix (the loader fills
it from the checkpoint's three tensors). The new keys and values are written into the cache first;
attention then reads every cached position, so a decode step with one new token sees the whole past
without recomputing it.
"""

import torch
from torch import nn

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
    def forward(self, x, cos, sin, kv_cache: KVCache, start: int) -> torch.Tensor:
        """x [tokens, hidden] holds tokens at positions start, start + 1, ...; returns [tokens, hidden]."""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = kv_cache.layer(self.layer_id)
        out = cached_attention(q, k, v, k_cache, v_cache, start, self.scale)
        return self.o(out.reshape(tokens, self.num_heads * self.head_dim))
    # --8<-- [end:attention-forward]


# --8<-- [start:cached-attention]
def cached_attention(q, k, v, k_cache, v_cache, start: int, scale: float) -> torch.Tensor:
    """Causal GQA of new tokens against everything cached so far.

    q [n, heads, d] and k, v [n, kv_heads, d] belong to positions start .. start + n - 1.
    k_cache, v_cache [max_tokens, kv_heads, d] hold positions 0 .. start - 1 already.
    Returns [n, heads, d].
    """
    # --8<-- [start:ex-kv-attention]
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    end = start + n
    k_cache[start:end], v_cache[start:end] = k, v
    keys, values = k_cache[:end].transpose(0, 1), v_cache[:end].transpose(0, 1)  # [kv_heads, end, d]

    # Query head h uses KV head h // group, so gather each group's queries beside their KV head:
    # [kv_heads, group * n, d], row r being query token r % n of head r // n within the group.
    q = q.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * n, head_dim)
    scores = (q @ keys.transpose(1, 2)).float() * scale  # [kv_heads, group * n, end]
    if n > 1:  # one new token may see every cached position; several must not see each other's future
        query_pos = torch.arange(start, end, device=q.device).repeat(group)
        key_pos = torch.arange(end, device=q.device)
        scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    out = scores.softmax(dim=-1).to(values.dtype) @ values  # [kv_heads, group * n, d]
    return out.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
    # --8<-- [end:ex-kv-attention]
# --8<-- [end:cached-attention]
