"""Each Triton kernel against chapter 05's attention in plain torch (``attention/paged.py``), the oracle.

On a CPU the kernels run in Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET``), so the
shapes are small: a few requests of ragged lengths, pages in scrambled order, page sizes 1 and 16, head
counts and sizes that are not powers of two (the default model's 3 KV heads of 64), grouped-query
(9 query heads on 3 KV heads), multi-query (one KV head) and plain multi-head attention, float32 and
float16, and a prefix already in the cache. On a GPU the same tests run the compiled kernels.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is available on Linux only: its kernels cannot run here")

from minisgl.attention.paged import (
    SPARE_PAGE,
    padded_locations,
    paged_decode_attention,
    paged_extend_attention,
    token_locations,
)
from minisgl.attention.paged import store_kv as torch_store_kv
from minisgl.kernels import paged_decode, paged_extend, store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float16 keeps about three significant digits. On a GPU float32 differs a little more (another exp, another
# order of sums); were the extend kernel's tl.dot left at TF32, it would be 2.5e-3 off and fail.
TOLERANCE = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 4e-3}
SHAPES = {  # name: (query heads, KV heads, head_dim)
    "gqa-9-on-3-d64": (9, 3, 64),
    "mqa-4-on-1-d32": (4, 1, 32),
    "mha-3-d48": (3, 3, 48),
}


def paged_setup(lengths: list[int], page_size: int, kv_heads: int, head_dim: int, dtype, seed: int = 0):
    """A pool with random keys and values, and for each request a page table of scrambled pages."""
    generator = torch.Generator().manual_seed(seed)
    pages_needed = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_needed) + 3  # a few pages nobody owns, and the spare
    order = (torch.randperm(num_pages - 1, generator=generator) + 1).tolist()  # page 0 is the spare
    rows, taken = [], 0
    for n in pages_needed:
        rows.append(order[taken : taken + n])
        taken += n
    shape = (num_pages * page_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    width = max(len(row) for row in rows)
    table = torch.tensor([row + [SPARE_PAGE] * (width - len(row)) for row in rows], dtype=torch.int32, device=DEVICE)
    return rows, table, k_cache, v_cache


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype, what: str) -> None:
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype], f"{what}: the kernel differs from torch by {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_store_writes_each_token_into_its_row(shape, page_size, dtype):
    _, kv_heads, head_dim = SHAPES[shape]
    lengths, new = [7, 20, 1], [3, 20, 1]
    rows, _, k_cache, v_cache = paged_setup(lengths, page_size, kv_heads, head_dim, dtype)
    cached = [n - m for n, m in zip(lengths, new)]
    locations = token_locations(rows, lengths, page_size, cached, device=DEVICE)
    k = torch.randn(len(locations), kv_heads, head_dim).to(dtype).to(DEVICE)
    v = torch.randn(len(locations), kv_heads, head_dim).to(dtype).to(DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_store_kv(expected_k, expected_v, locations, k, v)
    store_kv(k_cache, v_cache, locations, k, v)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v), "rows other than torch's changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("split_len", [16, 256], ids=["split-16", "split-256"])
def test_decode_matches_torch(shape, page_size, dtype, split_len):
    """Ragged lengths, one of them a single token; split-16 cuts the longest into several splits to merge,
    and leaves the short ones with empty splits (weight 0)."""
    heads, kv_heads, head_dim = SHAPES[shape]
    lengths = [5, 37, 1, 20]
    rows, table, k_cache, v_cache = paged_setup(lengths, page_size, kv_heads, head_dim, dtype)
    q = torch.randn(len(lengths), heads, head_dim).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    expected = paged_decode_attention(q, k_cache, v_cache, padded_locations(rows, lengths, page_size, DEVICE),
                                      torch.tensor(lengths, device=DEVICE), scale)
    got = paged_decode(q, k_cache, v_cache, table, int32(lengths), page_size, scale, max(lengths), split_len=split_len)
    assert_close(got, expected, dtype, f"decode, lengths {lengths}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_extend_matches_torch_after_a_cached_prefix(shape, page_size, dtype):
    """Requests with a cached prefix (7 + 3, 20 + 17), a whole prompt (20), and a decode token (40 + 1)
    in one launch: the mask must be aligned bottom-right, and one new token must see everything."""
    heads, kv_heads, head_dim = SHAPES[shape]
    lengths, new = [10, 37, 20, 41], [3, 17, 20, 1]
    rows, table, k_cache, v_cache = paged_setup(lengths, page_size, kv_heads, head_dim, dtype)
    q = torch.randn(sum(new), heads, head_dim).to(dtype).to(DEVICE)
    starts = [sum(new[:b]) for b in range(len(new))]
    scale = head_dim**-0.5
    got = paged_extend(q, k_cache, v_cache, table, int32(starts), int32(new), int32(lengths), page_size, scale,
                       max(new))
    for b, (length, count, start) in enumerate(zip(lengths, new, starts)):
        locations = token_locations([rows[b]], [length], page_size, device=DEVICE)
        expected = paged_extend_attention(q[start : start + count], k_cache, v_cache, locations, length - count, scale)
        assert_close(got[start : start + count], expected, dtype, f"extend of request {b} ({length - count} cached "
                     f"+ {count} new)")
