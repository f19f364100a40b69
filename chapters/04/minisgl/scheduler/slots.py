"""Which KV cache slot belongs to which request: the scheduler's side of the KV cache (introduced in chapter 03).

The engine owns the cache's tensors (``kv_cache.py``); the scheduler owns this list of free slot
numbers. A request takes a slot when it is admitted and gives it back the moment it finishes or is
aborted, so the number of slots is the number of requests that can run at once. The scheduler never
touches a tensor, and the engine never decides who gets memory.
"""


class SlotAllocator:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def allocate(self) -> int:
        return self.free_slots.pop()

    def free(self, slot: int) -> None:
        self.free_slots.append(slot)
