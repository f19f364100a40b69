"""The KV cache's storage: a pool of pages (introduced in chapter 01).

Attention needs the keys and values of every earlier token, for every request the engine is running.
The cache is one pool of ``num_pages`` pages of ``page_size`` tokens, allocated once, for each layer
a tensor [num_pages * page_size, kv_heads, head_dim] ("token-major": a token's keys are one row). A
request's page table (``Request.pages``, the scheduler's) says which pages hold its tokens: position
p lives at row ``pages[p // page_size] * page_size + p % page_size``. Page 0 is the spare page, never
handed out, where padding reads.

This class is only the storage, and the engine owns it. *Which* page belongs to which request, and
which pages the prefix cache keeps, is the scheduler's business (``scheduler/pages.py``,
``scheduler/radix.py``). Under tensor parallelism each rank caches its own KV heads only.
"""

import torch


class KVCache:
    def __init__(self, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        # Zeros, not garbage: padded positions read the spare page, and 0 * NaN would be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages, self.page_size = num_pages, page_size

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value caches of one layer, [num_pages * page_size, kv_heads, head_dim] each (views)."""
        return self.k[layer_id], self.v[layer_id]


def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """What one page costs, keys and values of every layer: for sizing the pool to a memory budget."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
