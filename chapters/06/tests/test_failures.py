"""The complete server's failure policy (chapter 06).

A failure that belongs to one request ends that request with a clear error and the others go on. Any
other exception in a step (a bug, a device that failed, a model that computes NaN) would fail the next
step the same way: the scheduler answers every request in flight with an error, logs the traceback and
exits, and the launcher takes the whole server down. Never a server that fails every step while
``/health`` says 200.
"""

import json
import shutil

import httpx
import pytest
from test_paged_engine import RecordingOutbox, ScriptedInbox, collect, submit, tiny_scheduler

from minisgl.core import SamplingParams
from minisgl.messages import UserRequest, pack_ids
from minisgl.server.frontend import COUNTS


def test_a_failing_step_answers_every_request_in_flight_and_ends_the_loop(tiny_llama, monkeypatch):
    scheduler = tiny_scheduler(tiny_llama, 4, 40, 0, "radix")
    counts = [0] * len(COUNTS)
    outbox = RecordingOutbox(counts)
    requests = [UserRequest(uid, pack_ids(list(range(1, 9))), SamplingParams(max_tokens=8, ignore_eos=True))
                for uid in ("a", "b")]
    steps = 0
    real_step = scheduler.engine.step

    def failing_step(batch, sampling):
        nonlocal steps
        steps += 1
        if steps == 3:
            raise RuntimeError("injected device fault")
        return real_step(batch, sampling)

    monkeypatch.setattr(scheduler.engine, "step", failing_step)
    from minisgl.scheduler.worker import serve_steps

    # The old loop failed the requests and went on serving (it would reach Idle); this one must end.
    with pytest.raises(RuntimeError, match="injected device fault"):
        serve_steps(scheduler, ScriptedInbox(requests), outbox, counts, check_lockstep=False)
    last, _ = outbox.sent[-1]
    assert sorted((out.uid, out.finish) for out in last.outputs) == [("a", "error"), ("b", "error")]
    pages = scheduler.pages
    assert not scheduler.has_work and pages.num_free + scheduler.cache.cached_pages == pages.num_total


class FailingMatcher:
    """Stands in for a grammar's matcher that raises on its second token (a grammar engine's bug)."""

    def __init__(self):
        self.tokens = 0

    def accept_token(self, token: int) -> bool:
        self.tokens += 1
        if self.tokens == 2:
            raise RuntimeError("matcher broke")
        return True

    def fill_next_token_bitmask(self, bitmask, row: int) -> None:
        bitmask[row] = -1  # every token allowed


def test_a_failing_grammar_ends_its_own_request_and_no_other(tiny_llama):
    scheduler = tiny_scheduler(tiny_llama, 4, 40, 0, "radix")
    replies = {}
    submit(scheduler, "free", [5, 6, 7], max_tokens=6, ignore_eos=True)
    submit(scheduler, "broken", [8, 9, 10], max_tokens=6, ignore_eos=True)
    collect(replies, scheduler.step())  # both prefilled, one token each
    next(r for r in scheduler.running if r.uid == "broken").grammar = FailingMatcher()
    scheduler.sampling = None  # its rows are constrained now: build the mask
    while scheduler.has_work:
        collect(replies, scheduler.step())
    assert replies["broken"].finish == "error" and len(replies["broken"].tokens) == 2
    assert replies["free"].finish == "length" and len(replies["free"].tokens) == 6
    assert scheduler.pages.num_free + scheduler.cache.cached_pages == scheduler.pages.num_total


@pytest.fixture(scope="module")
def nan_model(tiny_chat_model, tmp_path_factory):
    """The tiny chat model with NaN in its final norm: every logit is NaN, and drawing a token raises (a lasting
    fault, as a broken device or checkpoint would be). Greedy decoding takes an argmax and does not notice."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("nan-model")
    for path in tiny_chat_model.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_a_lasting_fault_takes_the_server_down_with_an_error_to_every_stream(start_server, nan_model):
    server = start_server("--model-path", str(nan_model), "--served-model-name", "nan")
    body = {"model": "nan", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
            "temperature": 1.0}
    events = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.get("/health").status_code == 200
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: "):]))
    assert events and "error" in events[-1], f"the stream ended without an error event: {events}"
    code = server.process.wait(120)  # bounded: it goes down by itself, not at a timeout of ours
    log = "\n".join(server.lines)
    assert code != 0, log
    assert "a step failed" in log and "Traceback" in log and "probability tensor" in log, log
    assert "lost rank" not in log, "at TP 1 there is no other rank to blame"
