"""One focused test per exercise of chapter 03: `pytest chapters/03 --learn -k NAME -x` reaches it first.

Each one drives the exercise's method directly with hand-made messages, compares what it did with what
a plain walk through the same messages expects, and on a mismatch says what is wrong in the
exercise's own terms: after which message, for which request, expected against got, and, where it
can tell, the likely mistake. No model is loaded (the scheduler gets a stand-in engine, the
detokenizer a tokenizer whose tokens are plain text pieces); each runs in a fraction of a second.
"""

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models

from minisgl.core import Request, SamplingParams
from minisgl.messages import (
    AbortRequest,
    BatchTextOutput,
    BatchTokenOutput,
    NewRequestInfo,
    UserRequest,
    pack_ids,
    unpack_ids,
)
from minisgl.scheduler import Scheduler
from minisgl.tokenizer.detokenize import Detokenizer


def stand_in_scheduler(slots: int) -> Scheduler:
    """A scheduler whose engine is a stand-in: no model, no forward pass (these tests never step it)."""
    engine = SimpleNamespace(kv_cache=SimpleNamespace(num_slots=slots), new_generator=lambda seed: None)
    return Scheduler(engine, max_running_requests=slots, max_prefill_length=4096, eos_ids={255})


def outputs(scheduler) -> list[tuple[str, int, str | None]]:
    return [(request.uid, token, finish) for request, token, finish in scheduler.outputs]


# ---- handle ----


@pytest.mark.exercise("handle", focused=True)
def test_handle_takes_each_message_into_the_state():
    scheduler = stand_in_scheduler(slots=2)
    params = {uid: SamplingParams(max_tokens=8, stop=[f"<{uid}>"]) for uid in "abcd"}

    def arrive(uid: str, prompt: list[int]) -> None:
        scheduler.handle(UserRequest(uid, pack_ids(prompt), params.get(uid, SamplingParams())))

    arrive("a", [5, 6, 7])
    waiting = list(scheduler.waiting)
    assert [getattr(r, "uid", r) for r in waiting] == ["a"], (
        f"after UserRequest('a') arrived, waiting holds {waiting}; expected one Request with uid 'a' (it waits "
        "for a slot; the scheduler admits it later)"
    )
    request = waiting[0]
    assert isinstance(request, Request), f"waiting holds a {type(request).__name__}; expected a core.Request"
    assert request.prompt_ids == [5, 6, 7], (
        f"request 'a' waits with prompt_ids {request.prompt_ids!r}, expected [5, 6, 7]"
        + (": the message carries them packed (bytes); unpack them with unpack_ids"
           if isinstance(request.prompt_ids, bytes) else "")
    )
    assert request.params == params["a"], f"request 'a' has params {request.params}, expected the message's"
    assert not scheduler.outputs, f"a request arriving produced outputs {outputs(scheduler)}; expected none"

    arrive("b", [8, 9])
    arrive("c", [10])
    assert [r.uid for r in scheduler.waiting] == ["a", "b", "c"], (
        f"after requests a, b, c arrived, waiting is {[r.uid for r in scheduler.waiting]}: they wait in the "
        "order they arrived"
    )

    scheduler.running += scheduler.admit()  # a and b take the two slots; c waits
    scheduler.handle(AbortRequest("a"))
    a = next(r for r in [*scheduler.running, request] if r.uid == "a")
    assert [r.uid for r in scheduler.running] == ["b"] and a.slot is None and scheduler.slots.num_free == 1, (
        f"after AbortRequest('a') for a running request: running is {[r.uid for r in scheduler.running]}, its slot "
        f"is {a.slot}, {scheduler.slots.num_free} slot(s) free; expected running ['b'], slot None and 1 free: an "
        "aborted request leaves the running set and frees its slot at once (abort_now does it)"
    )
    assert outputs(scheduler) == [("a", -1, "abort")], (
        f"after AbortRequest('a'), this step's outputs are {outputs(scheduler)}; expected [('a', -1, 'abort')]: "
        "the client must hear that its request ended (abort_now ends it with finish 'abort')"
    )

    scheduler.handle(AbortRequest("c"))
    assert not scheduler.waiting and outputs(scheduler)[1:] == [("c", -1, "abort")], (
        f"after AbortRequest('c') for a waiting request: waiting is {[r.uid for r in scheduler.waiting]}, outputs "
        f"{outputs(scheduler)}; expected waiting empty and a ('c', -1, 'abort') output: a waiting request can be "
        "aborted too, before it ever runs"
    )

    before = outputs(scheduler)
    scheduler.handle(AbortRequest("early"))
    assert outputs(scheduler) == before and not scheduler.waiting and [r.uid for r in scheduler.running] == ["b"], (
        f"an AbortRequest for 'early', a request the scheduler has not seen, changed its state (outputs "
        f"{outputs(scheduler)}, waiting {[r.uid for r in scheduler.waiting]}, running "
        f"{[r.uid for r in scheduler.running]}): there is nothing to abort yet, only to remember"
    )
    arrive("early", [1, 2])
    assert "early" not in [r.uid for r in scheduler.waiting], (
        "AbortRequest('early') arrived before UserRequest('early') (they can overtake each other: they travel through "
        "different tokenizer workers), yet the request was queued when it arrived: remember the uids of aborts that "
        "found no request (early_aborts), and drop the request when it comes"
    )
    arrive("d", [3])
    assert [r.uid for r in scheduler.waiting] == ["d"], (
        f"after UserRequest('d'), waiting is {[r.uid for r in scheduler.waiting]}; expected ['d']: an early abort "
        "drops only the request with its uid"
    )
    before = outputs(scheduler)
    scheduler.handle(AbortRequest("a"))  # a second abort for a request that has already ended
    assert outputs(scheduler) == before, (
        f"a second AbortRequest('a'), for a request already ended, added outputs {outputs(scheduler)[len(before):]}: "
        "an ended request is in neither waiting nor running, so there is nothing to abort"
    )


