"""A step that fails, at TP 1: every request in flight gets an error, and the scheduler goes down.

A step that raises for a reason other than a lost rank (a bug, a device that failed) would fail the next
step the same way. The scheduler answers every request in flight with an error, logs the traceback and exits
non-zero, so the launcher takes the whole server down. At TP 1 there is no other rank to blame. (A rank that
really is gone is named by the tests in ``test_tp_serving.py``.)
"""

import queue

import pytest
import zmq

from minisgl.core import SamplingParams
from minisgl.messages import ToDetokenizer, UserRequest, decoder, encode, pack_ids


class Idle(Exception):
    """The scheduler's loop went back to waiting for messages: after a failed step it must not."""


class ScriptedInbox:
    """Stands in for rank 0's ZMQ socket: hands out the given messages, then raises Idle when the loop would
    wait for more."""

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


def test_a_failing_step_answers_every_request_in_flight_and_no_rank_is_blamed(
    tiny_chat_model, monkeypatch, caplog
):
    from minisgl.args import ServerArgs
    from minisgl.config import resolve_config
    from minisgl.engine import Engine
    from minisgl.ipc import Addresses
    from minisgl.scheduler import worker

    config = resolve_config(ServerArgs(model_path=str(tiny_chat_model), dtype="float32", device="cpu",
                                       max_running_requests=2, context_length=64))
    requests = [UserRequest(uid, pack_ids([5, 6, 7, 8]), SamplingParams(max_tokens=8, ignore_eos=True))
                for uid in ("a", "b")]
    inbox, outbox = ScriptedInbox(requests), RecordingOutbox()
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
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert " lost " not in log, f"at TP 1 there is no other rank to blame:\n{log}"
    failed = [r for r in caplog.records if r.exc_info and "injected device fault" in str(r.exc_info[1])]
    assert failed and "a step failed" in failed[0].getMessage(), f"the step's traceback is not in the log:\n{log}"
