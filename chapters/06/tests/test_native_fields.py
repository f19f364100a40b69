"""SGLang's fields and shapes that real clients send and read, on the complete server (issue 26): where the
prompt's log probabilities start on ``/generate``, assistant prefill in a chat, the echo of a prompt sent as
token ids, streamed completion chunks with log probabilities, what ``/v1/models`` and ``/get_server_info``
say, and ``no_stop_trim`` on the OpenAI endpoints.

The default model serves in float32, greedy wherever texts are compared; through the openai client and httpx.
"""

import json
from pathlib import Path

import httpx
import openai
import pytest

from openai_contract import MODEL

PROMPT = "I have a very good idea on how to"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path, body, status=200):
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def generate(server, text, status=200, **fields):
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 3}, "return_logprob": True,
            "return_text_in_logprobs": True} | fields
    return post(server, "/generate", body, status)


def raw_events(server, path, body) -> list[dict]:
    """The JSON of every event of a streamed reply, as the server sent it (no client's model in between)."""
    events = []
    with httpx.stream("POST", server.url + path, json=body | {"stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def same_entries(got: list, expected: list) -> None:
    """SGLang's ``[logprob, token id, text]`` entries: the same tokens, the same numbers up to float noise (the
    same tokens run in another batch, or from cached keys and values, may differ in their last bits)."""
    assert [e[1:] for e in got] == [e[1:] for e in expected]
    for (a, *_), (b, *_) in zip(got, expected):
        assert a == b if a is None or b is None else a == pytest.approx(b, abs=1e-4)


# ---------------------------------------------------------------- /generate's logprob_start_len


def test_logprob_start_len_gives_the_prompt_from_that_position_on(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    whole = generate(server, PROMPT, logprob_start_len=0, top_logprobs_num=2)["meta_info"]
    tokens, top = whole["input_token_logprobs"], whole["input_top_logprobs"]
    assert whole["prompt_tokens"] == len(ids) == len(tokens) == len(top)
    assert [t[1] for t in tokens] == ids and "".join(t[2] for t in tokens) == PROMPT
    assert tokens[0][0] is None and top[0] is None  # nothing predicts the first token
    assert all(t[0] <= 0 and len(alternatives) == 2 for t, alternatives in zip(tokens[1:], top[1:]))
    for start in (3, len(ids) - 1):
        meta = generate(server, PROMPT, logprob_start_len=start, top_logprobs_num=2)["meta_info"]
        part, part_top = meta["input_token_logprobs"], meta["input_top_logprobs"]
        assert meta["prompt_tokens"] == start + len(part) == start + len(part_top)  # as SGLang's tests count them
        assert [t[1] for t in part] == ids[start:] and PROMPT.endswith("".join(t[2] for t in part))
        # As in SGLang, the first reported position has no log probability (nothing before it is scored)...
        assert part[0][0] is None and part_top[0] is None
        # ...and the others are the same numbers as when the whole prompt is scored
        for got, expected in zip(part[1:], tokens[start + 1:], strict=True):
            assert got[0] == pytest.approx(expected[0], abs=1e-4)
        same_entries(meta["output_token_logprobs"], whole["output_token_logprobs"])


def test_logprob_start_len_defaults_to_the_last_prompt_token_as_in_sglang(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    meta = generate(server, PROMPT, top_logprobs_num=1)["meta_info"]
    assert meta["input_token_logprobs"] == [[None, ids[-1], tokenizer.decode(ids[-1:])]]
    assert meta["input_top_logprobs"] == [None]
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == 3
    plain = generate(server, PROMPT, return_logprob=False, logprob_start_len=2)["meta_info"]  # ignored, as in SGLang
    assert "input_token_logprobs" not in plain and "output_token_logprobs" not in plain


def test_logprob_start_len_works_for_batches_and_streams(server):
    prompts = ["I have a very good idea on", "Today is a sunny day and"]
    results = generate(server, prompts, logprob_start_len=4, top_logprobs_num=5)
    for prompt, result in zip(prompts, results, strict=True):
        meta = result["meta_info"]
        assert meta["prompt_tokens"] == 4 + len(meta["input_token_logprobs"])
        assert prompt.endswith("".join(t[2] for t in meta["input_token_logprobs"]))
        assert result["text"] == "".join(t[2] for t in meta["output_token_logprobs"])
    body = {"text": prompts[0], "sampling_params": {"temperature": 0, "max_new_tokens": 3}, "return_logprob": True,
            "return_text_in_logprobs": True, "logprob_start_len": 4}
    events = raw_events(server, "/generate", body)
    assert events
    for event in events:  # every event carries the prompt's, as SGLang's do
        same_entries(event["meta_info"]["input_token_logprobs"], results[0]["meta_info"]["input_token_logprobs"])


def test_logprob_start_len_past_the_prompt_or_below_minus_one_is_a_400(server, tokenizer):
    length = len(tokenizer.encode(PROMPT))
    for start in (length, length + 10):
        error = generate(server, PROMPT, 400, logprob_start_len=start)["error"]
        assert error["param"] == "logprob_start_len" and str(length) in error["message"]
    error = generate(server, PROMPT, 400, logprob_start_len=-2)["error"]
    assert error["param"] == "logprob_start_len"


def test_a_prompt_scored_from_a_later_position_still_reuses_the_cached_prefix(server):
    prompt = "A fairly long prompt that the prefix cache keeps between requests. " * 4
    generate(server, prompt, return_logprob=False)
    default = generate(server, prompt)["meta_info"]  # the last token only: the whole cached prefix is used
    assert default["cached_tokens"] >= 32
    later = generate(server, prompt, logprob_start_len=20)["meta_info"]  # cached only up to the start
    assert 0 < later["cached_tokens"] <= 20 and later["input_token_logprobs"][1][0] is not None
    echo = generate(server, prompt, logprob_start_len=0)["meta_info"]  # every token scored: nothing cached
    assert echo["cached_tokens"] == 0


def test_scored_rows_start_at_logprob_start_len():
    from minisgl.core import Batch, Request, SamplingParams
    from minisgl.sampling import prompt_logprob_rows

    scored = Request("b", [10, 11, 12, 13, 14], SamplingParams(prompt_logprobs=True, logprob_start_len=2))
    assert prompt_logprob_rows(Batch([scored], [5])) == [(0, 2, 13), (0, 3, 14)]  # rows 0 and 1 are not scored
    last = Request("c", [10, 11, 12], SamplingParams(prompt_logprobs=True, logprob_start_len=2))
    assert prompt_logprob_rows(Batch([last], [3])) == []  # SGLang's default: the last token, nothing to score


# ---------------------------------------------------------------- continue_final_message (assistant prefill)


PREFILL = [{"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": "Sure! The first is"}]


def test_continue_final_message_continues_the_assistant_text_as_its_raw_prompt_does(client, tokenizer):
    raw = tokenizer.apply_chat_template(PREFILL, tokenize=False, continue_final_message=True)
    assert raw.endswith("Sure! The first is")  # the turn is left open: no end of turn, no new assistant header
    ids = tokenizer.encode(raw, add_special_tokens=False)
    expected = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    reply = client.chat.completions.create(model=MODEL, messages=PREFILL, max_tokens=8, temperature=0,
                                           extra_body={"continue_final_message": True})
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == expected.choices[0].text  # the continuation only
    assert "<|im_start|>" not in reply.choices[0].message.content
    # without it, the assistant's turn is closed and a new one opened: a longer prompt
    opened = client.chat.completions.create(model=MODEL, messages=PREFILL, max_tokens=8, temperature=0)
    assert opened.usage.prompt_tokens > len(ids) + 2
    streamed = client.chat.completions.create(model=MODEL, messages=PREFILL, max_tokens=8, temperature=0,
                                              stream=True, extra_body={"continue_final_message": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.choices[0].text


def test_continue_final_message_needs_an_assistant_message_last(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True, "max_tokens": 2}
    error = post(server, "/v1/chat/completions", body, 400)["error"]
    assert error["param"] == "continue_final_message" and "assistant" in error["message"]


# ---------------------------------------------------------------- echo of prompts sent as token ids


def test_echo_of_token_ids_is_the_echo_of_the_same_prompt_as_text(client, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    as_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert as_ids.choices[0].text == as_text.choices[0].text and as_ids.choices[0].text.startswith(prompt)
    both = client.completions.create(model=MODEL, prompt=[ids, tokenizer.encode("One, two,")], max_tokens=2,
                                     temperature=0, echo=True, logprobs=1)
    assert both.choices[0].text.startswith(prompt) and both.choices[1].text.startswith("One, two,")
    assert "".join(both.choices[0].logprobs.tokens) == both.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == as_text.choices[0].text


def test_echo_of_token_ids_outside_the_vocabulary_is_a_400(server):
    error = post(server, "/v1/completions", {"prompt": [1, 10**8], "echo": True, "max_tokens": 1}, 400)["error"]
    assert error["param"] == "prompt"


# ---------------------------------------------------------------- streamed completion chunks with logprobs


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A chat as a raw completion prompt: greedy, the model answers briefly and ends with its EOS."""
    raw = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                        add_generation_prompt=True)
    return tokenizer.encode(raw, add_special_tokens=False)


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("logprobs", [1, 5])
def test_every_streamed_completion_chunk_lists_its_tokens_in_the_legacy_shape(client, tokenizer, echo, logprobs):
    """As SGLang's streamed-completion test reads them: every chunk's tokens[0] is text, and its top_logprobs[0]
    a non-empty dict (but for an echo's first chunk, which starts with the prompt's first token)."""
    ids = chat_prompt_ids(tokenizer, "Say hi.")
    whole = client.completions.create(model=MODEL, prompt=ids, max_tokens=60, temperature=0, logprobs=logprobs,
                                      echo=echo)
    assert whole.choices[0].finish_reason == "stop"  # ended by EOS: its last output brings no token
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=60, temperature=0,
                                            logprobs=logprobs, echo=echo, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    for i, chunk in enumerate(chunks[:-1]):
        lp = chunk.choices[0].logprobs
        assert lp and isinstance(lp.tokens[0], str)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        if not (i == 0 and echo):
            assert isinstance(lp.top_logprobs[0], dict) and len(lp.top_logprobs[0]) > 0
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["stop"]
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert [t for c in chunks[:-1] for t in c.choices[0].logprobs.tokens] == whole.choices[0].logprobs.tokens
    offsets = [o for c in chunks[:-1] for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset


def test_streamed_chunks_carry_all_four_legacy_lists(server, tokenizer):
    body = {"prompt": chat_prompt_ids(tokenizer, "Say hi."), "max_tokens": 60, "temperature": 0, "logprobs": 0}
    events = raw_events(server, "/v1/completions", body)
    assert events
    for event in events:
        lists = event["choices"][0]["logprobs"]
        assert set(lists) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lists["tokens"]) >= 1 and all(isinstance(value, list) for value in lists.values())


# ---------------------------------------------------------------- what the server says about itself


def test_the_model_card_has_root_and_max_model_len(client, server):
    card = client.models.retrieve(MODEL)
    assert (card.id, card.root, card.max_model_len) == (MODEL, MODEL, 512)  # SGLang's test: root is the id
    (listed,) = client.models.list().data
    assert (listed.root, listed.max_model_len) == (MODEL, 512)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("non-existent-model")


def test_server_info_has_the_fields_sglangs_clients_read(server, model_path):
    info = httpx.get(server.url + "/get_server_info", timeout=30).json()
    state = httpx.get(server.url + "/state", timeout=30).json()
    assert info["max_total_num_tokens"] == state["total_pages"] * info["page_size"] > 0
    assert (info["max_running_requests"], info["context_length"], info["page_size"]) == (4, 512, 16)
    assert (info["chunked_prefill_size"], info["tp_size"], info["dp_size"]) == (512, 1, 1)
    assert info["max_req_input_len"] == 511 and Path(info["model_path"]).name == model_path.name
    assert isinstance(info["version"], str) and info["version"]
    assert httpx.get(server.url + "/server_info", timeout=30).json()["max_total_num_tokens"] == \
        info["max_total_num_tokens"]


# ---------------------------------------------------------------- no_stop_trim on the OpenAI endpoints


def test_no_stop_trim_keeps_the_stop_string_in_completions_and_chats(client):
    text = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = text[3:6]
    kept, trimmed = text[: text.index(stop) + len(stop)], text[: text.index(stop)]
    for trim, expected in ((False, trimmed), (True, kept)):
        out = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=12, temperature=0,
                                        stop=[stop], extra_body={"no_stop_trim": trim})
        assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
        streamed = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=12, temperature=0,
                                             stop=[stop], stream=True, extra_body={"no_stop_trim": trim})
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    content = reply.choices[0].message.content
    stop = content[4:8]
    kept = content[: content.index(stop) + len(stop)]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stop=[stop],
                                         extra_body={"no_stop_trim": True})
    assert out.choices[0].message.content == kept
