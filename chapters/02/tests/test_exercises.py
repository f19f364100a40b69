"""One focused test per exercise of chapter 02: `pytest chapters/02 --learn -k NAME -x` reaches it first.

Each one calls the exercise's function directly on small hand-made inputs, compares it with a naive
reference written out in the test (a plain loop over requests, rows or waiting requests), and on a
mismatch says what is wrong in the exercise's own terms: which request, which head, which row,
expected against got, and, where the wrong output matches a known mistake, which mistake it was. No
model is loaded; each runs in a fraction of a second.
"""

from types import SimpleNamespace

import pytest
import torch

from minisgl.kv_cache import KVCache
from minisgl.layers.attention import decode_attention
from minisgl.sampling import SamplingParams, top_k_top_p
from minisgl.scheduler import Request, Scheduler
from minisgl.scheduler.text_stream import TextStream


def fmt(values, limit: int = 4) -> str:
    """The first few numbers of a vector, short enough for a failure line."""
    values = [float(v) for v in values]
    shown = ", ".join(f"{v:.3f}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


# ---- decode-attention ----


def naive_decode(q, k_cache, v_cache, slots, seq_lens, scale, slot_of=None, length_of=None, kv_head=None):
    """Request b's head h (one query) attends over positions 0 .. seq_lens[b] - 1 of its own slot, through KV
    head h // group, one request and one head at a time. The keyword arguments describe the usual mistakes."""
    requests, heads, _ = q.shape
    group = heads // k_cache.shape[2]
    slot_of = slot_of or (lambda b: slots[b])
    length_of = length_of or (lambda b: seq_lens[b])
    kv_head = kv_head or (lambda h: h // group)
    out = torch.zeros_like(q)
    for b in range(requests):
        slot, length = slot_of(b), length_of(b)
        for h in range(heads):
            keys, values = k_cache[slot, :length, kv_head(h)], v_cache[slot, :length, kv_head(h)]
            out[b, h] = ((keys @ q[b, h]) * scale).softmax(dim=0) @ values
    return out


def decode_mistake(got, q, k_cache, v_cache, slots, seq_lens, max_seq_len, scale) -> str:
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    candidates = {
        f"each request attends to every position up to max_seq_len={max_seq_len}, its padding included: mask the "
        "positions p >= seq_lens[b] (they hold another request's old keys, or nothing)":
            dict(length_of=lambda b: max_seq_len),
        "each request sees one position too many: mask positions p >= seq_lens[b] (seq_lens[b] already counts "
        "the new token)": dict(length_of=lambda b: min(seq_lens[b] + 1, max_seq_len)),
        "each request misses its newest position: seq_lens[b] counts the new token too, whose key is already in "
        "the cache": dict(length_of=lambda b: seq_lens[b] - 1),
        f"request b reads the cache of slot b; it lives in slot slots[b] (request 0 in slot {slots[0]})":
            dict(slot_of=lambda b: b),
        f"query head h reads KV head h % {kv_heads}; with {heads} query heads and {kv_heads} KV heads, each KV "
        f"head serves a group of {group} consecutive query heads: query head h reads KV head h // {group}":
            dict(kv_head=lambda h: h % kv_heads),
        "the scores are not scaled by `scale` (1/sqrt(head_dim))": dict(scale=1.0),
    }
    for why, mistake in candidates.items():
        mistake = {"scale": scale} | mistake
        candidate = naive_decode(q, k_cache, v_cache, slots, seq_lens, **mistake)
        if torch.allclose(got, candidate, atol=1e-4):
            return f" Looks like: {why}."
    return ""


def mixed_heads(got, q, k_cache, v_cache, slot, length, scale, b: int, h: int) -> str:
    """If request b's head h holds the attention of another query head, or over another KV head, say which."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    for a in range(heads):
        for j in range(kv_heads):
            keys, values = k_cache[slot, :length, j], v_cache[slot, :length, j]
            candidate = ((keys @ q[b, a]) * scale).softmax(dim=0) @ values
            if (a, j) != (h, h // (heads // kv_heads)) and torch.allclose(got[b, h], candidate, atol=1e-4):
                return (f" Head {h}'s output is query head {a} attending over KV head {j}; it should be query head "
                        f"{h} over KV head {h // (heads // kv_heads)}: check how heads are grouped and put back.")
    return ""


@pytest.mark.exercise("decode-attention", focused=True)
def test_decode_attention_matches_naive_attention_request_by_request():
    heads, kv_heads, d, num_slots, capacity = 4, 2, 8, 4, 7
    generator = torch.Generator().manual_seed(3)
    # every position of every slot holds something, as a slot does after earlier, longer requests
    k_cache = torch.randn(num_slots, capacity, kv_heads, d, generator=generator)
    v_cache = torch.randn(num_slots, capacity, kv_heads, d, generator=generator)
    slots, seq_lens = [3, 0, 2], [2, 5, 1]  # requests in slots out of order, of different lengths
    max_seq_len = max(seq_lens)
    q = torch.randn(len(slots), heads, d, generator=generator)
    scale = d**-0.5

    got = decode_attention(q, k_cache.clone(), v_cache.clone(), torch.tensor(slots), torch.tensor(seq_lens),
                           max_seq_len, scale)
    assert tuple(got.shape) == tuple(q.shape), (
        f"decode_attention returned shape {tuple(got.shape)}, expected [requests, heads, d] = {tuple(q.shape)}"
    )
    expected = naive_decode(q, k_cache, v_cache, slots, seq_lens, scale)
    for b, (slot, length) in enumerate(zip(slots, seq_lens)):
        for h in range(heads):
            gap = float((got[b, h] - expected[b, h]).abs().max())
            assert gap <= 1e-4, (
                f"request {b} (slot {slot}, {length} cached tokens, its new one included; the batch is padded to "
                f"{max_seq_len}), head {h} (uses KV head {h // (heads // kv_heads)}): output differs from naive "
                f"attention by {gap:.3f} (expected {fmt(expected[b, h])}, got {fmt(got[b, h])})."
                + (decode_mistake(got, q, k_cache, v_cache, slots, seq_lens, max_seq_len, scale)
                   or mixed_heads(got, q, k_cache, v_cache, slot, length, scale, b, h))
            )


# ---- batched-top-p ----

# two distributions, sorted from most to least likely, exact in binary so that sums hit p exactly
FIRST = [0.375, 0.25, 0.1875, 0.125, 0.0625]
SECOND = [0.5, 0.25, 0.125, 0.0625, 0.0625]
ROWS = [  # (distribution, top_k, top_p)
    (FIRST, 0, 1.0),
    (FIRST, 0, 0.625),  # 0.375 + 0.25 reach 0.625 exactly: two tokens
    (FIRST, 0, 0.63),
    (FIRST, 2, 1.0),
    (FIRST, 4, 0.65),  # the top 4 renormalized (0.4, 0.267, 0.2, 0.133): two tokens reach 0.65
    (FIRST, 1, 0.5),
    (SECOND, 0, 0.75),
    (SECOND, 3, 0.8),  # the top 3 renormalized (0.571, 0.286, 0.143): two tokens reach 0.8
    (FIRST, 0, 0.01),
]


def naive_kept(row: list[float], k: int, p: float) -> tuple[int, list[float]]:
    """How many of a sorted row's tokens survive, and the renormalized top k the nucleus is measured on."""
    top = row[:k] if k > 0 else row
    total = sum(top)
    renormalized = [v / total for v in top]
    kept, mass = 0, 0.0
    for v in renormalized:
        if mass >= p:
            break
        kept, mass = kept + 1, mass + v
    return kept, renormalized


@pytest.mark.exercise("batched-top-p", focused=True)
def test_batched_top_p_cuts_each_row_like_a_naive_loop():
    rows = torch.tensor([row for row, _, _ in ROWS])
    top_k = torch.tensor([k for _, k, _ in ROWS])
    top_p = torch.tensor([p for _, _, p in ROWS])
    got = top_k_top_p(rows.clone(), top_k, top_p)
    assert tuple(got.shape) == tuple(rows.shape), (
        f"top_k_top_p returned shape {tuple(got.shape)}, expected the input's [requests, vocab] = {tuple(rows.shape)}"
    )
    for r, (row, k, p) in enumerate(ROWS):
        out = got[r].tolist()
        where = f"row {r} (sorted probabilities {row}, top_k={k}, top_p={p})"
        assert not any(v != v for v in out), (
            f"{where}: the result holds NaN ({fmt(out, 5)})"
            + (": top_k=0 means no limit, not keep nothing" if k == 0 else "")
        )
        expected, renormalized = naive_kept(row, k, p)
        kept = sum(1 for v in out if v > 0)
        assert all(v > 0 for v in out[:kept]) and not any(v > 0 for v in out[kept:]), (
            f"{where}: got {fmt(out, 5)}; a sorted row keeps a prefix of its most likely tokens and zeroes the rest"
        )
        if kept != expected:
            masses = [sum(renormalized[:i]) for i in range(len(renormalized))]
            if kept > expected:
                i = expected  # the first token that should have gone
                why = (f"it would be dropped by top_k={k} (rank {i + 1} > {k})" if k and i >= k else
                       f"the tokens ranked above it hold {masses[i]:.3f} >= top_p={p}")
            else:
                i = kept  # the first token that should have stayed
                why = (f"the tokens ranked above it hold only {masses[i]:.3f} < top_p={p}, so it belongs to the "
                       "nucleus (the token that crosses p stays" + (", as the most likely token always does" if i == 0
                                                                   else "") + ")")
            measured = (f" The nucleus is measured on the top {k} renormalized to sum 1 "
                        f"({', '.join(f'{v:.3f}' for v in renormalized)})." if k else "")
            _, first_k, first_p = ROWS[0]
            if (k, p) != (first_k, first_p) and naive_kept(row, first_k, first_p)[0] == kept:
                measured += (f" Looks like: this row was cut with row 0's top_k={first_k}, top_p={first_p}; each row "
                             "has its own (index them per row: top_p[:, None])")
            assert False, (
                f"{where}: kept {kept} token(s), expected {expected}: the token at rank {i + 1} "
                f"{'stayed' if kept > expected else 'went'}, but {why}.{measured}"
            )
        ratios = [out[i] / out[0] for i in range(kept)]
        assert all(abs(ratio - row[i] / row[0]) < 1e-5 for i, ratio in enumerate(ratios)), (
            f"{where}: kept {fmt(out[:kept], 5)}, not in the proportions of {fmt(row[:kept], 5)}: scale the kept "
            "probabilities together (or leave them), never one by one"
        )


# ---- admission ----


class FakeEngine:
    """What the scheduler reads of an engine when it admits requests: a real KV cache's slots, and the device."""

    def __init__(self, num_slots: int):
        self.kv_cache = KVCache(1, num_slots, 8, 1, 1, torch.float32, "cpu")
        self.config = SimpleNamespace(eos_token_ids=[255])
        self.device, self.context_length = "cpu", 8


ADMISSION_CASES = [
    # (what the case is about, KV cache slots, max_running_requests, running already,
    #  max_prefill_length, waiting requests as (rid, prompt length), oldest first)
    ("3 waiting for 2 free slots", 2, 2, 0, 4096, [("a", 5), ("b", 5), ("c", 5)]),
    ("b overflows the prefill budget", 4, 4, 0, 10, [("a", 6), ("b", 6), ("c", 2)]),
    ("b fits the budget exactly", 4, 4, 0, 10, [("a", 4), ("b", 6), ("c", 1)]),
    ("a prompt longer than the whole budget", 2, 2, 0, 4, [("long", 9), ("short", 1)]),
    ("the running set has room for one more", 4, 2, 1, 4096, [("a", 3), ("b", 3)]),
    ("one free slot, room for three more", 3, 4, 2, 4096, [("a", 3), ("b", 3)]),
    ("no free slot", 1, 1, 1, 4096, [("a", 3)]),
]


def naive_admission(free_slots: int, max_running: int, running: int, budget: int, waiting) -> list[str]:
    """Oldest first: stop at the first request with no slot, no room, or no budget left (one always goes in)."""
    admitted = []
    for rid, length in waiting:
        if len(admitted) == free_slots or running + len(admitted) == max_running:
            break
        if admitted and length > budget:
            break
        admitted.append(rid)
        budget -= length
    return admitted


def admission_mistake(got, expected, free_slots, max_running, running, budget, waiting) -> str:
    order = [rid for rid, _ in waiting]
    lengths = dict(waiting)
    for rid in got:
        older = [other for other in order[: order.index(rid)] if other not in got]
        if older:
            return (f"{rid!r} was admitted ahead of {older[0]!r}, which is older and still waiting: admission is "
                    "first come, first served, so stop at the first request that cannot go in, never skip ahead")
    if got != [rid for rid in order if rid in got]:
        return "the requests were admitted out of order: take them oldest first"
    if len(got) > free_slots:
        return f"{len(got)} admitted but only {free_slots} KV cache slot(s) are free"
    if running + len(got) > max_running:
        return (f"{running} running + {len(got)} admitted is over max_running_requests={max_running}: count the "
                "running requests too")
    if len(got) > 1 and sum(lengths[rid] for rid in got) > budget:
        return (f"their prompts add up to {sum(lengths[rid] for rid in got)} tokens, over max_prefill_length={budget}"
                ": stop at the first request that does not fit in what is left of the budget")
    if not got and expected:
        return (f"{expected[0]!r} was not let in; when it is the first of the step it goes in whatever its length "
                "(otherwise a prompt longer than max_prefill_length would wait forever)")
    missing = expected[len(got)]
    left = budget - sum(lengths[rid] for rid in got)
    if lengths[missing] <= left:
        return (f"{missing!r} ({tokens(lengths[missing])}) fits in the {tokens(left)} of budget left: a request fits "
                "when its prompt is <= what is left")
    return f"{missing!r} should have been admitted too"


def tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


@pytest.mark.exercise("admission", focused=True)
def test_admission_takes_waiting_requests_like_a_naive_loop():
    tokenizer = SimpleNamespace(eos_token_id=None, backend_tokenizer=None)
    for about, num_slots, max_running, running, budget, waiting in ADMISSION_CASES:
        engine = FakeEngine(num_slots)
        scheduler = Scheduler(engine, tokenizer, max_running_requests=max_running, max_prefill_length=budget)
        for i in range(running):
            busy = Request(f"running-{i}", [1, 2], SamplingParams(), print)
            busy.slot = engine.kv_cache.allocate()
            scheduler.running.append(busy)
        requests = {rid: Request(rid, list(range(3, 3 + length)), SamplingParams(), print) for rid, length in waiting}
        scheduler.waiting.extend(requests.values())
        free_before = list(engine.kv_cache.free_slots)
        case = (f"{about}: {len(free_before)} free slot(s), {running} running of max_running_requests={max_running}, "
                f"max_prefill_length={budget}, waiting {', '.join(f'{rid} ({tokens(n)})' for rid, n in waiting)}")

        admitted = scheduler.admit()

        got = [r.rid for r in admitted]
        assert len(scheduler.running) == running, (
            f"{case}: admit changed the running set to {[r.rid for r in scheduler.running]}: it only returns the "
            "admitted requests (step adds them to running)"
        )
        expected = naive_admission(len(free_before), max_running, running, budget, waiting)
        assert got == expected, (
            f"{case}: admitted {got}, expected {expected}: "
            + admission_mistake(got, expected, len(free_before), max_running, running, budget, waiting)
        )
        still = [r.rid for r in scheduler.waiting]
        assert still == [rid for rid, _ in waiting if rid not in expected], (
            f"{case}: after admitting {got}, waiting holds {still}: the admitted ones leave the queue, the others "
            "stay in their order"
        )
        slots = [r.slot for r in admitted]
        assert len(set(slots)) == len(slots) and all(slot in free_before for slot in slots), (
            f"{case}: the admitted requests got slots {slots}; each needs its own slot, taken from the free ones "
            f"{free_before} (kv_cache.allocate())"
        )
        assert sorted(engine.kv_cache.free_slots + slots) == sorted(free_before), (
            f"{case}: free slots went from {free_before} to {engine.kv_cache.free_slots} after admitting {got}: take "
            "each slot with kv_cache.allocate(), so it is no longer free"
        )
        for request in admitted:
            assert isinstance(request.generator, torch.Generator), (
                f"{case}: admitted request {request.rid!r} has no random stream (request.generator is "
                f"{request.generator!r}): make one with make_generator(its seed, the engine's device)"
            )
            assert isinstance(request.text, TextStream), (
                f"{case}: admitted request {request.rid!r} has no TextStream (request.text is {request.text!r}): "
                "make one with its stop strings"
            )
