"""The contiguous KV cache of one sequence (introduced in chapter 01).

Attention needs the keys and values of every earlier token. Recomputing them at each step would make
generating n tokens cost O(n^2) projections; keeping them costs memory instead. The cache is allocated
once, for the longest sequence we will run, as two tensors [layers, max_tokens, kv_heads, head_dim]:
position p of layer l lives at ``k[l, p]`` and ``v[l, p]``.
"""

import torch


class KVCache:
    def __init__(self, num_layers: int, max_tokens: int, num_kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, max_tokens, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_tokens = max_tokens

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value caches of one layer, [max_tokens, kv_heads, head_dim] each (views)."""
        return self.k[layer_id], self.v[layer_id]
