"""Paged extend attention: several new tokens per request after its cached ones (introduced in chapter 06).

An extend is a prompt, a chunk of one, or a prompt whose prefix came from the radix cache: ``new``
tokens at positions ``cached .. cached + new - 1`` that attend to every key up to their own position,
cached or new (their own keys are stored first). The mask is causal and aligned to the bottom right:
new token i sees keys ``0 .. cached + i``.

A program takes a block of ``BLOCK_M`` new tokens of one request and one query head, and walks that
request's keys page by page, ``BLOCK_N`` at a time, with the same online softmax as the decode kernel
(``decode.py``). Keys past the block's last new token are never visible to it, so the walk stops
there. The blocks are matrices of at least 16 x 16, so that ``tl.dot`` can use a GPU's tensor cores.

``tl.dot``'s operands (``DOT_DTYPE``): on a GPU, for a 16-bit model, the query, keys and values stay in
the model's bfloat16 or float16 and the softmax weights are rounded to it for the second product, as
FlashAttention does: the tensor cores multiply 16-bit numbers exactly and add them up in float32
(``tl.dot``'s result, and the running sums, are float32). The operands are float32 in two cases: in
Triton's interpreter, which computes bfloat16 wrongly, and for a float32 model. A float32 ``tl.dot`` on
a GPU would round its inputs to TF32 (10 bits of mantissa) unless told otherwise, measured 2.5e-3 off
torch on an H100, so the kernel asks for exact float32 products (``DOT_PRECISION="ieee"``), slower ones.

A decode token is an extend with one new token, so this kernel can run a mixed batch on its own. The
grid has a block of rows for every ``BLOCK_M`` tokens of the longest extend, for every request: a
program whose rows all lie past its own request's new tokens (every block but the first of a decode
token in a step that also prefills a chunk) returns at once.
"""

import torch
import triton
import triton.language as tl


# --8<-- [start:extend-kernel]
@triton.jit
def _extend_kernel(
    q, k_cache, v_cache, out, page_table, q_starts, new_lens, seq_lens, scale, pages_stride,
    PAGE_SIZE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    request, head, block_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    new_len = tl.load(new_lens + request)
    if block_m * BLOCK_M >= new_len:  # the grid is sized for the longest extend: this request has no row here
        return
    kv_head = head // (HEADS // KV_HEADS)
    seq_len = tl.load(seq_lens + request)
    cached = seq_len - new_len
    i = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # which of the request's new tokens
    d = tl.arange(0, BLOCK_D)
    i_in, d_in = i < new_len, d < HEAD_DIM
    q_rows = tl.load(q_starts + request) + i  # the new tokens' rows in q and out
    query = tl.load(q + (q_rows[:, None] * HEADS + head) * HEAD_DIM + d[None, :],
                    mask=i_in[:, None] & d_in[None, :], other=0.0).to(DOT_DTYPE)
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
        keys = tl.load(k_cache + offsets, mask=valid[:, None] & d_in[None, :], other=0.0).to(DOT_DTYPE)
        values = tl.load(v_cache + offsets, mask=valid[:, None] & d_in[None, :], other=0.0).to(DOT_DTYPE)
        # tl.dot adds up in float32 whatever its operands: scores, p and the sums below are float32.
        scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        visible = (positions[None, :] <= query_positions[:, None]) & valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(DOT_DTYPE), values, input_precision=DOT_PRECISION)
        running_max = new_max

    result = acc / tl.where(total > 0, total, 1.0)[:, None]  # 0 only with no key at all (seq_len 0): no NaN
    tl.store(out + (q_rows[:, None] * HEADS + head) * HEAD_DIM + d[None, :], result.to(out.dtype.element_ty),
             mask=i_in[:, None] & d_in[None, :])
# --8<-- [end:extend-kernel]


# Under TRITON_INTERPRET=1 (read when a kernel is decorated) @triton.jit gives an interpreted function instead.
INTERPRETED = not isinstance(_extend_kernel, triton.JITFunction)
HALF_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_operands(dtype: torch.dtype) -> dict:
    """The extend kernel's ``DOT_DTYPE`` and ``DOT_PRECISION`` for a KV cache of ``dtype``: a 16-bit model's own
    type on a GPU, for the tensor cores; float32 in the interpreter (it computes bfloat16 wrongly) and for a
    float32 model, whose products must then be asked for as exact ("ieee"), not TF32."""
    if INTERPRETED or dtype not in HALF_TYPES:
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE=HALF_TYPES[dtype], DOT_PRECISION="tf32")  # Triton's default; it bears on float32 only


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
        **dot_operands(k_cache.dtype),
    )
    return out

