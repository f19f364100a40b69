"""The operator's side of the complete server: ``--api-key``, ``--max-queued-requests``, ``GET /metrics``
(read back with prometheus-client's own parser) and one log line per finished request.

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
from prometheus_client.parser import text_string_to_metric_families

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
    before = scrape(guarded.url, headers)
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
    counted = grew(before, scrape(guarded.url, headers))
    assert counted['minisgl:num_requests_by_outcome_total{outcome="overloaded"}'] == codes.count(503)
    assert counted["sglang:num_requests_total"] == codes.count(200) + 1  # the refused ones were never sent


# /metrics' families as prometheus-client's parser names them (a counter's without its _total), and their types:
# SGLang's names where SGLang has the metric, this server's own (by outcome, kv_pages_*) in the same style.
FAMILIES = {
    "sglang:num_requests": "counter", "sglang:num_aborted_requests": "counter",
    "minisgl:num_requests_by_outcome": "counter", "sglang:prompt_tokens": "counter", "sglang:cached_tokens": "counter",
    "sglang:generation_tokens": "counter", "sglang:time_to_first_token_seconds": "histogram",
    "sglang:inter_token_latency_seconds": "histogram", "sglang:e2e_request_latency_seconds": "histogram",
    "sglang:num_running_reqs": "gauge", "sglang:num_queue_reqs": "gauge", "sglang:cache_hit_rate": "gauge",
    "sglang:token_usage": "gauge", **dict.fromkeys(
        [f"minisgl:kv_pages_{kind}" for kind in ("free", "cached", "evictable", "uncached", "used", "total")], "gauge"),
}


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """/metrics read by prometheus-client's own parser, as {'name{label="value"}': value} with the model_name
    label left out (every sample must carry the served model's); every family must be one of FAMILIES."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    assert {family.name: family.type for family in families} == FAMILIES
    values = {}
    for sample in (sample for family in families for sample in family.samples):
        labels = dict(sample.labels)
        assert labels.pop("model_name") == MODEL, sample
        selector = ",".join(f'{name}="{value}"' for name, value in sorted(labels.items()))
        values[f"{sample.name}{{{selector}}}" if selector else sample.name] = sample.value
    return values


def grew(before: dict, after: dict) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0) for name in after}


def test_metrics_count_requests_tokens_and_latencies(start_server, tiny_chat_model):
    server = start_server("--model-path", str(tiny_chat_model), "--served-model-name", MODEL)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    before = scrape(server.url)
    assert before['minisgl:num_requests_by_outcome_total{outcome="length"}'] == 0  # shown before the first
    usages = [client.completions.create(model=MODEL, prompt="The sea is", max_tokens=tokens,
                                        extra_body={"ignore_eos": True}).usage for tokens in (3, 5)]
    stream = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usages += [chunk.usage for chunk in stream if chunk.usage and not chunk.choices]
    with pytest.raises(openai.BadRequestError):  # longer than the context: refused by the tokenizer
        client.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=4)
    after = scrape(server.url)
    counted = grew(before, after)
    # counters: one per request, by how it ended; the tokens the replies' usage reports
    assert counted["sglang:num_requests_total"] == 4 and counted["sglang:num_aborted_requests_total"] == 0
    assert counted['minisgl:num_requests_by_outcome_total{outcome="length"}'] == 3
    assert counted['minisgl:num_requests_by_outcome_total{outcome="invalid"}'] == 1
    assert counted["sglang:generation_tokens_total"] == sum(usage.completion_tokens for usage in usages) == 3 + 5 + 6
    assert counted["sglang:prompt_tokens_total"] == sum(usage.prompt_tokens for usage in usages) > 0
    assert counted["sglang:cached_tokens_total"] <= counted["sglang:prompt_tokens_total"]
    # histograms: a first token and an end per request (the refused one had no first token), a gap per later token
    assert counted["sglang:time_to_first_token_seconds_count"] == 3
    assert counted['sglang:time_to_first_token_seconds_bucket{le="+Inf"}'] == 3
    assert counted["sglang:e2e_request_latency_seconds_count"] == 4
    assert counted["sglang:e2e_request_latency_seconds_sum"] >= counted["sglang:time_to_first_token_seconds_sum"] > 0
    assert 5 <= counted["sglang:inter_token_latency_seconds_count"] <= (3 - 1) + (5 - 1) + (6 - 1)
    # gauges: what /state says, the server being idle
    state = httpx.get(server.url + "/state", timeout=30).json()
    for gauge, key in (("sglang:num_running_reqs", "running"), ("sglang:num_queue_reqs", "waiting"),
                       ("sglang:cache_hit_rate", "prefix_hit_rate"), ("minisgl:kv_pages_free", "free_pages"),
                       ("minisgl:kv_pages_cached", "cached_pages"), ("minisgl:kv_pages_evictable", "evictable_pages"),
                       ("minisgl:kv_pages_uncached", "in_use_pages"), ("minisgl:kv_pages_used", "used_pages"),
                       ("minisgl:kv_pages_total", "total_pages")):
        assert after[gauge] == state[key], gauge
    assert after["sglang:num_running_reqs"] == after["minisgl:kv_pages_used"] == after["sglang:token_usage"] == 0
    assert after["minisgl:kv_pages_total"] > 0
    # one log line per finished request, with what it did
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("finished: length" in line for line in server.lines) < 3:
        time.sleep(0.1)
    finished = [line for line in server.lines if re.search(r"request \S+ finished: ", line)]
    assert len([line for line in finished if "finished: length" in line]) == 3, "\n".join(finished)
    assert any(re.search(r"finished: length, prompt \d+ tokens \(\d+ cached\), output 6 tokens, ttft [\d.]+s, "
                         r"total [\d.]+s", line) for line in finished), "\n".join(finished)
    assert any("finished: invalid" in line for line in finished)
