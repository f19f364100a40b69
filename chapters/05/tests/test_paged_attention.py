"""Attention over a paged KV cache against dense attention written out in the test (float32).

Every test scatters some requests' keys and values into a pool of pages handed out in scrambled order,
as a pool is after requests have come and gone. The rest of the pool, the spare page 0 included, holds
other numbers, so that reading a row one should not read changes the output. The reference never looks
at the pages: it loops over requests, heads and positions of each request's own dense keys and values.

The two exercises each have one focused test (``-k page-gather -x``, ``-k extend-mask -x``) that builds
its locations by hand, so that it depends on the exercise alone, and that names on a mismatch the
request, the head, the query's position, expected against got, and the known mistake that fits.
No model is loaded; the whole file runs in a few seconds.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from minisgl.attention.paged import (
    padded_locations,
    paged_decode_attention,
    paged_extend_attention,
    store_kv,
    token_locations,
)

ATOL = 2e-5


def fmt(values, limit: int = 4) -> str:
    """The first few numbers of a vector, short enough for a failure line."""
    values = [float(v) for v in values]
    shown = ", ".join(f"{v:.3f}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


# ---- a pool of pages, and dense attention


class Pool:
    """Requests' dense keys and values [length, kv_heads, d], scattered into pages handed out in scrambled
    order; page 0 is the spare page nobody owns, and two more pages belong to nobody either."""

    def __init__(self, lengths: list[int], page_size: int, kv_heads: int, head_dim: int, seed: int = 0):
        rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
        self.lengths, self.page_size = lengths, page_size
        needed = [math.ceil(length / page_size) for length in lengths]
        num_pages = 1 + sum(needed) + 2
        free = list(range(1, num_pages))
        rng.shuffle(free)
        self.rows = [[free.pop() for _ in range(n)] for n in needed]
        self.keys = [torch.randn(n, kv_heads, head_dim, generator=generator) for n in lengths]
        self.values = [torch.randn(n, kv_heads, head_dim, generator=generator) for n in lengths]
        # Bigger numbers where no request's tokens are: attending to one of them moves the output visibly.
        self.k_cache = 3 * torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator)
        self.v_cache = 3 * torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator)
        for b, length in enumerate(lengths):
            for i in range(length):
                self.k_cache[self.location(b, i)] = self.keys[b][i]
                self.v_cache[self.location(b, i)] = self.values[b][i]

    def location(self, b: int, i: int) -> int:
        """Position i of request b: page rows[b][i // page_size], offset i % page_size."""
        return self.rows[b][i // self.page_size] * self.page_size + i % self.page_size

    def padded(self) -> torch.Tensor:
        """[requests, max length] locations, written out by hand; padding points at location 0 (the spare page)."""
        width = max(self.lengths)
        return torch.tensor([[self.location(b, i) if i < length else 0 for i in range(width)]
                             for b, length in enumerate(self.lengths)])

    def of_request(self, b: int) -> torch.Tensor:
        return torch.tensor([self.location(b, i) for i in range(self.lengths[b])])


def attend(query, key_rows, value_rows, scale: float) -> torch.Tensor:
    """One query vector against a list of key rows, a row at a time: softmax of the scaled dot products,
    then the weighted sum of the value rows."""
    scores = torch.tensor([float(query @ key) * scale for key in key_rows])
    weights = scores.softmax(dim=0)
    out = torch.zeros_like(query)
    for weight, value in zip(weights, value_rows):
        out += weight * value
    return out


def dense_decode(q, pool: Pool, scale: float, seen=None) -> torch.Tensor:
    """Request b's head h: its one query over positions 0 .. lengths[b] - 1 of its own keys, through KV head
    h // group. ``seen(b, j)``, the key and value rows request b reads through KV head j, describes the usual
    mistakes."""
    heads, kv_heads = q.shape[1], pool.k_cache.shape[1]
    seen = seen or (lambda b, j: (pool.keys[b][:, j], pool.values[b][:, j]))
    out = torch.zeros_like(q)
    for b in range(len(pool.lengths)):
        for h in range(heads):
            out[b, h] = attend(q[b, h], *seen(b, h // (heads // kv_heads)), scale)
    return out


def dense_extend(q, keys, values, cached_len: int, scale: float, window=None) -> torch.Tensor:
    """New token i (position cached_len + i), head h: over positions 0 .. cached_len + i of the sequence's
    keys, through KV head h // group. ``window(i) -> (first, last + 1)`` describes the usual mistakes."""
    new, heads = q.shape[0], q.shape[1]
    window = window or (lambda i: (0, cached_len + i + 1))
    out = torch.zeros_like(q)
    for i in range(new):
        first, end = window(i)
        for h in range(heads):
            j = h // (heads // keys.shape[1])
            out[i, h] = attend(q[i, h], keys[first:end, j], values[first:end, j], scale)
    return out


def queries(n: int, heads: int, head_dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, heads, head_dim, generator=torch.Generator().manual_seed(seed))


# ---- locations and store_kv


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_locations_follow_the_page_table(page_size):
    pool = Pool([1, 70, 16, 33], page_size, kv_heads=1, head_dim=2)
    got = padded_locations(pool.rows, pool.lengths, page_size)
    assert got.tolist() == pool.padded().tolist(), (
        f"page size {page_size}, page table rows {pool.rows}: position i of request b lives at "
        f"row[i // {page_size}] * {page_size} + i % {page_size}; padding points at the spare page 0"
    )
    every = token_locations(pool.rows, pool.lengths, page_size)
    assert every.tolist() == [pool.location(b, i) for b, n in enumerate(pool.lengths) for i in range(n)]


def test_token_locations_from_starts_are_the_new_tokens_in_batch_order():
    pool = Pool([9, 4, 21], page_size=4, kv_heads=1, head_dim=2)
    starts = [7, 3, 0]  # cached lengths: two new tokens, one, and a whole prompt
    got = token_locations(pool.rows, pool.lengths, 4, starts=starts)
    expected = [pool.location(b, i) for b, n in enumerate(pool.lengths) for i in range(starts[b], n)]
    assert got.tolist() == expected


def test_locations_refuse_a_page_table_too_short_for_the_length():
    with pytest.raises(ValueError, match="request 1 has 9 tokens but 2 pages of 4"):
        padded_locations([[1], [2, 3]], [3, 9], 4)


def test_store_kv_writes_exactly_the_given_locations():
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 40, 3, 8, generator=generator)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    locations = torch.tensor([13, 2, 39, 7, 20])  # scattered, out of order
    k, v = torch.randn(2, 5, 3, 8, generator=generator)

    store_kv(k_cache, v_cache, locations, k, v)

    for t, location in enumerate(locations.tolist()):
        assert torch.equal(k_cache[location], k[t]) and torch.equal(v_cache[location], v[t]), (
            f"new token {t} belongs at location {location}"
        )
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[locations] = False
    assert torch.equal(k_cache[untouched], k_before[untouched]), "store_kv changed keys at other locations"
    assert torch.equal(v_cache[untouched], v_before[untouched]), "store_kv changed values at other locations"


# ---- page-gather: decode over pages


def decode_mistake(got, q, pool: Pool, scale: float) -> str:
    kv_heads, width = pool.k_cache.shape[1], max(pool.lengths)

    def with_spare_rows(count):
        """Request b's own rows, then count(b) rows of the spare page 0 (where its padding points)."""
        def seen(b, j):
            n = count(b)
            return (torch.cat([pool.keys[b][:, j], pool.k_cache[0, j].expand(n, -1)]),
                    torch.cat([pool.values[b][:, j], pool.v_cache[0, j].expand(n, -1)]))
        return seen

    # The rows index_select gives, [requests * T] of [kv_heads, d], read as if they were [requests, kv_heads, T, d].
    misread_k = pool.k_cache[pool.padded().flatten()].reshape(len(pool.lengths), kv_heads, width, -1)
    misread_v = pool.v_cache[pool.padded().flatten()].reshape(len(pool.lengths), kv_heads, width, -1)
    candidates = {
        f"each request attends to all {width} positions of the padded rectangle, its padding included (which "
        "reads the spare page 0): mask the positions p >= seq_lens[b]":
            with_spare_rows(lambda b: width - pool.lengths[b]),
        "each request sees one position too many: keep p < seq_lens[b] (seq_lens[b] already counts the new token)":
            with_spare_rows(lambda b: min(1, width - pool.lengths[b])),
        "each request misses its newest position: seq_lens[b] counts the new token, whose key is already stored":
            lambda b, j: (pool.keys[b][:-1, j], pool.values[b][:-1, j]),
        "the gathered rows are viewed as [requests, kv_heads, T, d]; index_select gives [requests * T] rows of "
        "[kv_heads, d]: view them as [requests, T, kv_heads, d], then move kv_heads before T":
            lambda b, j: (misread_k[b, j, : pool.lengths[b]], misread_v[b, j, : pool.lengths[b]]),
    }
    for why, seen in candidates.items():
        if torch.allclose(got, dense_decode(q, pool, scale, seen=seen), atol=1e-4):
            return f" Looks like: {why}."
    return ""


def check_decode(got, q, pool: Pool, scale: float) -> None:
    heads, kv_heads = q.shape[1], pool.k_cache.shape[1]
    assert tuple(got.shape) == tuple(q.shape), (
        f"paged_decode_attention returned shape {tuple(got.shape)}, expected [requests, heads, d] = {tuple(q.shape)}"
    )
    expected = dense_decode(q, pool, scale)
    for b, length in enumerate(pool.lengths):
        for h in range(heads):
            gap = float((got[b, h] - expected[b, h]).abs().max())
            assert gap <= ATOL, (
                f"request {b} ({length} tokens, its new one at position {length - 1}, in pages {pool.rows[b]} "
                f"of {pool.page_size}; the batch is padded to {max(pool.lengths)}), head {h} (KV head "
                f"{h // (heads // kv_heads)}): output differs from dense attention by {gap:.3g} "
                f"(expected {fmt(expected[b, h])}, got {fmt(got[b, h])})."
                + decode_mistake(got, q, pool, scale)
            )


@pytest.mark.exercise("page-gather", focused=True)
def test_page_gather_decode_matches_dense_attention_request_by_request():
    heads, kv_heads, d, page_size = 4, 2, 8, 4
    pool = Pool([5, 1, 11, 8], page_size, kv_heads, d, seed=3)  # ragged, pages scrambled
    q, scale = queries(4, heads, d), d**-0.5
    got = paged_decode_attention(q, pool.k_cache, pool.v_cache, pool.padded(), torch.tensor(pool.lengths), scale)
    check_decode(got, q, pool, scale)


@pytest.mark.exercise("page-gather")
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 1)], ids=["gqa-9-3", "mqa-4-1"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_decode_matches_dense_attention(page_size, heads, kv_heads):
    d = 16
    pool = Pool([1, 17, 64, 130, 3, 65], page_size, kv_heads, d, seed=page_size)
    q, scale = queries(6, heads, d), d**-0.5
    locations = padded_locations(pool.rows, pool.lengths, page_size)
    got = paged_decode_attention(q, pool.k_cache, pool.v_cache, locations, torch.tensor(pool.lengths), scale)
    check_decode(got, q, pool, scale)


# ---- extend-mask: several new tokens after a cached prefix


def extend_mistake(got, q, keys, values, cached_len: int, scale: float) -> str:
    seq_len = keys.shape[0]
    candidates = {
        "new token i sees keys 0..i, as if the sequence started with it: that is the top-left alignment of SDPA's "
        f"is_causal=True; token i sits at position cached_len + i = {cached_len} + i and sees keys "
        "0..cached_len + i (bottom-right)": lambda i: (0, i + 1),
        f"every new token sees all {seq_len} keys: the later new tokens must stay hidden from the earlier ones":
            lambda i: (0, seq_len),
        "new token i sees only the new tokens: the cached prefix (positions 0..cached_len - 1) is part of its past":
            lambda i: (cached_len, cached_len + i + 1),
        "new token i misses its own key: position p may see key positions <= p (<=, not <)":
            lambda i: (0, cached_len + i),
        "new token i sees one key too many, its successor's: key positions <= p, not <= p + 1":
            lambda i: (0, min(cached_len + i + 2, seq_len)),
    }
    for why, window in candidates.items():
        if torch.allclose(got, dense_extend(q, keys, values, cached_len, scale, window=window), atol=1e-4):
            return f" Looks like: {why}."
    return ""


def check_extend(got, q, keys, values, cached_len: int, scale: float) -> None:
    heads, kv_heads = q.shape[1], keys.shape[1]
    assert tuple(got.shape) == tuple(q.shape), (
        f"paged_extend_attention returned shape {tuple(got.shape)}, expected [new, heads, d] = {tuple(q.shape)}"
    )
    expected = dense_extend(q, keys, values, cached_len, scale)
    for i in range(q.shape[0]):
        for h in range(heads):
            gap = float((got[i, h] - expected[i, h]).abs().max())
            assert gap <= ATOL, (
                f"new token {i} at position {cached_len + i} (after {cached_len} cached tokens; it should see keys "
                f"0..{cached_len + i} of {keys.shape[0]}), head {h} (KV head {h // (heads // kv_heads)}): output "
                f"differs from dense attention by {gap:.3g} (expected {fmt(expected[i, h])}, got {fmt(got[i, h])})."
                + extend_mistake(got, q, keys, values, cached_len, scale)
            )


@pytest.mark.exercise("extend-mask", focused=True)
def test_extend_mask_new_tokens_after_a_cached_prefix_see_the_prefix_and_their_past():
    heads, kv_heads, d, cached_len, new = 4, 2, 8, 6, 4
    pool = Pool([3, cached_len + new, 9], page_size=4, kv_heads=kv_heads, head_dim=d, seed=5)  # request 1 extends
    q, scale = queries(new, heads, d), d**-0.5
    got = paged_extend_attention(q, pool.k_cache, pool.v_cache, pool.of_request(1), cached_len, scale)
    check_extend(got, q, pool.keys[1], pool.values[1], cached_len, scale)


@pytest.mark.exercise("extend-mask")
@pytest.mark.parametrize("cached_len, new", [(0, 9), (37, 12), (16, 1), (5, 40)])
@pytest.mark.parametrize("page_size, heads, kv_heads", [(1, 9, 3), (16, 9, 3), (64, 4, 1)])
def test_paged_extend_matches_dense_attention(page_size, heads, kv_heads, cached_len, new):
    d = 16
    pool = Pool([20, cached_len + new, 7], page_size, kv_heads, d, seed=cached_len + page_size)
    q, scale = queries(new, heads, d), d**-0.5
    locations = token_locations([pool.rows[1]], [cached_len + new], page_size)
    got = paged_extend_attention(q, pool.k_cache, pool.v_cache, locations, cached_len, scale)
    check_extend(got, q, pool.keys[1], pool.values[1], cached_len, scale)


def sdpa_over_sequence(q, keys, values, scale: float, **mask) -> torch.Tensor:
    """SDPA over one sequence, each KV head repeated for its group of query heads: [n, heads, d]."""
    group = q.shape[1] // keys.shape[1]
    keys, values = (x.repeat_interleave(group, dim=1).transpose(0, 1) for x in (keys, values))
    return F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, scale=scale, **mask).transpose(0, 1)


@pytest.mark.exercise("extend-mask")
def test_sdpa_is_causal_is_wrong_after_a_cached_prefix_and_the_bottom_right_mask_is_right():
    heads, kv_heads, d, page_size = 9, 3, 16, 16
    scale = d**-0.5
    for cached_len, new in [(0, 8), (24, 8)]:
        pool = Pool([5, cached_len + new], page_size, kv_heads, d, seed=cached_len)
        keys, values, q = pool.keys[1], pool.values[1], queries(new, heads, d)
        expected = dense_extend(q, keys, values, cached_len, scale)
        # SDPA's is_causal aligns the mask top-left: query i sees keys 0..i, wherever the queries sit.
        top_left = sdpa_over_sequence(q, keys, values, scale, is_causal=True)
        seq_len = cached_len + new
        bottom_right = torch.ones(new, seq_len, dtype=torch.bool).tril(diagonal=cached_len)  # i sees 0..cached_len+i
        aligned = sdpa_over_sequence(q, keys, values, scale, attn_mask=bottom_right)
        ours = paged_extend_attention(q, pool.k_cache, pool.v_cache, pool.of_request(1), cached_len, scale)
        torch.testing.assert_close(aligned, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
        if cached_len == 0:  # a plain prefill: the two alignments are the same mask
            torch.testing.assert_close(top_left, expected, atol=ATOL, rtol=0)
        else:
            gap = float((top_left - expected).abs().max())
            assert gap > 0.1, f"with {cached_len} cached tokens is_causal=True should differ, differs by {gap:.3g}"


# ---- both together


@pytest.mark.exercise("page-gather", "extend-mask")
def test_decode_is_an_extend_with_one_new_token():
    heads, kv_heads, d, page_size = 9, 3, 16, 16
    pool = Pool([1, 40, 17, 33], page_size, kv_heads, d, seed=7)
    q, scale = queries(4, heads, d), d**-0.5
    locations = padded_locations(pool.rows, pool.lengths, page_size)
    decoded = paged_decode_attention(q, pool.k_cache, pool.v_cache, locations, torch.tensor(pool.lengths), scale)
    for b, length in enumerate(pool.lengths):
        extended = paged_extend_attention(q[b : b + 1], pool.k_cache, pool.v_cache, pool.of_request(b), length - 1,
                                          scale)
        torch.testing.assert_close(decoded[b : b + 1], extended, atol=ATOL, rtol=0,
                                   msg=lambda m, b=b: f"request {b}: decode and a one-token extend disagree. {m}")


@pytest.mark.cuda
def test_paged_attention_on_cuda_matches_the_cpu():
    heads, kv_heads, d, page_size = 9, 3, 64, 16
    pool = Pool([1, 70, 300, 33], page_size, kv_heads, d, seed=11)
    q, scale = queries(4, heads, d), d**-0.5
    seq_lens = torch.tensor(pool.lengths)
    locations = padded_locations(pool.rows, pool.lengths, page_size)
    assert torch.equal(padded_locations(pool.rows, pool.lengths, page_size, device="cuda").cpu(), locations)
    args = (q, pool.k_cache, pool.v_cache, locations, seq_lens)
    cpu = paged_decode_attention(*args, scale)
    gpu = paged_decode_attention(*(x.cuda() for x in args), scale)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    cached_len, q_new = 250, queries(50, heads, d)
    cpu = paged_extend_attention(q_new, pool.k_cache, pool.v_cache, pool.of_request(2), cached_len, scale)
    gpu = paged_extend_attention(q_new.cuda(), pool.k_cache.cuda(), pool.v_cache.cuda(), pool.of_request(2).cuda(),
                                 cached_len, scale)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
