"""Each Triton kernel against chapter 05's attention in plain torch (``attention/paged.py``), the oracle.

On a CPU the kernels run in Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET``), so the
shapes are small: a few requests of ragged lengths, pages in scrambled order, page sizes 1 and 16, head
counts and sizes that are not powers of two (the default model's 3 KV heads of 64), grouped-query
(9 query heads on 3 KV heads), multi-query (one KV head) and plain multi-head attention, float32 and
float16, and a prefix already in the cache. On a GPU the same tests run the compiled kernels.

Then the work the kernels must not do: extend programs with no row of their request (counted in the
interpreter), and a new compiled variant of the decode kernels for every split count. A GPU alone shows
what Triton compiled: the variants, and the 16-bit operands of the extend kernel's ``tl.dot``.
"""

import functools
import inspect
import re

import pytest
import torch

pytest.importorskip("triton", reason="Triton is available on Linux only: its kernels cannot run here")

import triton.language as tl

import minisgl.kernels.decode as decode_kernels
import minisgl.kernels.extend as extend_kernels
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
# bfloat16 keeps three bits fewer than float16, and runs on a GPU only (the interpreter computes it wrongly).
TOLERANCE = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
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
    extend_against_torch(SHAPES[shape], [10, 37, 20, 41], [3, 17, 20, 1], page_size, dtype)


def extend_against_torch(shape: tuple[int, int, int], lengths: list[int], new: list[int], page_size: int,
                         dtype) -> None:
    """One launch of the extend kernel over requests of ``lengths`` tokens, the last ``new`` of each new, each
    request's rows compared with ``paged_extend_attention``."""
    heads, kv_heads, head_dim = shape
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_mixes_a_long_chunk_with_single_tokens(page_size, dtype):
    """A chunk of 70 new tokens after 20 cached ones sizes the grid at 5 blocks of rows for every request;
    the decode tokens (44 + 1, 0 + 1) and a short prompt (3) have rows in their first block only, and the
    programs of their other blocks return at once."""
    extend_against_torch(SHAPES["gqa-9-on-3-d64"], [90, 45, 3, 1], [70, 1, 3, 1], page_size, dtype)


