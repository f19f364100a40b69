"""The epilogue's exercises: ``bitmask`` (xgrammar's packed token bitmask unpacked into allowed tokens, in
``grammar.py``) and ``logit-order`` (the sampling step's order: log probabilities, penalties, ``logit_bias``, the
grammar's mask, then sampling, in ``sampling.py``).

Each runs on small tensors and a vocabulary of a few tokens, with no model and no server; the first test of
each exercise compares the learner's function with a plain computation written here, and says where it differs.
"""

from types import SimpleNamespace

import pytest
import torch
import xgrammar as xgr

from minisgl.core import SamplingParams
from minisgl.grammar import apply_grammar_masks, unpack_bits
from minisgl.sampling import SamplingBatch, make_generator, sampler

NEG_INF = float("-inf")


def bits_by_hand(words: list[list[int]], vocab_size: int) -> list[list[bool]]:
    """Token t is allowed when bit t % 32 of word t // 32 is set (the words as unsigned 32-bit numbers)."""
    return [[bool(((row[t // 32] & 0xFFFFFFFF) >> (t % 32)) & 1) for t in range(vocab_size)] for row in words]


def signed(word: int) -> int:
    """A 32-bit pattern as the int32 value a torch tensor holds (bit 31 set: negative)."""
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.mark.exercise("bitmask", focused=True)
def test_unpack_bits_gives_each_token_its_own_bit():
    vocab_size = 70  # three words of 32 bits: the last 26 bits of the last word are padding
    words = [
        [1 | 1 << 5 | 1 << 31, 1 << 0, 1 << 5],  # tokens 0, 5, 31 (the sign bit), 32, 69
        [0xFFFFFFFF, 0, 0xFFFFFFFF],  # every bit of words 0 and 2: tokens 0-31 and 64-69, then padding
        [0, 0x80000001, 0],  # tokens 32 and 63
    ]
    bitmask = torch.tensor([[signed(w) for w in row] for row in words], dtype=torch.int32)
    got = unpack_bits(bitmask, vocab_size)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool, "return a tensor of booleans"
    assert tuple(got.shape) == (3, vocab_size), (
        f"shape {tuple(got.shape)}, expected (3, {vocab_size}): one entry per token, the padding bits of the last "
        "word cut off" + (" (not cut: 3 words are 96 bits)" if tuple(got.shape) == (3, 96) else "")
    )
    expected = bits_by_hand(words, vocab_size)
    for row in range(3):
        for token in range(vocab_size):
            word, bit = divmod(token, 32)
            assert got[row, token].item() == expected[row][token], (
                f"request {row}, token {token} (bit {bit} of word {word}): expected {expected[row][token]}, got "
                f"{got[row, token].item()}. Token t is bit t % 32 of word t // 32, counted from the lowest bit"
                + (" (bit 31 makes an int32 word negative: shift and keep only the lowest bit, & 1)"
                   if bit == 31 else "")
            )


def tiny_vocabulary() -> tuple[list[str], int]:
    """Eight tokens and an end-of-sequence token, the last one: enough to watch a regex cut the vocabulary."""
    return ["y", "ye", "yes", "n", "no", "not", "Yes", " yes", "</s>"], 8


def compile_tiny(regex: str) -> "xgr.CompiledGrammar":
    tokens, eos = tiny_vocabulary()
    info = xgr.TokenizerInfo(tokens, vocab_size=len(tokens), stop_token_ids=[eos])
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_regex(regex)


@pytest.mark.exercise("bitmask")
def test_a_regex_leaves_exactly_its_tokens_allowed():
    tokens, eos = tiny_vocabulary()
    matcher = xgr.GrammarMatcher(compile_tiny("(yes|no)"))
    filled = xgr.allocate_token_bitmask(1, len(tokens))
    matcher.fill_next_token_bitmask(filled, 0)
    allowed = {tokens[t] for t in unpack_bits(filled, len(tokens))[0].nonzero().flatten().tolist()}
    assert allowed == {"y", "ye", "yes", "n", "no"}, f"allowed at the start of (yes|no): {sorted(allowed)}"
    assert matcher.accept_token(tokens.index("yes"))
    matcher.fill_next_token_bitmask(filled, 0)
    assert unpack_bits(filled, len(tokens))[0].nonzero().flatten().tolist() == [eos], "after yes: only the end"


@pytest.mark.exercise("bitmask")
def test_grammar_masks_touch_only_the_constrained_rows():
    tokens, _ = tiny_vocabulary()
    logits = torch.arange(3 * len(tokens), dtype=torch.float32).view(3, len(tokens))
    free = logits[1].clone()
    apply_grammar_masks(logits, [xgr.GrammarMatcher(compile_tiny("(yes|no)")), None,
                                 xgr.GrammarMatcher(compile_tiny("n(o|ot)"))])
    kept = {row: [tokens[t] for t in range(len(tokens)) if logits[row, t] > NEG_INF] for row in (0, 2)}
    assert kept == {0: ["y", "ye", "yes", "n", "no"], 2: ["n", "no", "not"]}, f"the tokens left: {kept}"
    assert torch.equal(logits[1], free), "the unconstrained row must keep its logits as they were"
    assert logits[0, 0].item() == 0.0 and logits[2, 3].item() == 2 * len(tokens) + 3, "allowed logits stay as they were"


def batch_of(rows: list[SamplingParams], mask=None, counts: torch.Tensor | None = None) -> SamplingBatch:
    """A SamplingBatch for requests of these parameters, each with its own seeded random stream, request i in
    slot i of ``counts`` (the engine's token counts, for the penalties)."""
    requests = [SimpleNamespace(uid=f"r{i}", params=p, generator=make_generator(i), slot=i) for i, p in enumerate(rows)]
    return SamplingBatch.build(requests, "cpu", mask, counts)


def counts_of(slots: int, vocab: int, generated: dict[tuple[int, int], int]) -> torch.Tensor:
    """Token counts as the engine keeps them: generated[(slot, token)] = how often that slot's request made it."""
    counts = torch.zeros(slots, vocab, dtype=torch.int32)
    for (slot, token), n in generated.items():
        counts[slot, token] = n
    return counts


def forbid(row: int, token_ids: list[int]):
    """A grammar's mask as the engine gets it: a function that sets a row's forbidden logits to -inf in place."""

    def mask(logits: torch.Tensor) -> None:
        logits[row, token_ids] = NEG_INF

    return mask


@pytest.mark.exercise("logit-order", focused=True)
def test_sampler_applies_bias_then_mask_then_samples():
    # Row 0: a bias of +1.5 on token 2 (logit 3.0) beats token 4 (logit 4.0) only if it is added, not set.
    # Row 1: the grammar forbids tokens 4 and 5; the client's +100 on token 5 cannot bring it back.
    # Row 2: wants its log probabilities, which must be the model's own, before its bias of +100 on token 0 and
    # before its presence penalty of 2 on token 1, which it generated once.
    # Row 3: a repetition penalty of 2 on tokens 1 and 3, generated once each, and then a bias of +1.5 on token 1:
    # penalties, then bias: token 1 (3.0 / 2 + 1.5 = 3.0 against 2.5 and 4.6 / 2); bias first: token 2 (token 1
    # at (3.0 + 1.5) / 2 = 2.25); no penalty: token 3 (4.6).
    raw = torch.tensor([[0.0, 1.0, 3.0, 2.0, 4.0, -1.0],
                        [0.0, 1.0, 2.0, 0.5, 9.0, 3.0],
                        [0.0, 5.0, 1.0, 2.0, 3.0, 4.0],
                        [0.0, 3.0, 2.5, 4.6, -1.0, 0.5]])
    params = [SamplingParams(logit_bias={2: 1.5}), SamplingParams(logit_bias={5: 100.0}),
              SamplingParams(logit_bias={0: 100.0}, logprobs=2, presence_penalty=2.0),
              SamplingParams(logit_bias={1: 1.5}, repetition_penalty=2.0)]
    counts = counts_of(4, 6, {(2, 1): 1, (3, 1): 1, (3, 3): 1})
    tokens, logprobs = sampler(raw.clone(), batch_of(params, forbid(1, [4, 5]), counts))
    assert isinstance(tokens, torch.Tensor), "return the tokens as a tensor (sample gives one)"
    tokens = tokens.tolist()
    assert tokens[0] == 2, (f"row 0 chose {tokens[0]}, expected 2: its bias of +1.5 is added to token 2's logit 3.0"
                            + (" (got 4: was the bias set, or left out, rather than added?)" if tokens[0] == 4 else ""))
    assert tokens[1] == 2, (f"row 1 chose {tokens[1]}, expected 2: the mask forbids tokens 4 and 5, so the best "
                            "allowed token wins" + (" (was the mask applied before sampling?)"
                                                    if tokens[1] in (4, 5) else ""))
    assert tokens[2] == 0, f"row 2 chose {tokens[2]}, expected 0: its +100 bias makes it the best"
    assert tokens[3] == 1, (f"row 3 chose {tokens[3]}, expected 1: the penalties change the model's logits, then the "
                            "bias is added" + {2: " (got 2: was the bias added before the penalties?)",
                                               3: " (got 3: were the penalties applied? apply_penalties does it)"}
                            .get(tokens[3], ""))
    assert logprobs[0] is None and logprobs[1] is None and logprobs[3] is None, (
        "only row 2 asked for log probabilities: None for the others")
    assert logprobs[2] is not None, "row 2 asked for log probabilities"
    chosen, top = logprobs[2]
    model = torch.log_softmax(raw[2], dim=-1)
    assert chosen == pytest.approx(model[0].item(), abs=1e-5), (
        f"row 2's chosen token 0 has log probability {chosen:.4f}, expected the model's own {model[0].item():.4f}"
        + (" (that is after its bias: take the log probabilities first)" if chosen > -1 else "")
    )
    assert [token for token, _ in top] == [1, 5], f"row 2's two likeliest tokens, by the model's own logits: {top}"


@pytest.mark.exercise("logit-order")
def test_sampler_reports_the_same_logprobs_whatever_the_sampling():
    raw = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0]])
    reported = []
    for params, mask in [(SamplingParams(logprobs=3), None),
                         (SamplingParams(logprobs=3, temperature=0.7, top_k=2, seed=1), None),
                         (SamplingParams(logprobs=3, logit_bias={3: 50.0}), forbid(0, [0, 1])),
                         (SamplingParams(logprobs=3, frequency_penalty=2.0, min_p=0.2, temperature=1.0, seed=2), None)]:
        _, logprobs = sampler(raw.clone(), batch_of([params], mask, counts_of(1, 5, {(0, 0): 3})))
        reported.append(logprobs[0])
    first_chosen, first_top = reported[0]
    for chosen, top in reported[1:]:
        assert [t for t, _ in top] == [t for t, _ in first_top], "the top log probabilities are the model's own"
        assert [v for _, v in top] == pytest.approx([v for _, v in first_top], abs=1e-6)
    model = torch.log_softmax(raw[0], dim=-1)
    assert reported[2][0] == pytest.approx(model[3].item(), abs=1e-5), "the chosen token's, before bias and mask"


@pytest.mark.exercise("logit-order")
def test_sampler_draws_only_what_the_grammar_allows():
    raw = torch.zeros(2, 6)  # flat: every token equally likely until the mask
    params = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, seed=4, logit_bias={1: 100.0})]
    allowed = {0: {2, 3}, 1: {4, 5}}  # row 1's +100 on token 1 cannot bring it back

    def mask(logits: torch.Tensor) -> None:
        for row, ok in allowed.items():
            forbid(row, [t for t in range(6) if t not in ok])(logits)

    batch = batch_of(params, mask)
    drawn = {0: set(), 1: set()}
    for _ in range(40):
        tokens, _ = sampler(raw.clone(), batch)
        for row, token in enumerate(tokens.tolist()):
            drawn[row].add(token)
    for row, ok in allowed.items():
        assert drawn[row] <= ok, f"row {row} drew {sorted(drawn[row] - ok)}, which its grammar forbids"
        assert drawn[row] == ok, f"row {row} drew only {sorted(drawn[row])} of {sorted(ok)} in 40 steps"
