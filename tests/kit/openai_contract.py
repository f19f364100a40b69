"""The OpenAI contract: what every chapter's server does, checked through the real ``openai`` client.

A chapter's ``tests/test_server.py`` runs these tests against its own server with

    from openai_contract import *  # noqa: F403

and its fixtures provide
- ``server``: a running server (``.url``), started with ``server_process.TEST_SERVER_ARGS`` (float32,
  4 KV cache slots, context 512) and the default ``--max-request-bytes`` (1 MiB); one per test module;
- ``tokenizer`` and ``model_path``: the default model's.

The oracle is transformers: greedy text must be exactly what its ``generate`` makes, in float32.

A module that serves a second configuration of the same chapter's server (another KV cache, more ranks)
imports only the tests whose requests reach the scheduler (``from scheduler_contract import *``): the greedy
replies, the stop string, the seeded choices and the disconnect. The others (streaming against the whole
reply, multibyte text, bad input, body limits, the native endpoints) are answered by the API server, tokenizer
and detokenizer processes, which a scheduler setting does not change; the chapter's main server module runs
them.

A chapter whose server does not pass some of these tests yet names them, with the reason, in
``CONTRACT_XFAIL = {"test_name": "reason"}`` in its test module; they then run as non-strict xfails.
Delete the entry once the chapter's code has caught up.
"""

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
MAX_REQUEST_BYTES = 1 << 20  # the servers' default --max-request-bytes
RAW_TIMEOUT = 20  # seconds a raw-socket test waits for a reply before failing (instead of hanging)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def greedy(model_path):
    """transformers' greedy ``generate`` in float32: prompt ids -> the new ids, EOS included if it came."""
    return greedy_generate(model_path)


def greedy_generate(model_path):
    """The oracle behind ``greedy``, for any model folder (a module that serves another model reuses it)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def generate(prompt_ids: list[int], new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        return out[0, len(prompt_ids) :].tolist()

    return generate


@pytest.fixture(autouse=True)
def contract_xfail(request):
    """Run as a non-strict xfail the tests that this chapter's ``CONTRACT_XFAIL`` names."""
    reason = getattr(request.module, "CONTRACT_XFAIL", {}).get(request.function.__name__)
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


