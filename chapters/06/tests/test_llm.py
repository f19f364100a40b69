"""The offline API, ``from minisgl import LLM, SamplingParams``: the server's greedy output, in-process.

``LLM`` holds the same tokenizer, detokenizer, scheduler and engine objects the server's processes do,
so with the same settings (the test server's: float32, 4 running requests, context 512) its greedy text
must be the server's, word for word, for raw prompts, token-id prompts and chats; stop strings end a
reply where the server's detokenizer ends it; a bad prompt is refused before anything runs.
"""

import httpx
import pytest

from minisgl import LLM, SamplingParams
from openai_contract import MODEL

PROMPTS = ["The capital of France is", "Count: 1, 2, 3,", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model_path, dtype="float32", max_running_requests=4, context_length=512)


def server_text(server, endpoint: str, body: dict) -> tuple[str, str]:
    response = httpx.post(f"{server.url}/v1/{endpoint}", json={"model": MODEL, **body}, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return (choice["text"] if endpoint == "completions" else choice["message"]["content"]), choice["finish_reason"]


def test_generate_says_what_the_server_says(llm, server):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16))
    for prompt, out in zip(PROMPTS, outs):
        text, finish = server_text(server, "completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert (out.text, out.finish_reason) == (text, finish), f"prompt {prompt!r}"
        assert len(out.token_ids) == 16 or out.finish_reason == "stop"


def test_token_ids_and_chats_and_stop_strings(llm, server, tokenizer):
    prompt = "Paris is the capital of France, and Rome is the capital of Italy. " * 3 + PROMPTS[0]
    [by_ids] = llm.generate([tokenizer.encode(prompt)], SamplingParams(max_tokens=8))
    [by_text] = llm.generate(prompt, SamplingParams(max_tokens=8))
    assert by_ids.token_ids == by_text.token_ids
    assert by_text.cached_tokens >= 16  # the second time, its first pages were in the radix cache
    [reply] = llm.chat(CHAT, SamplingParams(max_tokens=20))
    assert (reply.text, reply.finish_reason) == server_text(server, "chat/completions",
                                                            {"messages": CHAT, "max_tokens": 20, "temperature": 0})
    word = reply.text.split()[-1].strip(".")  # a word of the reply: stop there
    [stopped] = llm.chat(CHAT, SamplingParams(max_tokens=20, stop=[word]))
    assert stopped.finish_reason == "stop" and stopped.text == reply.text[: reply.text.index(word)]
    state = llm.scheduler.state()
    assert state["running"] == state["waiting"] == 0 and state["in_use_pages"] == 0  # the stop freed its pages


def test_a_bad_prompt_is_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match=r"prompt 1: .*longer than the model.s context length of 512"):
        llm.generate(["short", "word " * 600], SamplingParams(max_tokens=8))
    assert llm.scheduler.state()["waiting"] == 0
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_tensor_parallelism_is_refused_not_ignored(model_path):
    """One process is one rank: asking for three must fail, not run quietly on one."""
    with pytest.raises(ValueError, match="one rank, not tp_size 3"):
        LLM(model_path, tp_size=3)


def test_a_constraint_shapes_the_reply_and_one_that_does_not_compile_runs_nothing(llm):
    [yes_no] = llm.generate("Is water wet? Answer:", SamplingParams(max_tokens=8, constraint=("regex", " (yes|no)")))
    assert yes_no.text in (" yes", " no") and yes_no.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"prompt 1: the regex does not compile"):
        llm.generate(["fine", "broken"], [SamplingParams(max_tokens=2), SamplingParams(constraint=("regex", "(a"))])
    state = llm.scheduler.state()
    assert state["running"] == state["waiting"] == 0 and state["in_use_pages"] == 0


def test_completions_carry_their_matched_stop_and_log_probabilities(llm):
    [reply] = llm.generate("Count: one, two,", SamplingParams(max_tokens=20, stop=[","], logprobs=2))
    assert reply.finish_reason == "stop" and reply.matched_stop == ","
    assert len(reply.logprobs) >= 1 and all(len(t.top) == 2 and t.logprob <= 0 for t in reply.logprobs)



def test_prompt_log_probabilities_and_no_grammar_left_behind(llm):
    from concurrent.futures import ThreadPoolExecutor

    from minisgl.messages import AbortRequest, UserRequest, pack_ids

    params = SamplingParams(max_tokens=2, logprobs=1, prompt_logprobs=True)
    [scored] = llm.generate("The capital of France is", params)
    assert len(scored.prompt_logprobs) == scored.prompt_tokens and scored.prompt_logprobs[0].logprob is None
    assert all(t.logprob <= 0 for t in scored.prompt_logprobs[1:])
    # Compiles on a thread: a refused constraint and an abort while compiling leave nothing pending.
    scheduler, grammars = llm.scheduler, llm.scheduler.grammars
    grammars.pool = ThreadPoolExecutor(1)
    try:
        bad = UserRequest("bad", pack_ids([1, 2]), SamplingParams(constraint=("regex", "(a")))
        slow = UserRequest("slow", pack_ids([1, 2]), SamplingParams(constraint=("regex", "[a-z]{1,400}")))
        outputs = [scheduler.step([bad, slow, AbortRequest("slow")])]
        while scheduler.has_work:
            outputs.append(scheduler.step())
        grammars.pool.shutdown(wait=True)
        said = [output for output in outputs if output is not None]
        assert [(out.uid, out.finish) for output in said for out in output.outputs] == [("slow", "abort")]
        assert [refusal.uid for output in said for refusal in output.refused] == ["bad"]
        assert scheduler.step() is None and not grammars.compiling and not grammars.grammars.pending
    finally:
        grammars.pool = None
