"""The KV cache's storage: one slot per running request (introduced in chapter 01).

Attention needs the keys and values of every earlier token, for every request the engine is running.
The cache is allocated once, as two tensors [layers, slots, max_seq_len, kv_heads, head_dim]: position
p of the request in slot s lives at ``k[layer, s, p]``.

This class is only the storage, and the engine owns it. *Which* slot belongs to which request is the
scheduler's business (``scheduler/slots.py``): the two meet only through the slot number a request
carries. Keeping them apart lets a later chapter change how memory is handed out (pages, a prefix
cache) without touching the tensors, and the tensors (their layout, their device) without touching
the scheduler.

Under tensor parallelism each rank caches only the KV heads its attention uses (``kv_heads`` is this
rank's count): the cache, like the weights, is split across the ranks.

A slot is sized for the longest sequence we accept, which wastes memory on short requests; chapter 05
replaces slots with pages.
"""

import torch


class KVCache:
    def __init__(self, num_layers, num_slots, max_seq_len, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_slots, max_seq_len, num_kv_heads, head_dim)
        # Zeros, not garbage: masked positions are multiplied by 0 in attention, and 0 * NaN is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.num_slots = num_slots

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value caches of one layer, [slots, max_seq_len, kv_heads, head_dim] each (views)."""
        return self.k[layer_id], self.v[layer_id]
