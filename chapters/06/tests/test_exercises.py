"""The focused test of each chapter 06 exercise: the learner's code alone against a plain torch loop (or plain
lists), with a failure that says which token, request, head or split went wrong, and what that mistake usually is.

The kernels run in Triton's interpreter on a CPU (``conftest.py``), so a print inside a kernel prints.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is available on Linux only: its kernels cannot run here")

from minisgl.attention.paged import SPARE_PAGE
from minisgl.core import Batch, Request, SamplingParams, future_token
from minisgl.engine.future import resolve_future_tokens
from minisgl.engine.graphs import padded_decode_inputs
from minisgl.kernels import store_kv
from minisgl.kernels.decode import decode_splits, merge_splits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.exercise("store", focused=True)
def test_store_puts_each_token_at_its_location_and_nothing_else():
    kv_heads, head_dim, rows = 3, 64, 40  # a row of 192 values: not a power of two
    k_cache = torch.zeros(rows, kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros(rows, kv_heads, head_dim, device=DEVICE)
    locations = torch.tensor([17, 3, 38, 4], device=DEVICE)
    k = torch.arange(4 * kv_heads * head_dim, dtype=torch.float32, device=DEVICE).view(4, kv_heads, head_dim) + 1
    v = -k
    store_kv(k_cache, v_cache, locations, k, v)
    for token, row in enumerate(locations.tolist()):
        assert torch.equal(k_cache[row], k[token]), (
            f"token {token} belongs in row {row} of the cache, but that row holds something else"
            + (f" (row {token} holds it: looks like it wrote to the token's index, not locations[token])"
               if torch.equal(k_cache[token], k[token]) else "")
            + (" (only the first values are right: is the mask cutting the row at a power of two?)"
               if torch.equal(k_cache[row].flatten()[:128], k[token].flatten()[:128]) else "")
        )
        assert torch.equal(v_cache[row], v[token]), f"token {token}: the keys are in row {row} but not the values"
    untouched = [r for r in range(rows) if r not in locations.tolist()]
    assert not k_cache[untouched].any() and not v_cache[untouched].any(), "rows no token owns were written"


def one_request_attention(q, keys, values, scale):
    """Per query head: the softmax-weighted values and the log-sum-exp of the scores (float32)."""
    scores = (q.float() @ keys.float().T) * scale  # [heads, T]
    return scores.softmax(-1) @ values.float(), scores.logsumexp(-1)


@pytest.mark.exercise("decode-loop", focused=True)
def test_decode_loop_gives_each_head_its_attention_and_lse():
    """One split (split_len above every length), so that no merge is involved: the split kernel's output and
    log-sum-exp must be each query head's attention over its KV head, page by page."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, page_size = 6, 2, 32, 4
    lengths, pages = [9, 1, 14], [[5, 2, 7], [1], [3, 8, 4, 6]]  # scrambled pages
    k_cache = torch.randn(9 * page_size, kv_heads, head_dim, generator=generator).to(DEVICE)
    v_cache = torch.randn(9 * page_size, kv_heads, head_dim, generator=generator).to(DEVICE)
    q = torch.randn(3, heads, head_dim, generator=generator).to(DEVICE)
    table = torch.tensor([row + [SPARE_PAGE] * (4 - len(row)) for row in pages], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = decode_splits(q, k_cache, v_cache, table, seq_lens, page_size, head_dim**-0.5, 16, split_len=64)
    group = heads // kv_heads
    for b, (length, row) in enumerate(zip(lengths, pages)):
        locations = [row[p // page_size] * page_size + p % page_size for p in range(length)]
        for head in range(heads):
            kv = head // group
            expected_out, expected_lse = one_request_attention(
                q[b, head : head + 1], k_cache[locations, kv], v_cache[locations, kv], head_dim**-0.5
            )
            got_out, got_lse = out[b, head, 0], lse[b, head, 0]
            hint = "" if torch.isfinite(got_out).all() else " (not finite: did exp(-inf - -inf) make a nan?)"
            assert torch.allclose(got_out, expected_out[0], atol=1e-4), (
                f"request {b} (length {length}), query head {head} (KV head {kv}): output differs from "
                f"softmax(q k^T) v by {(got_out - expected_out[0]).abs().max():.3g}{hint}. Looks like: positions "
                "read from the wrong page, a block's sums not rescaled when the largest score grows, or the "
                "query heads of another KV head"
            )
            assert torch.allclose(got_lse, expected_lse[0], atol=1e-4), (
                f"request {b}, head {head}: lse {got_lse.item():.4f}, expected {expected_lse[0].item():.4f} "
                "(log of the sum of exp(score)): is it running_max + log(total)?"
            )


@pytest.mark.exercise("merge", focused=True)
def test_merge_weights_each_split_by_its_share_of_the_softmax():
    generator = torch.Generator().manual_seed(1)
    requests, heads, splits, head_dim = 2, 3, 4, 16
    mid_out = torch.randn(requests, heads, splits, head_dim, generator=generator).to(DEVICE)
    mid_lse = (3 * torch.randn(requests, heads, splits, generator=generator)).to(DEVICE)
    mid_lse[1, :, 2:] = float("-inf")  # request 1 is short: its last two splits are empty
    got = merge_splits(mid_out, mid_lse, torch.float32)
    weights = torch.softmax(mid_lse, dim=-1)  # each split's share of the whole softmax
    expected = (weights[..., None] * mid_out).sum(-2)
    for b in range(requests):
        for head in range(heads):
            assert torch.isfinite(got[b, head]).all(), (
                f"request {b}, head {head}: not finite. An empty split has lse -inf: its weight must be 0, "
                "so subtract the largest lse before exp"
            )
            assert torch.allclose(got[b, head], expected[b, head], atol=1e-5), (
                f"request {b}, head {head}: merged output off by {(got[b, head] - expected[b, head]).abs().max():.3g}. "
                "Looks like: equal weights (a plain mean), weights exp(lse) not divided by their sum, or the "
                "splits of another head"
            )


@pytest.mark.exercise("pad-decode", focused=True)
def test_pad_decode_fills_a_graph_with_dummies_on_the_spare_page():
    page_size, max_pages = 4, 5
    requests = []
    for uid, pages, length in (("a", [3, 7], 6), ("b", [5], 1)):
        request = Request(uid, list(range(1, length)), SamplingParams(), output_ids=[40 + len(uid)], pages=pages)
        request.cached_len = length - 1
        requests.append(request)
    batch = Batch(requests, [1, 1])
    inputs = padded_decode_inputs(batch, 4, max_pages, page_size)
    for name, expected in (
        ("input_ids", batch.input_ids + [0, 0]),
        ("positions", [5, 0, 0, 0]),
        ("seq_lens", [6, 1, 1, 1]),
        ("page_table", [[3, 7, 0, 0, 0], [5, 0, 0, 0, 0], [0] * 5, [0] * 5]),
        ("new_locations", [7 * page_size + 1, 5 * page_size, 0, 0]),
    ):
        got = getattr(inputs, name)
        assert got == expected, (
            f"{name}: {got}, expected {expected}. The real requests first, then dummies of one token at "
            "position 0 with only the spare page (0), whose key and value go to the spare page's first row"
        )
    with pytest.raises(ValueError):
        padded_decode_inputs(batch, 1, max_pages, page_size)


@pytest.mark.exercise("future-tokens", focused=True)
def test_future_tokens_take_the_place_of_their_stand_ins():
    future = torch.tensor([70, 71, 72, 73], device=DEVICE)  # the future-token map: slot s holds 70 + s
    ids = [5, future_token(0), 9, future_token(3), future_token(2), 0]
    expected = [5, 70, 9, 73, 72, 0]
    got = resolve_future_tokens(torch.tensor(ids, device=DEVICE), future)
    assert isinstance(got, torch.Tensor) and got.device == future.device, "return a tensor, on the map's device"
    got = got.tolist()
    for i, (was, token, want) in enumerate(zip(ids, got, expected, strict=True)):
        if was >= 0:
            assert token == want, (f"position {i} held the real token {was}, which must stay as it is, got {token}"
                                   + (" (token 0 is a real token too: only negative ids are stand-ins)"
                                      if was == 0 else ""))
        else:
            slot = -1 - was
            assert token == want, (
                f"position {i} held the stand-in for slot {slot} ({was}); it must become future[{slot}] = {want}, "
                f"got {token}" + (" (off by one: the stand-in of slot s is -1 - s, not -s)"
                                  if token in (70 + slot - 1, 70 + slot + 1) else "")
            )