def chat(client, content, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def streamed_text(chunks) -> str:
    """The text of a streamed chat reply (one choice), put back together."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_still_serving(client):
    assert chat(client, "Say hi.", max_tokens=2, temperature=0).choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- replies


def test_greedy_chat_is_what_transformers_generates(client, tokenizer, greedy):
    question = "What is the capital of France? Answer in one sentence."
    reply = chat(client, question, max_tokens=32, temperature=0)
    messages = [{"role": "user", "content": question}]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(templated, add_special_tokens=False)
    expected = greedy(prompt_ids, 32)
    assert expected[-1] == tokenizer.eos_token_id, "the oracle should end on its own, before 32 tokens"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == tokenizer.decode(expected[:-1])
    # The EOS token ends the reply; it is not part of it, nor of the count.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), len(expected) - 1)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_completion_is_what_transformers_generates_streamed_or_not(client, tokenizer, greedy):
    prompt = "def fibonacci(n):"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    expected = greedy(tokenizer.encode(prompt), 16)
    assert whole.choices[0].text == tokenizer.decode(expected)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_streamed_chat_equals_the_unstreamed_reply(client):
    question = "Name three colors of the rainbow."
    whole = chat(client, question, max_tokens=24, temperature=0)
    usage = {"include_usage": True}
    chunks = list(chat(client, question, max_tokens=24, temperature=0, stream=True, stream_options=usage))
    assert streamed_text(chunks) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_spanning_tokens_ends_the_reply_before_it(client, tokenizer):
    question = "Tell me a short story about a brave little mouse."
    text = chat(client, question, max_tokens=32, temperature=0).choices[0].message.content
    start = next(i for i in range(10, len(text) - 8) if len(tokenizer.encode(text[i : i + 7])) >= 2)
    stop = text[start : start + 7]  # seven characters that are more than one token
    reply = chat(client, question, max_tokens=32, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == text[: text.index(stop)]
    streamed = streamed_text(chat(client, question, max_tokens=32, temperature=0, stop=[stop], stream=True))
    assert streamed == text[: text.index(stop)]  # not even a first piece of the stop string went out


def test_n_choices_with_a_seed(client):
    kwargs = dict(max_tokens=12, temperature=1.0, seed=42, n=3)
    first, again = (chat(client, "Invent a name for a cat.", **kwargs) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # seeded: repeatable
    assert len(set(texts)) > 1  # but the choices differ from each other
    assert 3 <= first.usage.completion_tokens <= 3 * 12  # the three choices' tokens, added up


def test_multibyte_text_streams_exactly_as_it_is_returned_whole(client):
    question = "Write the word 'hello' in Japanese, Chinese and Korean, then add a smiling emoji."
    whole = chat(client, question, max_tokens=16, temperature=0).choices[0].message.content
    assert any(len(char.encode()) > 1 for char in whole), "the reply should hold characters of several bytes"
    streamed = streamed_text(chat(client, question, max_tokens=16, temperature=0, stream=True))
    # A character split across tokens is sent once it is whole, never as a replacement character.
    assert streamed == whole and "\ufffd" not in streamed


def test_models_health_and_native_generate(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    body = {"text": "The sky is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    # Chapters 02-06 send the finish reason as a string; the complete server as SGLang does, an object.
    finish = out["meta_info"]["finish_reason"]
    assert finish in ("length", {"type": "length", "length": 4})
    assert out["meta_info"]["completion_tokens"] == 4 and out["text"]


# ---------------------------------------------------------------- bad input


HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi " * 300, "max_tokens": 300}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI[0] | {"role": "wizard"}]}, 400, "messages.0.role"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
]


def post_json_bytes(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)


def assert_openai_error(response, status, param, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, path, body, status, param):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    assert_openai_error(post_json_bytes(server.url + path, body), status, param)
    assert_still_serving(client)


@pytest.mark.parametrize("path, field, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages"),
    ("/v1/completions", {"prompt": "hi \ud800 there"}, "prompt"),
    ("/generate", {"text": "hi \ud800 there"}, "text"),
])
def test_text_that_is_not_utf8_is_refused(server, client, path, field, param):
    # json.dumps escapes the lone surrogate as \ud800: valid JSON, but no UTF-8 text.
    limits = {"sampling_params": {"max_new_tokens": 2}} if path == "/generate" else {"model": MODEL, "max_tokens": 2}
    body = json.dumps({**limits, **field}).encode()
    assert b"\\ud800" in body
    assert_openai_error(post_json_bytes(server.url + path, body), 400, param)
    assert_still_serving(client)


def raw_post(url: str, path: str, headers: dict, body_pieces: list[bytes]) -> http.client.HTTPResponse:
    """POST over a bare socket: send the headers and exactly these body bytes, then read the reply.

    The body may be shorter than the headers promise: a server that waits for the rest makes the read
    time out after ``RAW_TIMEOUT`` seconds, a failure rather than a hang.
    """
    address = urlsplit(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=RAW_TIMEOUT)
    head = f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sock.sendall(head.encode() + b"".join(body_pieces))
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        response.body = response.read()
    finally:
        sock.close()
    return response


def assert_too_large(response):
    assert (response.status, response.getheader("content-type")) == (413, "application/json")
    error = json.loads(response.body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large" and error["param"] is None
    assert error["message"]


def test_a_body_declared_too_large_is_refused_before_it_is_sent(server, client):
    # The client promises 20 MB and sends only the start: the reply must come without the rest.
    start = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"a" * 4000
    response = raw_post(server.url, "/v1/completions", {"Content-Length": 20_000_000}, [start])
    assert_too_large(response)
    assert_still_serving(client)


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server, client):
    # Chunked: no size up front. The pieces add up to one byte over the limit, and the final empty chunk
    # never comes: only a server that counts as the bytes arrive can answer.
    piece = 64 * 1024
    sizes = [piece] * (MAX_REQUEST_BYTES // piece) + [1]
    chunks = [f"{size:x}\r\n".encode() + b"a" * size + b"\r\n" for size in sizes]
    response = raw_post(server.url, "/v1/completions", {"Transfer-Encoding": "chunked"}, chunks)
    assert_too_large(response)
    assert_still_serving(client)


# ---------------------------------------------------------------- disconnects


def test_disconnect_mid_stream_frees_the_slot(server):
    story = [{"role": "user", "content": "Write a long story."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                # Generation is under way. Look now, still connected: leaving the loop closes the connection
                # (httpcore closes it when its byte stream is abandoned), and the abort would race this look.
                busy = httpx.get(server.url + "/state").json()
                break
        assert busy["running"] == 1 and memory_held(busy) > 0, (busy, server.log_tail())
    deadline = time.monotonic() + 30  # a bounded wait for the abort to travel through the server
    while (state := httpx.get(server.url + "/state").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["running"] == 0 and memory_held(state) == 0


def memory_held(state: dict) -> int:
    """KV cache memory that running requests hold: slots (chapters 02-04) or pages (chapter 05 on; pages the
    prefix cache keeps for later requests are not held by anyone)."""
    if "in_use_pages" in state:
        return state["in_use_pages"]
    return state["total_slots"] - state["free_slots"]


# What `from openai_contract import *` brings into a chapter's test module: the tests, their fixtures,
# and the helpers a chapter's own tests may use.
__all__ = ["MODEL", "chat", "client", "greedy", "contract_xfail", "assert_openai_error", "assert_still_serving",
           *(name for name in list(globals()) if name.startswith("test_"))]
