"""The multi-process server: everything chapter 02 checked, through the real ``openai`` client."""

import json
import time

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_chat_completion(client, tokenizer):
    reply = chat(client, "What is the capital of France? Answer in one sentence.", max_tokens=32, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"  # the model ended on its own, before 32 tokens
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], tokenize=False, add_generation_prompt=True
    )
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert 0 < reply.usage.completion_tokens < 32
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_unstreamed_reply(client):
    question = "Name three colors of the rainbow."
    whole = chat(client, question, max_tokens=24, temperature=0)
    chunks = list(chat(client, question, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_gives_finish_reason_length(client):
    reply = chat(client, "Write a long essay about the sea.", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_stop_string_ends_the_reply_before_it(client):
    free = chat(client, "Count from one to ten in words, separated by commas.", max_tokens=40, temperature=0)
    text = free.choices[0].message.content
    stop = text[10:14]
    reply = chat(client, "Count from one to ten in words, separated by commas.", max_tokens=40, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == text[: text.index(stop)]


def test_n_choices_with_a_seed(client):
    kwargs = dict(max_tokens=12, temperature=1.0, seed=42, n=3)
    first, again = chat(client, "Invent a name for a cat.", **kwargs), chat(client, "Invent a name for a cat.", **kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # seeded: repeatable
    assert len(set(texts)) > 1  # but the choices differ from each other
    assert 3 <= first.usage.completion_tokens <= 3 * 12  # the three choices' tokens, added up


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16
    streamed = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_models_health_and_native_generate(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    out = httpx.post(server.url + "/generate", json={"text": "The sky is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=60).json()
    assert out["meta_info"]["completion_tokens"] == 4 and out["meta_info"]["finish_reason"] == "length" and out["text"]


def test_multibyte_text_streams_exactly_as_it_is_returned_whole(client):
    question = "Write the word 'hello' in Japanese, Chinese and Korean, then add a smiling emoji."
    whole = chat(client, question, max_tokens=40, temperature=0).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, question, max_tokens=40, temperature=0, stream=True) if c.choices)
    assert streamed == whole and "\ufffd" not in streamed


def test_a_stop_string_spanning_tokens_never_reaches_the_client(client, tokenizer):
    question = "Tell me a short story about a brave little mouse."
    text = chat(client, question, max_tokens=48, temperature=0).choices[0].message.content
    start = next(i for i in range(20, len(text) - 8) if len(tokenizer.encode(text[i : i + 7])) >= 2)
    stop = text[start : start + 7]  # seven characters that are more than one token
    chunks = [c.choices[0].delta.content or "" for c in chat(client, question, max_tokens=48, temperature=0, stop=[stop], stream=True) if c.choices]
    assert "".join(chunks) == text[: text.index(stop)]


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi " * 300, "max_tokens": 300}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, path, body, status, param):
    send = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.url + path, timeout=60, **send)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert chat(client, "Say hi.", max_tokens=2, temperature=0).choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_frees_the_slot(server):  # the abort travels API -> tokenizer -> scheduler
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # generation is under way: leave
        busy = httpx.get(server.url + "/state").json()
        assert busy["running"] == 1 and busy["free_slots"] == busy["total_slots"] - 1
    deadline = time.monotonic() + 30  # a bounded wait for the abort to travel through the scheduler
    while (state := httpx.get(server.url + "/state").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["running"] == 0 and state["free_slots"] == state["total_slots"]