@pytest.mark.skipif(DEVICE == "cuda", reason="counts tl.dot calls, which only Triton's interpreter makes in Python")
def test_extend_programs_past_their_request_s_tokens_do_no_work(monkeypatch):
    """In the interpreter every ``tl.dot`` is a Python call, two per block of keys a program walks: the count
    says which programs walked. Only those with a row of new tokens may."""
    dots, original = [], tl.dot

    @functools.wraps(original)  # keeps the mark that lets the interpreter patch it in as a builtin
    def counting_dot(*args, **kwargs):
        dots.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tl, "dot", counting_dot)
    heads, block = 2, 16  # the kernel's BLOCK_M and BLOCK_N
    lengths, new = [90, 200, 3], [70, 1, 3]
    extend_against_torch((heads, 1, 16), lengths, new, 16, torch.float32)
    walked = 0
    for length, count in zip(lengths, new):
        for block_m in range(-(-max(new) // block)):
            if block_m * block < count:  # a program with rows: it walks up to its last new token's position
                last = min(length, length - count + (block_m + 1) * block)
                walked += heads * -(-last // block)
    assert len(dots) == 2 * walked, (
        f"{len(dots) // 2} blocks of keys walked, {walked} by the programs with rows: programs past their "
        "request's new tokens walked too"
    )


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel and runs nothing: it records each launch's grid, and the values
    of the kernel's ``tl.constexpr`` parameters, for each set of which Triton compiles a variant."""

    def __init__(self, kernel):
        self.signature = inspect.signature(kernel.fn)
        self.constexprs = [name for name, p in self.signature.parameters.items() if p.annotation is tl.constexpr]
        self.grids, self.variants = set(), set()

    def __getitem__(self, grid):
        self.grids.add(grid)
        return self.launch

    def launch(self, *args, **kwargs):
        arguments = self.signature.bind(*args, **kwargs).arguments
        self.variants.add(tuple(arguments[name] for name in self.constexprs))


def test_decode_compiles_few_variants_as_sequences_grow(monkeypatch):
    """The number of splits grows with the longest sequence, by one every ``split_len`` tokens. Were it a
    constexpr, every new count would compile both kernels anew; the split kernel must compile once, the
    kernel that weighs the splits once per power of two of its block of splits."""
    recorders = {}
    for name in ("_decode_split_kernel", "_merge_splits_kernel"):
        recorders[name] = LaunchRecorder(getattr(decode_kernels, name))
        monkeypatch.setattr(decode_kernels, name, recorders[name])
    heads, kv_heads, head_dim = SHAPES["gqa-9-on-3-d64"]
    q = torch.zeros(2, heads, head_dim, device=DEVICE)
    cache = torch.zeros(16, kv_heads, head_dim, device=DEVICE)
    table = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    for max_seq_len in range(1, 4097):
        paged_decode(q, cache, cache, table, int32([1, max_seq_len]), 16, 1.0, max_seq_len, split_len=16)
    splits, blocks = recorders["_decode_split_kernel"], recorders["_merge_splits_kernel"]
    assert len(splits.grids) == 256, "sequences of 1 to 4096 tokens in splits of 16: 256 split counts"
    assert len(splits.variants) == 1, f"the split kernel compiles {len(splits.variants)} variants, not one"
    assert len(blocks.variants) <= 9, f"{len(blocks.variants)} variants for 256 split counts: log2(256) + 1 = 9"


def compiled_variants(kernel) -> dict:
    """What Triton compiled of a ``@triton.jit`` kernel on a GPU so far, by specialization key (Triton 3 keeps
    a cache per device, its kernels first)."""
    return {key: compiled for caches in kernel.device_caches.values() for key, compiled in caches[0].items()}


@pytest.mark.cuda
def test_decode_compiles_few_variants_on_a_gpu():
    """What Triton compiled, for 9 split counts (the interpreter compiles nothing): one split kernel, and one
    second kernel per power of two of the block of splits (1, 2, 4, 8, 16)."""
    heads, kv_heads, head_dim = SHAPES["gqa-9-on-3-d64"]
    lengths = [5, 16, 1, 9]
    _, table, k_cache, v_cache = paged_setup(lengths, 16, kv_heads, head_dim, torch.float16)
    q = torch.randn(len(lengths), heads, head_dim).to(torch.float16).to(DEVICE)
    split_kernel, weigh_kernel = decode_kernels._decode_split_kernel, decode_kernels._merge_splits_kernel
    before = set(compiled_variants(split_kernel)), set(compiled_variants(weigh_kernel))
    for count in range(1, 10):  # max_seq_len 16 .. 144 in splits of 16: 1 to 9 splits
        paged_decode(q, k_cache, v_cache, table, int32(lengths), 16, head_dim**-0.5, 16 * count, split_len=16)
    torch.cuda.synchronize()
    new_splits = set(compiled_variants(split_kernel)) - before[0]
    new_blocks = set(compiled_variants(weigh_kernel)) - before[1]
    assert len(new_splits) <= 1, f"9 split counts compiled {len(new_splits)} variants of the split kernel"
    assert len(new_blocks) <= 5, f"9 split counts compiled {len(new_blocks)} variants of the second kernel"


@pytest.mark.cuda  # in the interpreter tl.dot's operands are float32
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_extend_multiplies_16_bit_operands_on_a_gpu(dtype):
    """A 16-bit model's query, keys, values and softmax weights go to ``tl.dot`` in its own dtype, summed in
    float32, as FlashAttention does; not cast to float32 first, which the tensor cores would round to TF32."""
    extend_against_torch(SHAPES["gqa-9-on-3-d64"], [10, 37, 20, 41], [3, 17, 20, 1], 16, dtype)
    operand_types = set()
    for kernel in compiled_variants(extend_kernels._extend_kernel).values():  # this dtype's, and other tests'
        for line in kernel.asm["ttir"].splitlines():
            if "tt.dot " in line:
                types = re.findall(r"tensor<[0-9x]+x(\w+)>", line)  # the two operands', then the result's
                assert types[-1] == "f32", f"a tl.dot that does not sum in float32: {line.strip()}"
                operand_types.add(tuple(types[:2]))
    ir_type = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    assert (ir_type, ir_type) in operand_types, f"no tl.dot of {ir_type} operands, only {sorted(operand_types)}"
