"""The tokenizer, the scheduler and the detokenizer, each driven by hand with messages."""

import queue

import pytest
import zmq

from minisgl.core import SamplingParams
from minisgl.messages import (
    AbortRequest,
    BatchTokenOutput,
    NewRequestInfo,
    ToDetokenizer,
    TokenizeError,
    TokenizeRequest,
    UserRequest,
    decoder,
    encode,
    pack_ids,
    unpack_ids,
)
from minisgl.tokenizer.detokenize import Detokenizer
from minisgl.tokenizer.tokenize import Tokenizer

# ---- tokenizer ----

def test_chat_goes_through_the_template_and_max_tokens_is_filled_in(tokenizer):
    worker = Tokenizer(tokenizer, context_length=512, vocab_size=49152, chat_template=tokenizer.chat_template)
    chat = [{"role": "user", "content": "Hi!"}]
    out = worker.tokenize(TokenizeRequest("u", SamplingParams(max_tokens=None), messages=chat))
    expected = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert isinstance(out, UserRequest) and unpack_ids(out.prompt_ids) == list(expected)
    assert out.params.max_tokens == 512 - len(expected)


@pytest.mark.parametrize(
    "request_kwargs, max_tokens, message",
    [
        ({"text": "hello " * 100}, 450, "exceeds the context length of 512"),
        ({"text": ""}, 10, "the prompt is empty"),
        ({"input_ids": pack_ids([5, 99999])}, 10, "vocabulary"),
    ],
)
def test_refusals_come_back_as_errors_naming_the_problem(tokenizer, request_kwargs, max_tokens, message):
    worker = Tokenizer(tokenizer, context_length=512, vocab_size=49152, chat_template=tokenizer.chat_template)
    out = worker.tokenize(TokenizeRequest("u", SamplingParams(max_tokens=max_tokens), **request_kwargs))
    assert isinstance(out, TokenizeError) and message in out.message and out.uid == "u"


# ---- scheduler ----

def user_request(uid, length, **params):
    prompt = pack_ids([(5 * i + len(uid)) % 200 + 3 for i in range(length)])
    return UserRequest(uid, prompt, SamplingParams(ignore_eos=True, **params))


@pytest.mark.exercise("handle")
def test_requests_in_and_aborts_out(tiny_scheduler):
    scheduler = tiny_scheduler(slots=2)
    for uid in ("a", "b", "c"):
        scheduler.handle(user_request(uid, 4, max_tokens=8))
    assert [r.uid for r in scheduler.waiting] == ["a", "b", "c"]
    scheduler.step()
    scheduler.handle(AbortRequest("a"))  # running: its slot comes back
    scheduler.handle(AbortRequest("c"))  # waiting: it never runs
    assert [r.uid for r in scheduler.running] == ["b"] and not scheduler.waiting
    assert scheduler.state()["free_slots"] == 1
    message = scheduler.flush_outputs()
    assert dict(zip(message.uids, message.finish_reasons)) == {"a": "abort", "c": "abort"}


@pytest.mark.exercise("handle")
def test_an_abort_that_overtakes_its_request_drops_it(tiny_scheduler):
    scheduler = tiny_scheduler(slots=2)
    scheduler.handle(AbortRequest("early"))
    scheduler.handle(user_request("early", 4, max_tokens=8))
    scheduler.handle(user_request("other", 4, max_tokens=8))
    assert [r.uid for r in scheduler.waiting] == ["other"]


@pytest.mark.exercise("step-message")
def test_each_step_is_one_message_with_every_request(tiny_scheduler):
    scheduler = tiny_scheduler(slots=3)
    scheduler.handle(user_request("a", 5, max_tokens=3, stop=["zz"]))
    scheduler.handle(user_request("b", 3, max_tokens=1))
    first = scheduler.step()  # prefill: both get a token; b is done
    assert first.uids == ["a", "b"] and first.finish_reasons == [None, "length"]
    assert len(unpack_ids(first.token_ids)) == 2 and min(unpack_ids(first.token_ids)) >= 0
    assert [(i.uid, i.prompt_tokens, i.stop) for i in first.new_requests] == [("a", 5, ["zz"]), ("b", 3, [])]
    second = scheduler.step()  # decode: only a is left, and it was announced already
    assert second.uids == ["a"] and second.new_requests == []
    third = scheduler.step()
    assert third.finish_reasons == ["length"] and scheduler.step() is None  # idle: no message at all



class Idle(Exception):
    """The scheduler's loop went back to waiting for messages: after a failed step it must not."""


class ScriptedInbox:
    """Stands in for the scheduler's ZMQ socket: hands out the given messages, then raises Idle when the
    loop would wait for more."""

    def __init__(self, messages):
        self.queue = [encode(message) for message in messages]

    def poll(self, timeout_ms=None) -> bool:
        if not self.queue and timeout_ms is None:
            raise Idle
        return bool(self.queue)

    def recv(self, flags=0) -> bytes:
        if not self.queue:
            raise zmq.Again
        return self.queue.pop(0)


