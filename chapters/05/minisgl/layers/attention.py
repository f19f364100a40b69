"""The attention block of a decoder layer: projections, per-head norms and rotary (introduced in chapter 01).

The projections q, k and v read the same input, so they are one fused ``qkv`` matrix (the loader fills
it from the checkpoint's three tensors). After rotating q and k, the block hands them, with v, to the
attention backend (``minisgl/attention/``), which stores the new keys and values in the KV cache and
attends over each request's cached sequence. What stays here is the same whatever the backend.

With tensor parallelism each rank holds some of the heads (``qkv`` is column-parallel, split by heads),
attends with those alone, and the output projection ``o`` (row-parallel) sums the ranks' parts. The
constructor takes the model's head counts; ``self.num_heads`` and ``self.num_kv_heads`` are this rank's.
"""

import torch
from torch import nn

from ..attention import AttentionBackend
from .linear import QKVParallelLinear, RowParallelLinear
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
        self.qkv = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        # this rank's heads, and the sizes of its q, k and v within the fused output
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv.num_heads, self.qkv.num_kv_heads, head_dim
        self.split_sizes = self.qkv.split_sizes
        self.o = RowParallelLinear(num_heads * head_dim, hidden_size, bias=o_bias)
        # Qwen3 normalizes each head of q and k before the rotation, which keeps logits tame.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
    # --8<-- [end:attention-init]

    # --8<-- [start:attention-forward]
    def forward(self, x, cos, sin, attention: AttentionBackend) -> torch.Tensor:
        """x [tokens, hidden] holds the batch's new tokens end to end; returns [tokens, hidden]."""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention.forward(q, k, v, self.layer_id)
        return self.o(out.reshape(tokens, self.num_heads * self.head_dim))
    # --8<-- [end:attention-forward]
