"""Paged decode attention: one new token per request, read straight from its pages (introduced in chapter 06).

Chapter 05's torch version gathers every request's keys and values into a padded rectangle, then
attends. Here a program reads one request's keys and values page by page, where they lie, and never
writes a copy. It serves one KV head and the whole group of query heads that read it (grouped-query
attention: SmolLM2's 9 query heads read 3 KV heads, 3 each), so each key is loaded once for the group.

**Online softmax.** The program sees the keys a block at a time and never holds all the scores. It
keeps, per query head, the largest score so far ``running_max``, the sum of ``exp(score - running_max)``
so far ``total``, and the sum of ``exp(score - running_max) * value`` so far ``acc``. A block with a
larger score rescales what came before by ``exp(old_max - new_max)``; at the end ``acc / total`` is
exactly softmax(scores) @ values.

**Split KV.** One program per request and KV head is few programs for a GPU of a hundred cores when
the batch is small and the sequences long. So the sequence is cut into splits of ``split_len`` tokens,
a program each; every split writes its partial output and the log of its softmax denominator
(``lse = running_max + log(total)``), and a second kernel merges them: each split's output weighted by
``exp(lse_split - lse_max)``. A split past a request's end writes ``lse = -inf``, weight 0.

**Few compiled variants.** Triton compiles a kernel anew for every new set of ``tl.constexpr`` values.
The number of splits grows with the longest sequence, so it is a runtime argument, ``num_splits``
(``do_not_specialize`` keeps Triton from compiling variants of its own for the integer values it
specializes on, such as multiples of 16): the split kernel compiles once for a model, and the merge
kernel once per power of two its block of splits ``BLOCK_S`` takes (9 variants up to 256 splits,
65,536 tokens at the default ``split_len``).

Scores and sums are float32 whatever the cache's dtype (and Triton's interpreter computes bfloat16
wrongly, so every load is cast first).
"""

import torch
import triton
import triton.language as tl


# --8<-- [start:decode-kernel]
@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q, k_cache, v_cache, page_table, seq_lens, mid_out, mid_lse, scale, pages_stride, num_splits,
    PAGE_SIZE: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT_LEN: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    request, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens + request)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, seq_len)
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)  # powers of two, masked down to GROUP and HEAD_DIM
    g_in, d_in = g < GROUP, d < HEAD_DIM
    heads = kv_head * GROUP + g  # the query heads that read this KV head
    q_rows = request * (KV_HEADS * GROUP) + heads
    query = tl.load(q + q_rows[:, None] * HEAD_DIM + d[None, :], mask=g_in[:, None] & d_in[None, :], other=0.0)
    query = query.to(tl.float32)

    running_max = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: exp(running_max - new_max) is never nan
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for block in range(start, end, BLOCK_N):
        positions = block + tl.arange(0, BLOCK_N)
        valid = positions < end
        # --8<-- [start:ex-decode-loop]
        # Where each position's keys lie: its page from the page table, then its row in the pool.
        pages = tl.load(page_table + request * pages_stride + positions // PAGE_SIZE, mask=valid, other=0)
        rows = pages.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
        offsets = (rows * KV_HEADS + kv_head)[:, None] * HEAD_DIM + d[None, :]
        keys = tl.load(k_cache + offsets, mask=valid[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        values = tl.load(v_cache + offsets, mask=valid[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)  # what the sums so far were worth, now that the largest score moved
        p = tl.exp(scores - new_max[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        running_max = new_max
        # --8<-- [end:ex-decode-loop]

    seen = total > 0  # false only for a split that lies past the request's end
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, running_max + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    mid = q_rows * num_splits + split
    tl.store(mid_out + mid[:, None] * HEAD_DIM + d[None, :], out, mask=g_in[:, None] & d_in[None, :])
    tl.store(mid_lse + mid, lse, mask=g_in)
# --8<-- [end:decode-kernel]


# --8<-- [start:merge-kernel]
@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(mid_out, mid_lse, out, num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # one (request, query head)
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_in, d_in = s < num_splits, d < HEAD_DIM
    # --8<-- [start:ex-merge]
    lse = tl.load(mid_lse + row * num_splits + s, mask=s_in, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, axis=0))  # a split's share of the whole softmax; -inf: 0
    partial = tl.load(mid_out + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                      mask=s_in[:, None] & d_in[None, :], other=0.0)
    merged = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights, axis=0)
    # --8<-- [end:ex-merge]
    tl.store(out + row * HEAD_DIM + d, merged.to(out.dtype.element_ty), mask=d_in)
# --8<-- [end:merge-kernel]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, page_size: int, scale: float, max_seq_len: int, split_len: int = 256,
                 block_n: int = 16) -> torch.Tensor:
    """q [requests, heads, d]; k_cache, v_cache [rows, kv_heads, d]; page_table [requests, pages] (int32,
    padded with the spare page) of pages of ``page_size`` rows; request b sees its first seq_lens[b]
    positions. ``max_seq_len`` (a Python int, so that no value is read back from the device) sets how many
    splits there are. Returns [requests, heads, d], what ``attention/paged.py``'s ``paged_decode_attention``
    returns."""
    mid_out, mid_lse = decode_splits(q, k_cache, v_cache, page_table, seq_lens, page_size, scale, max_seq_len,
                                     split_len, block_n)
    return merge_splits(mid_out, mid_lse, q.dtype)


def decode_splits(q, k_cache, v_cache, page_table, seq_lens, page_size: int, scale: float, max_seq_len: int,
                  split_len: int = 256, block_n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's attention output [requests, heads, splits, d] and log-sum-exp [requests, heads, splits],
    float32; a split past a request's end has lse -inf."""
    requests, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    split_len = triton.cdiv(split_len, block_n) * block_n  # whole blocks per split
    num_splits = max(1, triton.cdiv(max_seq_len, split_len))
    mid_out = torch.empty(requests, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(requests, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(requests, kv_heads, num_splits)](
        q.contiguous(), k_cache, v_cache, page_table, seq_lens, mid_out, mid_lse, scale, page_table.stride(0),
        num_splits, PAGE_SIZE=page_size, KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, SPLIT_LEN=split_len,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return mid_out, mid_lse


def merge_splits(mid_out: torch.Tensor, mid_lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The splits of ``decode_splits`` merged into one output per request and head, [requests, heads, d]."""
    requests, num_heads, num_splits, head_dim = mid_out.shape
    out = torch.empty(requests, num_heads, head_dim, dtype=dtype, device=mid_out.device)
    _merge_splits_kernel[(requests * num_heads,)](
        mid_out, mid_lse, out, num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