class RecordingOutbox:
    """Stands in for the socket to the detokenizer: keeps every message the scheduler sends."""

    def __init__(self):
        self.decoder, self.sent = decoder(ToDetokenizer), []

    def send(self, data: bytes) -> None:
        self.sent.append(self.decoder.decode(data))


def test_a_failing_step_answers_every_request_in_flight_and_the_scheduler_exits(tiny_llama, monkeypatch, caplog):
    # A step that raises (a bug, a device that failed) would fail the next step the same way: the scheduler
    # answers every request in flight with an error, logs the traceback and exits non-zero, so the launcher
    # takes the server down. It does not go on serving (and failing) while /health says 200.
    from minisgl.args import ServerArgs
    from minisgl.config import resolve_config
    from minisgl.engine import Engine
    from minisgl.ipc import Addresses
    from minisgl.scheduler import worker

    config = resolve_config(ServerArgs(model_path=str(tiny_llama), dtype="float32", device="cpu",
                                       max_running_requests=2, context_length=64))
    inbox, outbox = ScriptedInbox([user_request(uid, 4, max_tokens=8) for uid in ("a", "b")]), RecordingOutbox()
    monkeypatch.setattr(worker, "become_child", lambda name: None)  # this is the test's process, not a child
    monkeypatch.setattr(worker, "pull_socket", lambda context, address: inbox)
    monkeypatch.setattr(worker, "push_socket", lambda context, address: outbox)
    steps, real_step = 0, Engine.step

    def failing_step(engine, batch):
        nonlocal steps
        steps += 1
        if steps == 3:
            raise RuntimeError("injected device fault")
        return real_step(engine, batch)

    monkeypatch.setattr(Engine, "step", failing_step)
    ready = queue.Queue()
    with pytest.raises(SystemExit) as exit_:
        worker.run_scheduler(config, Addresses.in_folder("unused"), ready, [0] * 4)
    assert ready.get_nowait() == ("minisgl-scheduler", None)
    assert exit_.value.code not in (0, None)
    assert len(outbox.sent) == 3  # two steps' tokens, then the failure
    last = outbox.sent[-1]
    assert dict(zip(last.uids, last.finish_reasons)) == {"a": "error", "b": "error"}
    failed = [r for r in caplog.records if r.exc_info and "injected device fault" in str(r.exc_info[1])]
    assert failed and "a step failed" in failed[0].getMessage()  # with its traceback


# ---- detokenizer ----

def feed(detokenizer, uid, token_ids, finish_last=None, stop=(), announce=True):
    """Send ``token_ids`` one step at a time; returns the text that reached the API server and the aborts."""
    shown, finishes, aborts = "", [], []
    for i, token in enumerate(token_ids):
        last = i == len(token_ids) - 1
        batch = BatchTokenOutput(
            [uid], pack_ids([token]), [finish_last if last else None],
            [NewRequestInfo(uid, 10, list(stop))] if (announce and i == 0) else [],
        )
        out, step_aborts = detokenizer.detokenize(batch)
        shown += "".join(out.texts)
        finishes += [f for f in out.finish_reasons if f]
        aborts += step_aborts
    return shown, finishes, aborts


@pytest.mark.exercise("detokenize-step")
def test_a_stop_string_spanning_tokens_cuts_the_text_and_aborts_the_request(tokenizer):
    text = "The answer is 42. STOP-HERE and then a lot more text follows."
    ids = tokenizer.encode(text)
    assert not any("STOP-HERE" in tokenizer.decode([t]) for t in ids)  # it spans several tokens
    shown, finishes, aborts = feed(Detokenizer(tokenizer), "u", ids, finish_last="length", stop=["STOP-HERE"])
    assert shown == "The answer is 42. " and finishes == ["stop"]
    assert aborts == [AbortRequest("u")]  # tokens that come later are dropped: nothing past the stop


@pytest.mark.exercise("detokenize-step")
def test_multibyte_text_streams_whole_and_max_tokens_flushes(tokenizer):
    text = "日本語のテキスト 😀 and café"
    shown, finishes, aborts = feed(Detokenizer(tokenizer), "u", tokenizer.encode(text), finish_last="length")
    assert shown == text and finishes == ["length"] and not aborts


@pytest.mark.exercise("detokenize-step")
def test_eos_finish_flushes_held_text(tokenizer):
    detokenizer = Detokenizer(tokenizer)
    ids = tokenizer.encode("almost END")
    shown, _, _ = feed(detokenizer, "u", ids, stop=["ENDX"])  # "END" is held back: it may become ENDX
    out, _ = detokenizer.detokenize(BatchTokenOutput(["u"], pack_ids([-1]), ["stop"]))
    assert shown + "".join(out.texts) == "almost END" and out.finish_reasons == ["stop"]
    assert "u" not in detokenizer.states
