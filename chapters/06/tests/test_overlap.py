"""Overlap scheduling (chapter 06): the scheduler builds step N + 1 while step N runs on the forward thread,
and processes step N's results one step late.

What must not change, checked with overlap on against overlap off:
- greedy tokens, finish reasons and cached prefixes, on the real model across a mixed workload (chunked
  prefill sharing steps with decoding, a shared system prompt found in the cache, two copies of one prompt);
- stop strings and constrained replies (whose mask needs the previous token: no overlap on their steps);
- what a client sees at the end of a request: a request that ends at step N (its end of sequence, an abort)
  is in step N + 1 already, and that step's token for it must never reach the stream; a request never runs
  past its last token; its pages and its slot come back once, at idle everything is whole.

Under tensor parallelism the OpenAI contract runs with overlap on (``test_server_tp.py``), the lockstep check
on. A last test, for a GPU, runs the same workload with CUDA graphs.
"""

import pytest
import test_paged_engine as paged
import torch
from test_paged_engine import NEW_TOKENS, SYSTEM, TINY_EOS, Reply, chat_ids, check_idle, collect, run_until_idle, submit

from minisgl import LLM, SamplingParams
from minisgl.engine import Engine
from minisgl.messages import AbortRequest
from minisgl.scheduler import Scheduler
from minisgl.scheduler.pages import pages_for

# The fixtures of the paged engine's tests, shared: the real model's prompts and EOS ids, one thread per model.
eos_ids, prompts, one_thread = paged.eos_ids, paged.prompts, paged.one_thread


def recording_steps(scheduler: Scheduler) -> list[tuple[list[str], bool]]:
    """Wrap the engine's step: for each step, the uids of its batch and whether its input held stand-ins."""
    steps, real_step = [], scheduler.engine.step

    def step(batch, sampling):
        steps.append(([request.uid for request in batch.requests], min(batch.input_ids) < 0))
        return real_step(batch, sampling)

    scheduler.engine.step = step
    return steps


def mixed_workload(scheduler: Scheduler, tokenizer, prompts) -> dict[str, Reply]:
    """Chunks of 15 sharing steps with decoding, a system prompt found in the cache, one prompt twice, one
    reply cut by max_tokens: every request greedy."""
    replies: dict[str, Reply] = {}
    submit(scheduler, "long", prompts["long"], max_tokens=NEW_TOKENS)
    while not scheduler.running:  # its prompt is in before the others arrive: later steps are mixed
        collect(replies, scheduler.step())
    submit(scheduler, "chat", prompts["chat"], max_tokens=NEW_TOKENS)
    submit(scheduler, "same-system", chat_ids(tokenizer, "And which one next?", SYSTEM), max_tokens=NEW_TOKENS)
    submit(scheduler, "code", prompts["code"], max_tokens=5)
    submit(scheduler, "code-again", prompts["code"], max_tokens=NEW_TOKENS)
    run_until_idle(scheduler, replies, 400)
    return replies


@pytest.fixture(scope="module")
def float32_engine(model_path):
    return Engine(model_path, "float32", "cpu", pages_for(6 * 256, 16) + 1, 16, 512, max_running_requests=4)


@pytest.mark.real_model
@pytest.mark.exercise("future-tokens")
def test_overlap_gives_the_tokens_of_no_overlap(float32_engine, eos_ids, tokenizer, prompts):
    results = {}
    for overlap in (False, True):
        scheduler = Scheduler(float32_engine, 4, 15, eos_ids, "radix", overlap=overlap)
        steps = recording_steps(scheduler)
        results[overlap] = mixed_workload(scheduler, tokenizer, prompts)
        del float32_engine.step  # the recording wrapper: the engine is shared
        check_idle(scheduler)
        assert sorted(scheduler.free_slots) == [0, 1, 2, 3], "a slot was not given back"
        overlapped = sum(stand_ins for _, stand_ins in steps)
        if overlap:  # most steps were built before the tokens they read were known
            assert overlapped > len(steps) // 2, f"only {overlapped} of {len(steps)} steps overlapped"
        else:
            assert overlapped == 0
    off, on = results[False], results[True]
    assert set(on) == set(off)
    for uid in off:
        assert (on[uid].tokens, on[uid].finish, on[uid].cached_tokens) == \
               (off[uid].tokens, off[uid].finish, off[uid].cached_tokens), f"{uid}: overlap {on[uid]}, not {off[uid]}"
    assert on["same-system"].cached_tokens >= 16 and on["code"].finish == "length"


def tiny_scheduler(tiny_llama, overlap: bool = True, max_running: int = 4) -> Scheduler:
    engine = Engine(tiny_llama, "float32", "cpu", 64 + 1, 4, 128, max_running_requests=max_running)
    return Scheduler(engine, max_running, 8, {TINY_EOS}, "radix", overlap=overlap)


