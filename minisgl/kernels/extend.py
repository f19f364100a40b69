"""Paged extend attention: several new tokens per request after its cached ones (introduced in chapter 06).

An extend is a prompt, a chunk of one, or a prompt whose prefix came from the radix cache: ``new``
tokens at positions ``cached .. cached + new - 1`` that attend to every key up to their own position,
cached or new (their own keys are stored first). The mask is causal and aligned to the bottom right:
new token i sees keys ``0 .. cached + i``.

A program takes a block of ``BLOCK_M`` new tokens of one request and one query head, and walks that
request's keys page by page, ``BLOCK_N`` at a time, with the same online softmax as the decode kernel
(``decode.py``). Keys past the block's last new token are never visible to it, so the walk stops
there. The blocks are matrices of at least 16 x 16, so that ``tl.dot`` can use a GPU's tensor cores.
Loads are cast to float32 (Triton's interpreter computes bfloat16 wrongly), and a float32 ``tl.dot`` on a
GPU rounds its inputs to TF32 (10 bits of mantissa) unless told otherwise: for a float32 model the kernel
asks for exact float32 products (``DOT_PRECISION="ieee"``), measured 2.5e-3 off torch without it; for
16-bit models TF32 keeps more bits than the model's own numbers have, at tensor-core speed.
A decode token is an extend with one new token, so this kernel can run a mixed batch on its own.
"""

import torch
import triton
import triton.language as tl


# --8<-- [start:extend-kernel]
@triton.jit
def _extend_kernel(
    q, k_cache, v_cache, out, page_table, q_starts, new_lens, seq_lens, scale, pages_stride,
    PAGE_SIZE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    request, head, block_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // (HEADS // KV_HEADS)
    new_len = tl.load(new_lens + request)
    seq_len = tl.load(seq_lens + request)
    cached = seq_len - new_len
    i = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # which of the request's new tokens
    d = tl.arange(0, BLOCK_D)
    i_in, d_in = i < new_len, d < HEAD_DIM
    q_rows = tl.load(q_starts + request) + i  # the new tokens' rows in q and out
    query = tl.load(q + (q_rows[:, None] * HEADS + head) * HEAD_DIM + d[None, :],
                    mask=i_in[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    query_positions = cached + i

    running_max = tl.full([BLOCK_M], -1e30, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last = tl.minimum(seq_len, cached + (block_m + 1) * BLOCK_M)  # no key after this is visible to the block
    for block in range(0, last, BLOCK_N):
        positions = block + tl.arange(0, BLOCK_N)
        valid = positions < seq_len
        pages = tl.load(page_table + request * pages_stride + positions // PAGE_SIZE, mask=valid, other=0)
        rows = pages.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
        offsets = (rows * KV_HEADS + kv_head)[:, None] * HEAD_DIM + d[None, :]
        keys = tl.load(k_cache + offsets, mask=valid[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        values = tl.load(v_cache + offsets, mask=valid[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        visible = (positions[None, :] <= query_positions[:, None]) & valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p, values, input_precision=DOT_PRECISION)
        running_max = new_max

    result = acc / tl.where(total > 0, total, 1.0)[:, None]  # 0 only with no key at all (seq_len 0): no NaN
    tl.store(out + (q_rows[:, None] * HEADS + head) * HEAD_DIM + d[None, :], result.to(out.dtype.element_ty),
             mask=i_in[:, None] & d_in[None, :])
# --8<-- [end:extend-kernel]


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 q_starts: torch.Tensor, new_lens: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                 scale: float, max_new: int, block_m: int = 16, block_n: int = 16) -> torch.Tensor:
    """q [tokens, heads, d]: the new tokens of every request, end to end, request b's from row q_starts[b]
    (new_lens[b] of them, after seq_lens[b] - new_lens[b] cached ones); k_cache, v_cache [rows, kv_heads,
    d] with the new tokens' keys and values stored already; page_table [requests, pages] (int32).
    ``max_new``: the largest of new_lens, as a Python int. Returns [tokens, heads, d], what
    ``attention/paged.py``'s ``paged_extend_attention`` returns request by request."""
    tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    grid = (page_table.shape[0], num_heads, triton.cdiv(max_new, block_m))
    _extend_kernel[grid](
        q.contiguous(), k_cache, v_cache, out, page_table, q_starts, new_lens, seq_lens, scale,
        page_table.stride(0), PAGE_SIZE=page_size, HEADS=num_heads, KV_HEADS=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