# ---- step-message ----


def naive_message(step: list[tuple[Request, int, str | None]], announced: set[str]):
    """The message for one step's outputs: every entry in order, and each request not announced before, once."""
    if not step:
        return None
    new = []
    for request, _, _ in step:
        if request.uid not in announced and request.uid not in [r.uid for r in new]:
            new.append(request)
    return (
        [r.uid for r, _, _ in step],
        [token for _, token, _ in step],
        [finish for _, _, finish in step],
        [(r.uid, len(r.prompt_ids), r.params.stop) for r in new],
    )


@pytest.mark.exercise("step-message", focused=True)
def test_step_message_carries_every_output_and_announces_each_request_once():
    scheduler = stand_in_scheduler(slots=4)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(stop=["zz"]))
    b = Request("b", [6, 7, 8], SamplingParams())
    c = Request("c", [9, 9], SamplingParams(stop=["\n", "END"]))
    steps = [
        ("a prefill: a gets a token, b its first and last", [(a, 11, None), (b, 12, "length")]),
        ("a decodes, c is aborted while waiting (it never had a token)", [(a, 13, None), (c, -1, "abort")]),
        ("an idle step", []),
        ("a's last token", [(a, 14, "length")]),
    ]
    announced: set[str] = set()
    for number, (about, step) in enumerate(steps, start=1):
        scheduler.outputs = list(step)
        message = scheduler.flush_outputs()
        expected = naive_message(step, announced)
        where = f"step {number} ({about}; outputs {[(r.uid, token, finish) for r, token, finish in step]})"
        if expected is None:
            assert message is None, f"{where}: flush_outputs returned {message!r}; with no outputs it returns None"
            continue
        assert isinstance(message, BatchTokenOutput), (
            f"{where}: flush_outputs returned {message!r}, expected a BatchTokenOutput"
        )
        uids, token_ids, finishes, new = expected
        assert message.uids == uids, (
            f"{where}: uids {message.uids}, expected {uids}: one entry per output of this step, in order"
            + (" (the outputs of an earlier step came again: clear self.outputs once they are in a message)"
               if len(message.uids) > len(uids) else "")
        )
        assert isinstance(message.token_ids, bytes), (
            f"{where}: token_ids is {message.token_ids!r}; it travels packed: pack_ids({token_ids}) (bytes)"
        )
        assert unpack_ids(message.token_ids) == token_ids, (
            f"{where}: token_ids unpack to {unpack_ids(message.token_ids)}, expected {token_ids}"
        )
        assert message.finish_reasons == finishes, (
            f"{where}: finish_reasons {message.finish_reasons}, expected {finishes}"
        )
        got_new = [(info.uid, info.prompt_tokens, info.stop) for info in message.new_requests]
        if got_new != new:
            again = [uid for uid, _, _ in got_new if uid in announced]
            twice = [uid for uid in {uid for uid, _, _ in got_new} if [u for u, _, _ in got_new].count(uid) > 1]
            missing = [uid for uid, _, _ in new if uid not in [u for u, _, _ in got_new]]
            hint = (
                f"{again[0]!r} was announced in an earlier message already: announce a request only the first time "
                "it appears (mark it request.announced)" if again else
                f"{twice[0]!r} is announced twice in one message: once per request" if twice else
                f"{missing[0]!r} appears for the first time and must be announced (its prompt length and stop "
                "strings), even if it also ends in this step" if missing else
                "each announcement is NewRequestInfo(uid, the prompt's length, the stop strings)"
            )
            assert False, f"{where}: new_requests {got_new}, expected {new}: {hint}"
        assert not scheduler.outputs, (
            f"{where}: self.outputs still holds {len(scheduler.outputs)} entries after the message was made: clear it, "
            "or the next step sends them again"
        )
        announced.update(uid for uid, _, _ in new)


