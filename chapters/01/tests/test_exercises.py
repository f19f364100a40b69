"""One focused test per exercise of chapter 01: `pytest chapters/01 --learn -k NAME -x` reaches it first.

Each one calls the exercise's function directly on a few small hand-made inputs, compares it with a
naive reference written out in the test (a plain loop over tokens, heads and positions), and on a
mismatch says what is wrong in the exercise's own terms: which token, which head, which position,
expected against got, and, where the wrong output matches a known mistake, which mistake it was. No
model is loaded; each runs in a fraction of a second.
"""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from minisgl.generate import TextStream
from minisgl.layers.attention import cached_attention
from minisgl.layers.rotary import apply_rotary
from minisgl.sampling import top_p_filter


def fmt(values, limit: int = 4) -> str:
    """The first few numbers of a vector, short enough for a failure line."""
    values = [float(v) for v in values]
    shown = ", ".join(f"{v:.3f}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


# ---- rope ----


def naive_rotary(x: torch.Tensor, angles: list[list[float]]) -> torch.Tensor:
    """Rotate channel pair (i, i + d/2) of every head of token t by angles[t][i], one number at a time."""
    tokens, heads, d = x.shape
    half = d // 2
    out = torch.empty_like(x)
    for t in range(tokens):
        for h in range(heads):
            for i in range(half):
                c, s = math.cos(angles[t][i]), math.sin(angles[t][i])
                a, b = float(x[t, h, i]), float(x[t, h, i + half])
                out[t, h, i], out[t, h, i + half] = a * c - b * s, b * c + a * s
    return out


def rope_mistake(got, x, angles) -> str:
    """Name the mistake whose output ``got`` equals, if it is one of the usual ones."""
    tokens, heads, d = x.shape
    half = d // 2
    adjacent = x.clone()  # pairs (2i, 2i + 1): the other RoPE layout
    for t in range(tokens):
        for i in range(half):
            c, s = math.cos(angles[t][i]), math.sin(angles[t][i])
            a, b = x[t, :, 2 * i].clone(), x[t, :, 2 * i + 1].clone()
            adjacent[t, :, 2 * i], adjacent[t, :, 2 * i + 1] = a * c - b * s, b * c + a * s
    candidates = {
        "it rotates adjacent channels (2i, 2i + 1), but these checkpoints pair channel i with channel "
        "i + head_dim/2 (the first half with the second half)": adjacent,
        "it turns every pair the wrong way (by -angle): the first half becomes x1*cos - x2*sin and the "
        "second half x2*cos + x1*sin": naive_rotary(x, [[-a for a in row] for row in angles]),
        "head h got the angles of token h: cos and sin are [tokens, head_dim/2], so give them a heads "
        "axis (cos[:, None]) so each token's angles apply to all of its heads": torch.stack(
            [naive_rotary(x[t : t + 1].transpose(0, 1), angles[:heads]).transpose(0, 1)[0] for t in range(tokens)]
        ),
        "it returns x unrotated": x,
    }
    for why, candidate in candidates.items():
        if candidate.shape == got.shape and torch.allclose(got, candidate, atol=1e-5):
            return f" Looks like: {why}."
    return (
        f" Channel i pairs with channel i + {half} (head_dim/2) and turns by angle cos[t, i], sin[t, i]: "
        "(x[i]*cos - x[i+d/2]*sin, x[i+d/2]*cos + x[i]*sin)."
    )


@pytest.mark.exercise("rope", focused=True)
def test_rope_rotates_each_channel_pair_like_a_naive_loop():
    tokens, heads, head_dim, theta = 3, 3, 8, 10000.0
    positions = [3, 1, 7]
    x = torch.randn(tokens, heads, head_dim, generator=torch.Generator().manual_seed(0))
    angles = [[p * theta ** (-2 * i / head_dim) for i in range(head_dim // 2)] for p in positions]
    cos = torch.tensor([[math.cos(a) for a in row] for row in angles])
    sin = torch.tensor([[math.sin(a) for a in row] for row in angles])

    got = apply_rotary(x.clone(), cos, sin)
    expected = naive_rotary(x, angles)
    assert tuple(got.shape) == tuple(x.shape), (
        f"apply_rotary returned shape {tuple(got.shape)}; it must keep x's shape [tokens, heads, head_dim] "
        f"= {tuple(x.shape)} (cos and sin are [tokens, head_dim/2] = {tuple(cos.shape)})"
    )
    half = head_dim // 2
    for t in range(tokens):
        for h in range(heads):
            for c in range(head_dim):
                if abs(float(got[t, h, c]) - float(expected[t, h, c])) > 1e-4:
                    i = c % half
                    assert False, (
                        f"token {t} (position {positions[t]}), head {h}, channel {c} (pair {i}: channels {i} and "
                        f"{i + half}, angle {angles[t][i]:.3f}): expected {float(expected[t, h, c]):.4f}, got "
                        f"{float(got[t, h, c]):.4f}; the whole head: expected {fmt(expected[t, h], 8)}, got "
                        f"{fmt(got[t, h], 8)}." + rope_mistake(got, x, angles)
                    )


# ---- kv-attention ----


def naive_attention(q, k_all, v_all, start, scale, kv_head=None, visible=None, first=None):
    """Attention one query at a time: new token t (position start + t) of head h reads keys first .. visible - 1
    of KV head h // group. The keyword arguments describe the usual mistakes instead."""
    n, heads, _ = q.shape
    group = heads // k_all.shape[1]
    kv_head = kv_head or (lambda h: h // group)
    visible = visible or (lambda t: start + t + 1)
    first = first or (lambda t: 0)
    out = torch.zeros_like(q)
    for t in range(n):
        keys = range(first(t), visible(t))
        for h in range(heads):
            j = kv_head(h)
            scores = torch.stack([q[t, h] @ k_all[p, j] for p in keys]) * scale
            weights = scores.softmax(dim=0)
            out[t, h] = sum(w * v_all[p, j] for w, p in zip(weights, keys))
    return out


def attention_mistake(got, q, k_all, v_all, start, scale) -> str:
    n, heads, _ = q.shape
    kv_heads = k_all.shape[1]
    group = heads // kv_heads
    candidates = {
        f"query i sees keys 0 .. i, as if the new tokens sat at positions 0 .. n-1; they sit at positions "
        f"start .. start+n-1 (here {start} .. {start + n - 1}), so new token i may see keys 0 .. start+i":
            dict(visible=lambda t: t + 1),
        "every new token sees every new token, its future included: mask the keys after each query's position":
            dict(visible=lambda t: start + n),
        f"query head h reads KV head h % {kv_heads}; with {heads} query heads and {kv_heads} KV heads, each KV "
        f"head serves a group of {group} consecutive query heads: query head h reads KV head h // {group}":
            dict(kv_head=lambda h: h % kv_heads),
        "the new tokens attend only to each other: the earlier tokens' keys and values are in "
        "k_cache[:start], v_cache[:start]": dict(first=lambda t: start),
        "the scores are not scaled by `scale` (1/sqrt(head_dim))": dict(scale_one=True),
    }
    for why, mistake in candidates.items():
        candidate_scale = 1.0 if mistake.pop("scale_one", False) else scale
        candidate = naive_attention(q, k_all, v_all, start, candidate_scale, **mistake)
        if torch.allclose(got, candidate, atol=1e-4):
            return f" Looks like: {why}."
    return ""


def mixed_heads(got, q, k_all, v_all, start, scale, t: int, h: int) -> str:
    """If new token t's head h holds the attention of another query head, or over another KV head, say which."""
    heads, kv_heads = q.shape[1], k_all.shape[1]
    keys = range(start + t + 1)
    for a in range(heads):
        for b in range(kv_heads):
            weights = (torch.stack([q[t, a] @ k_all[p, b] for p in keys]) * scale).softmax(dim=0)
            if (a, b) != (h, h // (heads // kv_heads)) and torch.allclose(
                got[t, h], sum(w * v_all[p, b] for w, p in zip(weights, keys)), atol=1e-4
            ):
                return (f" Head {h}'s output is query head {a} attending over KV head {b}; it should be query head "
                        f"{h} over KV head {h // (heads // kv_heads)}: check how heads are split into groups and "
                        "merged back.")
    return ""


@pytest.mark.exercise("kv-attention", focused=True)
def test_kv_attention_matches_naive_attention_at_every_position():
    heads, kv_heads, d, capacity = 4, 2, 8, 8
    generator = torch.Generator().manual_seed(1)
    # a prefill with nothing cached, new tokens after a cached past, one decode step
    for start, n in [(0, 4), (3, 2), (5, 1)]:
        total = start + n
        q = torch.randn(n, heads, d, generator=generator)
        k_all, v_all = torch.randn(total, kv_heads, d, generator=generator), torch.randn(total, kv_heads, d,
                                                                                         generator=generator)
        k_cache, v_cache = torch.zeros(capacity, kv_heads, d), torch.zeros(capacity, kv_heads, d)
        k_cache[:start], v_cache[:start] = k_all[:start], v_all[:start]  # the past, already cached
        case = f"start={start}, {n} new token(s) ({start} cached + {n} new)"

        got = cached_attention(q, k_all[start:].clone(), v_all[start:].clone(), k_cache, v_cache, start, d**-0.5)

        for name, cache, new in (("k_cache", k_cache, k_all), ("v_cache", v_cache, v_all)):
            assert torch.equal(cache[:total], new), (
                f"{case}: {name}[{start}:{total}] does not hold the new tokens' "
                f"{'keys' if name == 'k_cache' else 'values'} afterwards: write them into the cache at positions "
                f"start .. start+n-1" + (f" (and leave {name}[:{start}], the past, as it was)" if start else "")
            )
        assert tuple(got.shape) == (n, heads, d), (
            f"{case}: cached_attention returned shape {tuple(got.shape)}, expected [n, heads, d] = {(n, heads, d)}"
        )
        expected = naive_attention(q, k_all, v_all, start, d**-0.5)
        for t in range(n):
            for h in range(heads):
                gap = float((got[t, h] - expected[t, h]).abs().max())
                assert gap <= 1e-4, (
                    f"{case}, new token {t} (position {start + t}, may see keys 0 .. {start + t}), head {h} (uses KV "
                    f"head {h // (heads // kv_heads)}): output differs from naive attention by {gap:.3f} (expected "
                    f"{fmt(expected[t, h])}, got {fmt(got[t, h])})."
                    + (attention_mistake(got, q, k_all, v_all, start, d**-0.5)
                       or mixed_heads(got, q, k_all, v_all, start, d**-0.5, t, h))
                )


# ---- top-p ----

# probabilities by token id, exact in binary so that running sums hit p exactly;
# ranked: token 3 (0.375), 0 (0.25), 4 (0.1875), 1 (0.125), 2 (0.0625)
EXACT = [0.25, 0.125, 0.0625, 0.375, 0.1875]
# not exact in binary: 0.65 - 0.25 rounds below 0.4 in float32, where the mass before token 0 is exactly 0.4
DECIMAL = [0.25, 0.10, 0.04, 0.40, 0.15, 0.06]
TOP_P_CASES = [(EXACT, p) for p in (0.5, 0.375, 0.625, 0.7, 0.95, 0.01, 1.0)] + [(DECIMAL, 0.4)]


def naive_nucleus(probs: list[float], p: float) -> list[int]:
    """Walk the tokens from most to least likely; take each while the ones taken hold less than p."""
    kept, mass = [], 0.0
    for token in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= p:
            break
        kept.append(token)
        mass += probs[token]
    return kept


@pytest.mark.exercise("top-p", focused=True)
def test_top_p_keeps_exactly_the_nucleus_token_by_token():
    for listed, p in TOP_P_CASES:
        probs = torch.tensor(listed)
        values = probs.tolist()  # as float32 holds them
        got = top_p_filter(probs.clone(), p)
        case = f"p={p}, probabilities by token id {listed}"
        assert tuple(got.shape) == tuple(probs.shape), (
            f"{case}: top_p_filter returned shape {tuple(got.shape)}, expected the input's {tuple(probs.shape)}"
        )
        expected = naive_nucleus(values, p)
        by_id = torch.tensor([values[t] if t in expected else 0.0 for t in range(len(values))])
        by_rank = torch.tensor([values[t] for t in expected] + [0.0] * (len(values) - len(expected)))
        assert not (torch.equal(got, by_rank) and not torch.equal(got, by_id)), (
            f"{case}: the result is in sorted order ({fmt(got, 6)}), not by token id (expected {fmt(by_id, 6)}): "
            "put each kept probability back at its token's id (scatter with the sort's order)"
        )
        kept = [token for token in range(len(values)) if got[token] > 0]
        ranked = sorted(range(len(values)), key=lambda i: -values[i])
        for rank, token in enumerate(ranked):
            mass = sum(values[other] for other in ranked[:rank])
            where = f"{case}: token {token} (probability {values[token]:.4g}, rank {rank + 1})"
            if token in expected and token not in kept:
                assert False, (
                    f"{where} was dropped, but the tokens ranked above it hold only {mass:.4g} < p={p}: a token "
                    "stays while the mass before it is below p, so the token that crosses p belongs to the nucleus"
                    + (" (and the most likely token always stays)" if rank == 0 else "")
                )
            if token in kept and token not in expected:
                assert False, (
                    f"{where} kept although the mass before it is {mass:.4g} >= p={p}"
                    + (": that mass is exactly p, so the nucleus is already complete (compare with >=)"
                       if abs(mass - p) < 1e-6 and listed is EXACT else "")
                    + (": that mass is exactly p, so the nucleus is already complete. Take the mass before each token "
                       "as the running sum shifted by one: the running sum minus the token itself rounds, here to "
                       "just below p" if abs(mass - p) < 1e-6 and listed is DECIMAL else "")
                )
        for token in kept:
            assert float(got[token]) == values[token], (
                f"{case}: kept token {token} has {float(got[token]):.4f} instead of its probability "
                f"{values[token]:.4g}: leave the kept probabilities as they are and zero the rest (sampling "
                "renormalizes)"
            )


# ---- stop-strings ----


class PieceTokenizer:
    """A tokenizer whose tokens are the given text pieces (token i decodes to pieces[i]), for TextStream."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.backend_tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[0]))
        self.backend_tokenizer.decoder = decoders.Fuse()  # join the pieces as they are

    def ids(self, pieces: list[str]) -> list[int]:
        return [self.pieces.index(p) for p in pieces]


def naive_visible(text: str, stops: list[str]) -> tuple[str, bool]:
    """What may be shown of ``text`` so far: everything before the earliest stop string, if one appeared;
    else everything before the first place from which the rest could still grow into a stop string."""
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return text[: min(hits)], True
    for j in range(len(text)):
        if any(s.startswith(text[j:]) for s in stops):
            return text[:j], False
    return text, False


def stream_problem(shown: str, expected: str, stops: list[str], text: str) -> str:
    """Why the text released so far (``shown``) is not what it should be (``expected``)."""
    stopped = naive_visible(text, stops)[1]
    found = sorted((s for s in stops if s in text), key=text.find)
    if shown.startswith(expected):
        extra = shown[len(expected) :]
        if stopped:
            several = (f" (of the stop strings found, {found}, cut at the one that begins first in the text, not the "
                       "first in the list)" if len(found) > 1 else "")
            return (f"it released {extra!r}, which is part of the stop string or text after it: release only what "
                    f"comes before {found[0]!r}, where the earliest stop string begins{several}")
        tail = text[len(expected) :]
        stop = next(s for s in stops if s.startswith(tail))
        return (f"it released {extra!r}, but {tail!r} could still grow into the stop string {stop!r}: hold back a "
                "possible stop-string prefix until you know")
    if expected.startswith(shown):
        missing = expected[len(shown) :]
        if stopped:
            return (f"it held back {missing!r}, which comes before the stop string {found[0]!r} (at character "
                    f"{text.find(found[0])} of the text): release everything before it")
        return (f"it holds back {missing!r}, which cannot begin any of the stop strings {stops}: release it (hold "
                "back only a tail of the text that is the beginning of a stop string)")
    return ("what it released is not a beginning of the text: each call returns only the new text, once, in "
            "order, never text it released before")


STREAMS = [
    # (stop strings, the tokens' pieces, in order)
    ([" six"], ["It", " is", " si", "lly", ",", " si", "x", " more"]),
    (["STOP-HERE"], ["The", " answer", " is", " 42", ".", " ST", "OP", "-HE", "RE", " and", " more"]),
    (["b c", "a b"], ["x", " a b c", " d"]),  # two stop strings in one token: cut at the earlier one
    (["aab"], ["a", "a", "a", "b", "c"]),  # the stop string starts one character later than it seemed
    (["ENDX"], ["a bit", " EN", "D of", " it"]),  # held back, then not a stop string after all
    (["\n\n"], ["Hi", "\n", "\n", "there"]),
    ([], ["no", " stop", " strings"]),
]


@pytest.mark.exercise("stop-strings", focused=True)
def test_stop_strings_are_held_back_and_cut_token_by_token():
    tokenizer = PieceTokenizer(sorted({piece for _, pieces in STREAMS for piece in pieces}))
    for stops, pieces in STREAMS:
        stream = TextStream(tokenizer, stop=stops)
        text, shown = "", ""
        for k, (piece, token_id) in enumerate(zip(pieces, tokenizer.ids(pieces))):
            released, stopped = stream.add(token_id)
            text += piece
            shown += released
            expected, expected_stop = naive_visible(text, stops)
            where = f"stop strings {stops}: after adding token {k} {piece!r} (the text is now {text!r})"
            if expected_stop and not stopped:
                hit = min((s for s in stops if s in text), key=text.find)
                assert False, f"{where}, the stop string {hit!r} has appeared, but add returned stopped=False"
            assert stopped == expected_stop, f"{where}, add returned stopped=True, but no stop string appears yet"
            assert shown == expected, (
                f"{where}, the stream has released {shown!r} in all, expected {expected!r}: "
                + stream_problem(shown, expected, stops, text)
            )
            if stopped:
                break
        else:
            rest = stream.flush()
            assert shown + rest == text, (
                f"stop strings {stops}: the text was {text!r} and no stop string appeared, but the stream released "
                f"{shown!r} and then flush() gave {rest!r}: everything held back must come out at the end"
            )
