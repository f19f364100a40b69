"""The operator's side of the complete server: ``--api-key``, ``--max-queued-requests``, ``GET /metrics``
and one log line per finished request.

A tiny random model with the default model's tokenizer serves (its replies are noise; what is tested is
the plumbing), through the openai client where a client would use it. Counts and states are asserted,
never timings.
"""

import re
import threading
import time

import httpx
import openai
import pytest

from openai_contract import MODEL


@pytest.fixture(scope="module")
def guarded(start_server, tiny_chat_model):
    """A server that wants a key, and accepts 1 running + 1 queued request at most."""
    return start_server("--model-path", str(tiny_chat_model), "--served-model-name", MODEL, "--api-key", "sesame",
                        "--max-running-requests", "1", "--max-queued-requests", "1")


def test_without_the_key_every_endpoint_but_health_answers_401(guarded):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                         ("GET", "/state"), ("POST", "/generate")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            response = httpx.request(method, guarded.url + path, headers=headers, json={}, timeout=30)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200


def test_the_openai_client_with_the_key_is_served_and_without_it_refused(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sesame")
    reply = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.usage.completion_tokens == 4
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_past_the_queue_requests_are_refused_at_once_with_503_and_retry_after(guarded):
    """Six requests at once where one may run and one wait (limits 1 and 1): two are served, every other is
    refused with 503 and Retry-After, not queued; afterwards the server serves again."""
    headers = {"Authorization": "Bearer sesame"}
    body = {"model": MODEL, "prompt": "Count to a hundred:", "max_tokens": 400, "ignore_eos": True}
    barrier, replies = threading.Barrier(6), []

    def send():
        barrier.wait()
        replies.append(httpx.post(guarded.url + "/v1/completions", json=body, headers=headers, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    codes = sorted(reply.status_code for reply in replies)
    assert codes.count(200) >= 2 and set(codes) == {200, 503}, codes
    for reply in replies:
        if reply.status_code == 503:
            assert reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["code"] == "server_overloaded"
        else:
            assert reply.json()["usage"]["completion_tokens"] == 400
    again = httpx.post(guarded.url + "/v1/completions", json={**body, "max_tokens": 3}, headers=headers, timeout=60)
    assert again.status_code == 200, again.text
    metrics = httpx.get(guarded.url + "/metrics", headers=headers, timeout=30).text
    assert metric(metrics, 'minisgl_requests_total{outcome="overloaded"}') == codes.count(503)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics:\n{text}"
    return float(found[1])


def test_metrics_count_requests_tokens_and_latencies(start_server, tiny_chat_model):
    server = start_server("--model-path", str(tiny_chat_model), "--served-model-name", MODEL)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    before = httpx.get(server.url + "/metrics", timeout=30).text
    assert metric(before, 'minisgl_requests_total{outcome="length"}') == 0
    for tokens in (3, 5):
        client.completions.create(model=MODEL, prompt="The sea is", max_tokens=tokens, extra_body={"ignore_eos": True})
    stream = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=6, stream=True,
                                       extra_body={"ignore_eos": True})
    assert sum(1 for _ in stream) >= 6
    with pytest.raises(openai.BadRequestError):  # longer than the context: refused by the tokenizer
        client.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=4)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert metric(text, 'minisgl_requests_total{outcome="length"}') == 3
    assert metric(text, 'minisgl_requests_total{outcome="invalid"}') == 1
    assert metric(text, "minisgl_generation_tokens_total") == 3 + 5 + 6
    prompt = metric(text, "minisgl_prompt_tokens_total")
    assert prompt > 0 and prompt % 3 == 0  # three identical prompts
    assert metric(text, "minisgl_cached_prompt_tokens_total") <= prompt
    assert metric(text, "minisgl_time_to_first_token_seconds_count") == 3
    assert metric(text, 'minisgl_time_to_first_token_seconds_bucket{le="+Inf"}') == 3
    assert metric(text, "minisgl_inter_token_latency_seconds_count") >= 5  # the streamed request's gaps, at least
    assert metric(text, "minisgl_running_requests") == 0
    assert metric(text, "minisgl_waiting_requests") == 0
    assert metric(text, "minisgl_kv_pages_used") == 0
    assert metric(text, "minisgl_kv_pages_total") > 0
    assert 0 <= metric(text, "minisgl_prefix_hit_rate") <= 1
    # one log line per finished request, with what it did
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("finished: length" in line for line in server.lines) < 3:
        time.sleep(0.1)
    finished = [line for line in server.lines if re.search(r"request \S+ finished: ", line)]
    assert len([line for line in finished if "finished: length" in line]) == 3, "\n".join(finished)
    assert any(re.search(r"finished: length, prompt \d+ tokens \(\d+ cached\), output 6 tokens, ttft [\d.]+s, "
                         r"total [\d.]+s", line) for line in finished), "\n".join(finished)
    assert any("finished: invalid" in line for line in finished)
