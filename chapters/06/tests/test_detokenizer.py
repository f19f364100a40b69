"""The detokenizer's side of "one client never hurts the others", in-process: the stop-string check costs
in proportion to the new text (and gives the same results as the check that tried every prefix of every
stop string), and a request whose tokens break the decoder ends alone, with an error, while the others go
on. (The limits on stop strings and the effect on a live server are in ``test_under_load.py``.)
"""

import random

from minisgl.core import SamplingParams
from minisgl.messages import (
    AbortRequest,
    BatchTextOutput,
    BatchTokenOutput,
    NewRequestInfo,
    TokenizeError,
    TokenizeRequest,
    TokenOutput,
    decoder,
)
from minisgl.tokenizer.detokenize import Detokenizer
from minisgl.tokenizer.text_stream import TextStream
from minisgl.tokenizer.worker import detokenize_one, tokenize_one


class PrefixByPrefixStream(TextStream):
    """The check this chapter replaced: every prefix of every stop string, against the end of the text."""

    def _held(self) -> int:
        return max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)


PIECES = ["a", "b", "ab", " ", "x", "\n", "é", "日本", "😀", "café", " the", "."]


def random_case(rng: random.Random) -> tuple[str, list[str]]:
    """A text, and stop strings that often begin in it, span tokens, or almost match and then do not."""
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40)))
    stops = []
    for _ in range(rng.randint(1, 4)):
        start = rng.randrange(len(text))
        piece = text[start : start + rng.randint(1, 12)]
        kind = rng.random()
        if kind < 0.3:
            stops.append(piece)  # it appears (if the earlier ones do not cut the text first)
        elif kind < 0.8:
            stops.append(piece + rng.choice(PIECES) + rng.choice(PIECES))  # its beginning appears, maybe not all
        else:
            stops.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4))))
    return text, stops


def test_the_tail_check_gives_the_same_results_as_checking_every_prefix(tokenizer):
    rng = random.Random(0)
    stopped_cases = 0
    for case in range(400):
        text, stops = random_case(rng)
        new, old = TextStream(tokenizer, stops), PrefixByPrefixStream(tokenizer, stops)
        for k, token in enumerate(tokenizer.encode(text, add_special_tokens=False)):
            got, expected = new.add(token), old.add(token)
            assert got == expected, (case, text, stops, k)
            assert new.matched == old.matched
            if got[1]:
                stopped_cases += 1
                break
        else:
            assert new.flush() == old.flush(), (case, text, stops)
    assert 50 < stopped_cases < 350  # both outcomes were exercised, many times


def test_a_long_held_stop_string_is_held_then_released_or_cut(tokenizer):
    stream = TextStream(tokenizer, ["x" * 255 + "y"])
    x = tokenizer.encode("x", add_special_tokens=False)[0]
    shown = [stream.add(x) for _ in range(300)]
    assert all(piece == ("", False) for piece in shown[:255])  # all of it could still become the stop string
    assert all(piece == ("x", False) for piece in shown[255:])  # now one x per token is past any chance
    y = tokenizer.encode("y", add_special_tokens=False)[0]
    assert stream.add(y) == ("", True) and stream.matched == "x" * 255 + "y"


def new_request(uid: str, token: int) -> TokenOutput:
    return TokenOutput(uid, token, new=NewRequestInfo(uid, prompt_tokens=3, stop=[]))


class BrokenDecoder:
    """What ``DecodeStream.step`` does on some token sequences with some tokenizers."""

    def step(self, _tokenizer, _token):
        raise Exception("Invalid prefix encountered")


class Socket:
    def __init__(self):
        self.sent = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def test_a_request_whose_tokens_break_the_decoder_ends_alone_with_an_error(tokenizer):
    detokenizer = Detokenizer(tokenizer)
    hello, world = tokenizer.encode(" hello world", add_special_tokens=False)
    first, _ = detokenizer.detokenize(BatchTokenOutput([new_request("good", hello), new_request("bad", hello)]))
    assert first.uids == ["good", "bad"]
    detokenizer.states["bad"].stream.decoder = BrokenDecoder()
    to_api, to_scheduler = Socket(), Socket()
    step = BatchTokenOutput([TokenOutput("bad", world), TokenOutput("good", world)])
    detokenize_one(step, detokenizer, to_scheduler, to_api)  # raises nothing
    texts = decoder(BatchTextOutput).decode(to_api.sent[0])
    assert texts.uids == ["bad", "good"]
    assert texts.finish_reasons == ["error", None]
    assert texts.texts[1] == " world"
    assert [decoder(AbortRequest).decode(m).uid for m in to_scheduler.sent] == ["bad"]  # frees its pages
    # The scheduler's outputs for it, sent before the abort arrived, are dropped; the other one goes on.
    last, aborts = detokenizer.detokenize(BatchTokenOutput([TokenOutput("bad", world),
                                                            TokenOutput("good", hello, finish="length")]))
    assert (last.uids, last.texts, last.finish_reasons, aborts) == (["good"], [" hello"], ["length"], [])
    assert last.completion_tokens == [3]
    assert detokenizer.states == {}


def test_a_request_that_breaks_the_tokenizer_is_refused_alone(tokenizer):
    class BrokenTokenizer:
        def tokenize(self, request):
            raise ValueError("no such token")

    to_api, to_scheduler = Socket(), Socket()
    request = TokenizeRequest("odd", SamplingParams(), text="hi")
    tokenize_one(request, BrokenTokenizer(), to_scheduler, to_api)  # raises nothing
    refusal = decoder(TokenizeError).decode(to_api.sent[0])
    assert refusal.uid == "odd" and "no such token" in refusal.message
    assert to_scheduler.sent == []


def test_stop_strings_at_the_limit_cost_a_bounded_number_of_tries_per_token(tokenizer, monkeypatch):
    """Counts, not time: each token tries at most as many tails as the text not yet sent holds, which is
    at most a stop string's length (what is held) plus the new text, however long the reply grows."""
    unsent = []
    original = TextStream._held

    def counted(self):
        unsent.append(len(self.text) - self.sent)
        return original(self)

    monkeypatch.setattr(TextStream, "_held", counted)
    stream = TextStream(tokenizer, ["x" * 255 + end for end in "yz!?"])  # 4 of 256 characters: the limit
    x = tokenizer.encode("x", add_special_tokens=False)[0]
    assert all(stream.add(x)[1] is False for _ in range(600))
    assert len(unsent) == 600 and max(unsent) == 256