# ---- detokenize-step ----


class PieceTokenizer:
    """A tokenizer whose tokens are the given text pieces (token i decodes to pieces[i])."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.backend_tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[0]))
        self.backend_tokenizer.decoder = decoders.Fuse()  # join the pieces as they are


def naive_visible(text: str, stops: list[str]) -> tuple[str, str | None]:
    """What may be shown of ``text`` so far, and the stop string found, if any: everything before the earliest
    stop string; else everything before the first place from which the rest could still grow into one."""
    hits = sorted((s for s in stops if s in text), key=text.find)
    if hits:
        return text[: text.find(hits[0])], hits[0]
    for j in range(len(text)):
        if any(s.startswith(text[j:]) for s in stops):
            return text[:j], None
    return text, None


# Each request: (uid, stop strings, what the scheduler sends for it step by step as (token's text or None for
# no token, finish reason)). Step i of the test carries event i of every request that has one.
REQUESTS = [
    ("stopper", ["STOP"], [("Hi", None), (" ST", None), ("OP", None), (" more", None)]),  # the last came too late
    ("maxed", ["ENDX"], [("a", None), (" END", "length")]),  # max_tokens with " END" held back
    ("eos", ["!!"], [("Yes", None), ("!", None), (None, "stop")]),  # EOS: no token, "!" held back
    ("late-stop", [" six"], [(" si", None), ("x", "length")]),  # the stop string on the very last token
    ("aborted", [], [("ok", None), (None, "abort")]),
]


def naive_detokenize():
    """Per step, per request: the text the client should get now, the finish reason, and whether an abort goes
    back to the scheduler; a request that ended is forgotten, and what comes for it later is dropped."""
    steps = []
    state = {uid: {"text": "", "shown": "", "tokens": 0, "ended": False} for uid, _, _ in REQUESTS}
    for i in range(max(len(events) for _, _, events in REQUESTS)):
        step = {}
        for uid, stops, events in REQUESTS:
            s = state[uid]
            if i >= len(events) or s["ended"]:
                continue
            piece, finish = events[i]
            abort = False
            if piece is not None:
                s["text"] += piece
                s["tokens"] += 1
                visible, hit = naive_visible(s["text"], stops)
                if hit:
                    abort, finish = finish is None, "stop"
                elif finish is not None:
                    visible = s["text"]
            else:
                visible = s["text"]
            new, s["shown"] = visible[len(s["shown"]) :], visible
            s["ended"] = finish is not None
            if new or finish is not None or abort:
                step[uid] = (new, finish, s["tokens"], abort)
        steps.append(step)
    return steps


@pytest.mark.exercise("detokenize-step", focused=True)
def test_detokenize_step_sends_text_finishes_and_aborts_like_a_naive_walk():
    pieces = sorted({piece for _, _, events in REQUESTS for piece, _ in events if piece is not None})
    detokenizer = Detokenizer(PieceTokenizer(pieces))
    prompt_tokens = {uid: 10 + n for n, (uid, _, _) in enumerate(REQUESTS)}
    shown = {uid: "" for uid, _, _ in REQUESTS}
    ended: set[str] = set()
    for i, expected in enumerate(naive_detokenize()):
        batch = BatchTokenOutput([], b"", [], [])
        ids = []
        for uid, stops, events in REQUESTS:
            if i < len(events):
                piece, finish = events[i]
                batch.uids.append(uid)
                ids.append(-1 if piece is None else pieces.index(piece))
                batch.finish_reasons.append(finish)
                if i == 0:
                    batch.new_requests.append(NewRequestInfo(uid, prompt_tokens[uid], stops))
        batch.token_ids = pack_ids(ids)

        out, aborts = detokenizer.detokenize(batch)

        assert isinstance(out, BatchTextOutput), f"step {i}: detokenize returned {out!r}, expected a BatchTextOutput"
        got = {uid: (text, finish, tokens) for uid, text, finish, tokens in
               zip(out.uids, out.texts, out.finish_reasons, out.completion_tokens)}
        aborted = [a.uid for a in aborts]
        for uid, stops, events in REQUESTS:
            sent = f"{events[i][0]!r}" if i < len(events) and events[i][0] is not None else "no token"
            finish_in = events[i][1] if i < len(events) else None
            where = (f"step {i}, request {uid!r} (stop strings {stops}; shown so far {shown[uid]!r}; the scheduler "
                     f"sent {sent} with finish {finish_in!r})")
            want = expected.get(uid)
            if want is None:
                assert uid not in got, (
                    f"{where}: got {got[uid]}, expected nothing"
                    + (": the request ended in an earlier step; forget it (delete its state) so that tokens the "
                       "scheduler sent meanwhile are dropped" if uid in ended else
                       ": the text is held back (it may begin a stop string) and the request goes on")
                )
                assert uid not in aborted, f"{where}: an abort went back to the scheduler, but nothing ended"
                continue
            text, finish, tokens, abort = want
            got_text, got_finish, got_tokens = got.get(uid, ("", None, None))
            if got_text != text and finish is not None and text.startswith(got_text) and not abort:
                hint = (f": the request ended ({finish!r}) with {text[len(got_text):]!r} still held back; release it "
                        "now (flush the stream)")
            elif got_text != text and text.startswith(got_text):
                hint = ": the text before the stop string (or what cannot start one) goes out now"
            elif got_text != text:
                hint = ": nothing of the stop string or after it may reach the client" if finish == "stop" else ""
            else:
                hint = ""
            assert got_text == text, f"{where}: sent text {got_text!r}, expected {text!r}{hint}"
            assert got_finish == finish, (
                f"{where}: finish {got_finish!r}, expected {finish!r}"
                + (": a stop string was found, so the request ends with 'stop' whatever the scheduler said"
                   if finish == "stop" and finish_in != "stop" else "")
            )
            assert (uid in aborted) == abort, (
                f"{where}: " + (
                    "a stop string ended the request while the scheduler would go on (its finish was None): send "
                    "AbortRequest(uid) back so that it stops and frees the slot" if abort else
                    f"an abort went back to the scheduler, but the scheduler had already finished the request "
                    f"({finish_in!r}) and freed its slot: no abort is needed" if finish_in is not None else
                    "an abort went back to the scheduler, but the request did not end here")
            )
            assert got_tokens == tokens, (
                f"{where}: completion_tokens {got_tokens}, expected {tokens}: count every token received for the "
                "request (the one that completed a stop string included); a finish without a token (-1) adds none"
            )
            shown[uid] += got_text
            if finish is not None:
                ended.add(uid)
        assert len(aborted) == len(set(aborted)), f"step {i}: aborts {aborted}: one abort per request"
