"""The KV cache, one slot per running request (introduced in chapter 01).

Attention needs the keys and values of every earlier token. Chapter 01 kept them for one sequence;
a serving engine keeps them for every request it is running. The cache is allocated once, as two
tensors [layers, slots, max_seq_len, kv_heads, head_dim]: position p of the request in slot s lives
at ``k[layer, s, p]``. A request takes a free slot when it is admitted and gives it back the moment
it finishes or is aborted, so the number of slots is the number of requests that can run at once.

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
        self.free_slots = list(range(num_slots))

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value caches of one layer, [slots, max_seq_len, kv_heads, head_dim] each (views)."""
        return self.k[layer_id], self.v[layer_id]

    def allocate(self) -> int:
        return self.free_slots.pop()

    def free(self, slot: int) -> None:
        self.free_slots.append(slot)
