"""One client never hurts the others (the complete server).

What a request asks for is bounded per step, not per request, so that many such requests together cannot
fail a batch; a request's own constraint that leads nowhere ends that request with a 400-shaped error, not a
500; the counters /state and /metrics show do not wrap, and the page gauges say what they count.
"""


import pytest
from test_paged_engine import collect, run_until_idle, submit, tiny_scheduler

import minisgl.scheduler.scheduler as scheduler_module
from minisgl.sampling import prompt_logprob_rows

# ------------------------------------------------------------------------------------------------
# Prompt log probabilities: a bound on the step's rows, shared by every request that wants them
# ------------------------------------------------------------------------------------------------


def prompt_of(i: int) -> list[int]:
    return [(7 * i + 3 * j) % 250 + 1 for j in range(30)]


def echo_replies(tiny_llama, uids: list[int], rows_seen: list[int] | None = None) -> dict:
    """Run the echo requests ``uids`` together (whole prompts: chunk size 0); their prompts' log probabilities."""
    scheduler = tiny_scheduler(tiny_llama, 4, 200, 0, "radix", max_running=len(uids))
    real_step = scheduler.engine.step

    def counting_step(batch, sampling):
        if rows_seen is not None:
            rows_seen.append(sum(size for request, size in zip(batch.requests, batch.new_lens)  # prompt chunks
                                 if request.params.prompt_logprobs and request.cached_len < len(request.prompt_ids)))
            assert len(prompt_logprob_rows(batch)) <= rows_seen[-1]
        return real_step(batch, sampling)

    scheduler.engine.step = counting_step
    for i in uids:
        submit(scheduler, f"r{i}", prompt_of(i), max_tokens=2, ignore_eos=True, prompt_logprobs=True, logprobs=1)
    scored = {}
    while scheduler.has_work:
        message = scheduler.step()
        for output in message.outputs if message else ():
            if output.new is not None:
                scored[output.uid] = output.new.prompt_logprobs
    collect({}, scheduler.step())  # idle: nothing more
    assert scheduler.pages.num_free + scheduler.cache.cached_pages == scheduler.pages.num_total
    return scored


def test_prompt_logprob_rows_are_bounded_per_step_for_all_requests_together(tiny_llama, monkeypatch):
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGPROBS_ROWS", 40)  # 8 prompts of 30 tokens: 240 rows in all
    rows_seen = []
    together = echo_replies(tiny_llama, list(range(8)), rows_seen)
    assert max(rows_seen) <= 40, rows_seen  # chunk size 0 put every whole prompt into one step before
    assert sum(rows_seen) == 8 * 30  # every prompt token ran once, scored
    for i in range(8):
        alone = echo_replies(tiny_llama, [i])[f"r{i}"]
        mine = together[f"r{i}"]
        assert [token for token, _ in mine] == prompt_of(i)[1:]  # every prompt token but the first, in order
        for (_, got), (_, expected) in zip(mine, alone, strict=True):
            assert got[0] == pytest.approx(expected[0], abs=1e-4)
            assert [token for token, _ in got[1]] == [token for token, _ in expected[1]]


def test_a_request_without_rows_this_step_lets_free_requests_behind_it_run(tiny_llama, monkeypatch):
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGPROBS_ROWS", 20)
    scheduler = tiny_scheduler(tiny_llama, 4, 200, 0, "radix", max_running=4)
    submit(scheduler, "echo-1", prompt_of(1), max_tokens=1, prompt_logprobs=True)
    submit(scheduler, "echo-2", prompt_of(2), max_tokens=1, prompt_logprobs=True)
    submit(scheduler, "free", prompt_of(3), max_tokens=1)
    scheduler.prefilling += scheduler.admit()
    assert [(r.uid, size) for r, size in scheduler.prefill_chunks()] == [("echo-1", 20), ("free", 30)]
    replies = {}
    run_until_idle(scheduler, replies, 10)
    assert sorted(replies) == ["echo-1", "echo-2", "free"] and all(r.finish == "length" for r in replies.values())


# ------------------------------------------------------------------------------------------------
# A grammar's dead end: the request's own constraint, answered as such
# ------------------------------------------------------------------------------------------------


class DeadEndMatcher:
    """Stands in for a grammar that no token of the vocabulary continues after its first token."""

    def __init__(self):
        self.tokens = 0

    def accept_token(self, token: int) -> bool:
        self.tokens += 1
        return self.tokens < 2

    def fill_next_token_bitmask(self, bitmask, row: int) -> None:
        bitmask[row] = 0 if self.tokens else -1  # after one token, nothing is allowed: the row is left free


