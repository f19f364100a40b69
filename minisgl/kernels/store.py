"""Store kernel: each new token's key and value into its row of the paged cache (introduced in chapter 06).

The cache of a layer is ``[num_pages * page_size, kv_heads, head_dim]``: a token's keys for every KV
head are one contiguous row of ``kv_heads * head_dim`` values, at the row its page table gives. So a
program per new token copies one row of keys and one of values. ``tl.arange`` needs a power of two and
a row need not be one (the default model's 3 KV heads x 64 = 192), so the block is the next power of
two and a mask leaves the rest alone.
"""

import torch
import triton
import triton.language as tl


# --8<-- [start:store-kernel]
@triton.jit
def _store_kv_kernel(k, v, k_cache, v_cache, locations, ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    # --8<-- [start:ex-store]
    columns = tl.arange(0, BLOCK)
    inside = columns < ROW  # the block is a power of two, the row need not be
    row = tl.load(locations + token).to(tl.int64)  # int64: rows * ROW can pass 2**31 in a large cache
    tl.store(k_cache + row * ROW + columns, tl.load(k + token * ROW + columns, mask=inside), mask=inside)
    tl.store(v_cache + row * ROW + columns, tl.load(v + token * ROW + columns, mask=inside), mask=inside)
    # --8<-- [end:ex-store]
# --8<-- [end:store-kernel]


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, locations: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Write k, v [tokens, kv_heads, d] into rows ``locations`` [tokens] of one layer's caches
    [rows, kv_heads, d]: what ``attention/paged.py``'s ``store_kv`` does, one program per token."""
    tokens = k.shape[0]
    if tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(tokens,)](k.contiguous(), v.contiguous(), k_cache, v_cache, locations, ROW=row,
                                BLOCK=triton.next_power_of_2(row))