def test_a_request_that_ends_one_step_back_gets_no_extra_token(tiny_llama):
    """Its first token is its end of sequence (forced by logit_bias): when that is known, the next step, with
    the request in it, is already running. That step's token for it is dropped, the stream ends at once."""
    scheduler = tiny_scheduler(tiny_llama)
    steps = recording_steps(scheduler)
    replies: dict[str, Reply] = {}
    submit(scheduler, "ends", [5, 6, 7], max_tokens=8, logit_bias={TINY_EOS: 100.0})
    submit(scheduler, "goes-on", [8, 9], max_tokens=6, ignore_eos=True)
    run_until_idle(scheduler, replies, 20)  # collect() fails on any output after a request's finish
    assert (replies["ends"].tokens, replies["ends"].finish, replies["ends"].finishes) == ([], "stop", 1)
    in_steps = [uids for uids, _ in steps if "ends" in uids]
    assert len(in_steps) == 2, f"it ran in {len(in_steps)} steps: its prefill, then one whose token is dropped"
    assert (len(replies["goes-on"].tokens), replies["goes-on"].finish) == (6, "length")
    check_idle(scheduler)


def test_a_request_never_runs_past_its_last_token(tiny_llama):
    """With max_tokens 5, its fifth token is sampled by its fifth step: once that step is launched, the
    request is done, and no sixth step is built for it (which would write past its pages)."""
    scheduler = tiny_scheduler(tiny_llama)
    steps = recording_steps(scheduler)
    replies: dict[str, Reply] = {}
    submit(scheduler, "five", [3, 1, 4, 1, 5], max_tokens=5, ignore_eos=True)
    run_until_idle(scheduler, replies, 20)
    assert len(replies["five"].tokens) == 5 and replies["five"].finish == "length"
    assert sum("five" in uids for uids, _ in steps) == 5
    check_idle(scheduler)


def test_an_abort_while_the_next_step_runs_frees_everything_once(tiny_llama):
    scheduler = tiny_scheduler(tiny_llama)
    replies: dict[str, Reply] = {}
    submit(scheduler, "aborted", list(range(1, 12)), max_tokens=30, ignore_eos=True)
    submit(scheduler, "kept", list(range(20, 30)), max_tokens=30, ignore_eos=True)
    for _ in range(4):
        collect(replies, scheduler.step())
    assert scheduler.in_flight is not None and scheduler.running  # a step runs, built with stand-ins
    aborted = next(request for request in scheduler.running if request.uid == "aborted")
    assert aborted.output_ids[-1] < 0, "its last token should still be on its way"
    collect(replies, scheduler.handle(AbortRequest("aborted")))
    assert all(token >= 0 for token in aborted.output_ids) and aborted.pages == [] and aborted.slot == -1
    run_until_idle(scheduler, replies, 60)  # the running step's token for it never reaches the stream
    assert replies["aborted"].finish == "abort" and replies["aborted"].finishes == 1
    assert len(replies["kept"].tokens) == 30
    check_idle(scheduler)
    assert sorted(scheduler.free_slots) == [0, 1, 2, 3]


def test_overlap_needs_no_more_slots_than_running_requests(tiny_llama):
    engine = Engine(tiny_llama, "float32", "cpu", 65, 4, 128, max_running_requests=2)
    with pytest.raises(ValueError, match="max_running_requests 4 is more than the engine's 2 slots"):
        Scheduler(engine, 4, 8, {TINY_EOS}, "radix", overlap=True)


@pytest.fixture(scope="module")
def llms(tiny_chat_model):
    """The offline API on the tiny chat model, overlap off and on (constraints compile with its tokenizer)."""
    return {overlap: LLM(tiny_chat_model, dtype="float32", max_running_requests=4, context_length=256,
                         **{"enable_overlap_schedule" if overlap else "disable_overlap_schedule": True})
            for overlap in (False, True)}


def test_stop_strings_and_constraints_end_replies_as_without_overlap(llms):
    assert llms[True].scheduler.forward_thread is not None and llms[False].scheduler.forward_thread is None
    texts = ["The capital of France is", "Count: 1, 2, 3,", "def fibonacci(n):"]
    [free] = llms[False].generate(texts[0], SamplingParams(max_tokens=24, ignore_eos=True))
    stop = free.text[len(free.text) // 2:][:3]  # three characters from the reply's middle: it stops there
    params = [SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]),
              SamplingParams(max_tokens=16, constraint=("regex", "(yes|no), [a-z]{2,12}")),
              SamplingParams(max_tokens=12, constraint=("json_object", ""), temperature=0.8, seed=7)]
    results = {overlap: llms[overlap].generate(texts, params) for overlap in (False, True)}
    for off, on in zip(results[False], results[True], strict=True):
        assert (on.text, on.finish_reason, on.token_ids) == (off.text, off.finish_reason, off.token_ids)
    stopped = results[True][0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]
    for llm in llms.values():
        state = llm.scheduler.state()
        assert state["running"] == state["waiting"] == state["in_use_pages"] == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the forward thread with CUDA graphs needs a CUDA GPU")
def test_overlap_with_cuda_graphs_gives_the_tokens_of_no_overlap(model_path, eos_ids, tokenizer, prompts):
    engine = Engine(model_path, "float32", "cuda", pages_for(6 * 256, 16) + 1, 16, 512, attention_backend="triton",
                    cuda_graph_max_bs=4, max_running_requests=4)
    results = {}
    for overlap in (False, True):
        scheduler = Scheduler(engine, 4, 15, eos_ids, "radix", overlap=overlap)
        results[overlap] = mixed_workload(scheduler, tokenizer, prompts)
        check_idle(scheduler)
    for uid, off in results[False].items():
        assert (results[True][uid].tokens, results[True][uid].finish) == (off.tokens, off.finish), uid