def test_a_grammar_dead_end_ends_its_request_as_its_own_not_as_a_server_error(tiny_llama):
    from minisgl.messages import DEAD_END

    scheduler = tiny_scheduler(tiny_llama, 4, 40, 0, "radix")
    replies = {}
    submit(scheduler, "free", [5, 6, 7], max_tokens=6, ignore_eos=True)
    submit(scheduler, "stuck", [8, 9, 10], max_tokens=6, ignore_eos=True)
    collect(replies, scheduler.step())  # both prefilled, one token each
    next(r for r in scheduler.running if r.uid == "stuck").grammar = DeadEndMatcher()
    scheduler.sampling = None  # its rows are constrained now: build the mask
    run_until_idle(scheduler, replies, 10)
    assert replies["stuck"].finish == DEAD_END and len(replies["stuck"].tokens) == 2
    assert replies["free"].finish == "length" and len(replies["free"].tokens) == 6
    assert scheduler.pages.num_free + scheduler.cache.cached_pages == scheduler.pages.num_total


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_grammar_dead_end_reaches_the_client_as_a_400_naming_the_constraint(fake_workers, stream):
    import json

    call, frontend = fake_workers
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "regex": "a+", "stream": stream}
    response = call("post", "/v1/completions", json=body)
    if stream:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        error = events[-1]["error"]  # the stream's last event, after the text so far
        assert any(choice["text"] == " {" for event in events[:-1] for choice in event["choices"])
    else:
        assert response.status_code == 400
        error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "regex"
    assert error["code"] == "constraint_dead_end" and "allows no next token" in error["message"]
    counted = frontend.metrics.registry.get_sample_value  # /metrics' registry, its series labelled as create_app said
    assert counted("minisgl:num_requests_by_outcome_total", {"model_name": "tiny", "outcome": "invalid"}) == 1
    assert counted("minisgl:num_requests_by_outcome_total", {"model_name": "tiny", "outcome": "error"}) == 0


# ------------------------------------------------------------------------------------------------
# The counts /state and /metrics show
# ------------------------------------------------------------------------------------------------


def published_state(scheduler) -> dict:
    """What the API server reads: the scheduler's counts through the shared array the launcher makes."""
    from types import SimpleNamespace

    from minisgl.scheduler.worker import publish_counts
    from minisgl.server.frontend import Frontend
    from minisgl.server.launch import shared_counts

    counts = shared_counts()
    publish_counts(scheduler, counts)
    return Frontend.state(SimpleNamespace(counts=counts, routes={}))


def test_token_counters_past_2_31_survive_the_shared_array(tiny_llama):
    scheduler = tiny_scheduler(tiny_llama, 4, 40, 0, "radix")
    scheduler.prompt_tokens, scheduler.prefix_hits = 3 * 2**31 + 5, 2**32 + 7  # months of a busy server
    state = published_state(scheduler)
    assert (state["prompt_tokens"], state["cached_tokens"]) == (3 * 2**31 + 5, 2**32 + 7)  # 32 bits would wrap
    assert state["prefix_hit_rate"] == round((2**32 + 7) / (3 * 2**31 + 5), 4)


def page_gauges(text: str) -> tuple[dict, dict]:
    """The kv_pages_* gauges of a /metrics text, read by prometheus-client's parser: their values, their help."""
    from prometheus_client.parser import text_string_to_metric_families

    families = [family for family in text_string_to_metric_families(text) if family.name.startswith("minisgl:kv_")]
    assert families and all(family.type == "gauge" and len(family.samples) == 1 for family in families)
    return ({family.name: family.samples[0].value for family in families},
            {family.name: family.documentation for family in families})


def test_page_gauges_add_up_and_cached_pages_include_those_a_running_request_locks(tiny_llama):
    from minisgl.server.metrics import Metrics

    scheduler = tiny_scheduler(tiny_llama, 4, 40, 0, "radix")
    prefix = list(range(1, 13))  # three whole pages
    replies = {}
    submit(scheduler, "first", prefix + [20], max_tokens=2, ignore_eos=True)
    run_until_idle(scheduler, replies, 10)
    submit(scheduler, "second", prefix + [30, 31], max_tokens=8, ignore_eos=True)  # shares the cached prefix
    collect(replies, scheduler.step())
    assert replies["second"].cached_tokens == 12 and scheduler.running  # it runs, holding the prefix
    state = published_state(scheduler)
    assert state["free_pages"] + state["cached_pages"] + state["in_use_pages"] == state["total_pages"]
    assert state["cached_pages"] - state["evictable_pages"] >= 3  # the prefix it locks counts as cached
    assert state["in_use_pages"] > 0  # and its own pages, outside the cache, as in use
    kv, helps = page_gauges(Metrics().render(state))
    assert kv["minisgl:kv_pages_free"] + kv["minisgl:kv_pages_cached"] + kv["minisgl:kv_pages_uncached"] == \
        kv["minisgl:kv_pages_total"]
    assert kv["minisgl:kv_pages_cached"] == state["cached_pages"]
    assert kv["minisgl:kv_pages_evictable"] == state["evictable_pages"]
    assert kv["minisgl:kv_pages_used"] == state["in_use_pages"] + state["cached_pages"] - state["evictable_pages"]
    assert "only" not in helps["minisgl:kv_pages_cached"] and "use included" in helps["minisgl:kv_pages_cached"]
    assert "outside the prefix cache" in helps["minisgl:kv_pages_uncached"]
    run_until_idle(scheduler, replies, 20)
    idle = published_state(scheduler)
    assert idle["used_pages"] == idle["in_use_pages"] == 0 and idle["evictable_pages"] == idle["cached_pages"] > 0
