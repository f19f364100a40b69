"""The scheduler's bookkeeping (on a tiny model) and continuous batching's exactness (on the real one)."""

import pytest

from minisgl.sampling import SamplingParams
from minisgl.scheduler import Request


def request(rid, prompt_len, collector, **params):
    prompt = [(7 * i + len(rid)) % 200 + 3 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(ignore_eos=True, **params), collector)


@pytest.mark.exercise("admission")
def test_admission_fills_free_slots_first_come_first_served(tiny_scheduler, collector):
    scheduler = tiny_scheduler(slots=2)
    for rid in ("a", "b", "c"):
        scheduler.submit(request(rid, 5, collector, max_tokens=4))
    scheduler.receive(block=False)
    scheduler.step()  # a prefill of the two oldest
    assert [r.rid for r in scheduler.running] == ["a", "b"]
    assert [r.rid for r in scheduler.waiting] == ["c"]
    assert scheduler.state()["free_slots"] == 0 and scheduler.steps == {"prefill": 1, "decode": 0}


@pytest.mark.exercise("admission")
def test_admission_respects_the_prefill_budget_without_skipping_ahead(tiny_scheduler, collector):
    scheduler = tiny_scheduler(slots=4, max_prefill_length=10)
    for rid, length in (("a", 6), ("b", 6), ("c", 2)):
        scheduler.submit(request(rid, length, collector, max_tokens=4))
    scheduler.receive(block=False)
    scheduler.step()
    assert [r.rid for r in scheduler.running] == ["a"]  # b would overflow the budget, and c may not pass b
    scheduler.step()
    assert [r.rid for r in scheduler.running] == ["a", "b", "c"]


@pytest.mark.exercise("admission")
def test_a_prompt_longer_than_the_budget_still_runs_alone(tiny_scheduler, collector, run_until_done):
    scheduler = tiny_scheduler(slots=2, max_prefill_length=4)
    scheduler.submit(request("long", 9, collector, max_tokens=2))
    run_until_done(scheduler, collector, ["long"])
    assert collector.finish["long"] == "length" and len(collector.tokens["long"]) == 2


@pytest.mark.exercise("admission")
def test_a_finished_request_frees_its_slot_for_the_next_step(tiny_scheduler, collector):
    scheduler = tiny_scheduler(slots=1)
    scheduler.submit(request("first", 4, collector, max_tokens=2))
    scheduler.submit(request("second", 4, collector, max_tokens=2))
    scheduler.receive(block=False)
    scheduler.step()  # prefill "first": its first token
    scheduler.step()  # decode "first": its second and last token; the slot is free again
    assert collector.finish == {"first": "length"} and scheduler.state()["free_slots"] == 1
    scheduler.step()  # "second" is admitted at once
    assert [r.rid for r in scheduler.running] == ["second"]


def test_abort_frees_a_running_slot_and_drops_a_waiting_request(tiny_scheduler, collector):
    scheduler = tiny_scheduler(slots=1)
    scheduler.submit(request("running", 4, collector, max_tokens=50))
    scheduler.submit(request("waiting", 4, collector, max_tokens=50))
    scheduler.receive(block=False)
    scheduler.step()
    scheduler.abort("running")
    scheduler.abort("waiting")
    scheduler.receive(block=False)
    assert collector.finish == {"running": "abort", "waiting": "abort"}
    idle = {"running": 0, "waiting": 0, "free_slots": 1, "total_slots": 1, "steps": None}
    assert scheduler.state() | {"steps": None} == idle


def test_a_request_that_cannot_fit_is_refused_before_it_is_queued(tiny_scheduler, collector):
    scheduler = tiny_scheduler(context_length=32)
    with pytest.raises(ValueError, match="exceeds the context length of 32"):
        scheduler.submit(request("big", 20, collector, max_tokens=13))
    assert scheduler.inbox.empty()


def test_mixed_sampling_parameters_behave_as_they_do_alone(tiny_scheduler, collector, run_until_done):
    """Seeded sampling in a crowded batch gives the same tokens as alone; so does greedy."""
    variants = {
        "greedy": dict(max_tokens=6),
        "hot": dict(temperature=1.3, seed=11, max_tokens=9),
        "nucleus": dict(temperature=0.8, top_p=0.7, seed=5, max_tokens=5),
        "topk": dict(temperature=1.0, top_k=3, seed=2, max_tokens=7),
    }
    alone = {}
    for rid, params in variants.items():
        scheduler = tiny_scheduler(slots=1)
        scheduler.submit(request(rid, 6, collector, **params))
        run_until_done(scheduler, collector, [rid])
        alone[rid] = collector.tokens.pop(rid)
        collector.finish.pop(rid)
    scheduler = tiny_scheduler(slots=4)
    for rid, params in variants.items():
        scheduler.submit(request(rid, 6, collector, **params))
    run_until_done(scheduler, collector, list(variants))
    assert collector.tokens == alone


def test_greedy_batching_is_exact_on_the_real_model(real_scheduler, tokenizer, collector, run_until_done, model_path):
    """Requests of different lengths, wanting different numbers of tokens, arriving at different
    times: each one's greedy tokens equal what it gets served alone (float32)."""

    def chat(question):
        chat = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    jobs = {
        "capital": (chat("What is the capital of Italy?"), 12),
        "story": (chat("Tell me a very short story about a robot who learns to paint, in three sentences."), 24),
        "list": (chat("List three fruits."), 16),
        "math": (chat("What is 12 times 12?"), 8),
    }
    alone = {}
    for rid, (prompt, max_tokens) in jobs.items():
        real_scheduler.submit(Request(rid, prompt, SamplingParams(max_tokens=max_tokens), collector))
        run_until_done(real_scheduler, collector, [rid])
        alone[rid] = collector.tokens.pop(rid)
        collector.finish.pop(rid)

    def submit(rid):
        prompt, max_tokens = jobs[rid]
        real_scheduler.submit(Request(rid, prompt, SamplingParams(max_tokens=max_tokens), collector))
        real_scheduler.receive(block=False)

    submit("capital")
    submit("story")
    for _ in range(3):
        real_scheduler.step()
    submit("list")  # arrives while the first two are decoding
    for _ in range(4):
        real_scheduler.step()
    submit("math")
    run_until_done(real_scheduler, collector, list(jobs))
    assert max(real_scheduler.steps.values()) > 0
    assert collector.tokens == alone

    # and alone is what transformers' greedy generate gives (the oracle), EOS aside
    import torch
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    for rid, (prompt, max_tokens) in jobs.items():
        with torch.inference_mode():
            generated = oracle.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
            expected = generated[0, len(prompt) :]
        assert alone[rid] == [t for t in expected.tolist() if t not in real_scheduler.eos_ids]


def test_a_failing_step_fails_its_requests_and_frees_their_slots(tiny_scheduler, collector, monkeypatch):
    scheduler = tiny_scheduler(slots=2)
    for rid in ("a", "b"):
        scheduler.submit(request(rid, 5, collector, max_tokens=4))
    scheduler.receive(block=False)

    def broken_step(requests, is_prefill):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(scheduler.engine, "step", broken_step)
    with pytest.raises(RuntimeError) as failure:
        scheduler.step()
    scheduler.fail_all(failure.value)  # what run_forever does next
    assert collector.finish == {"a": "error", "b": "error"}
    assert scheduler.state()["free_slots"] == 2
