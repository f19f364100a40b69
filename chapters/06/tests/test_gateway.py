"""Replicas behind SGLang's Model Gateway (``sglang-router``; ``smg launch``): the server answers what the
gateway forwards and probes, the gateway routes by its policy and around a dead worker, and ``--dp-size``
starts and stops the whole set.

Two workers on the tiny chat model (served under the default model's name, so that the OpenAI contract's
tests apply) and three gateways in front of them, one per policy under test; each is cheap, the workers
are not, so the module starts two. The gateway checks its workers' health every second here, so that a
dead one leaves the rotation within seconds (its default is every 60 s).

From the contract, only the replies' tests run through the gateway: it answers bad input itself before
any worker sees it, in its own shape (an OpenAI error without ``param``, a 422 for some), its ``/health``
says ``OK`` in plain text, it has no ``/state``, and a body too large for a worker is one it waits for
whole (its own limit is 512 MB): those tests are about one server, and ``test_openai_surface.py`` runs them
against one. What the gateway adds to a request is also sent here straight to a worker, without it.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("sglang_router", reason="SGLang's Model Gateway (pip install sglang-router: x86-64 Linux wheels)")

from openai_contract import (  # noqa: E402  the contract's reply tests, run through the gateway
    MODEL,
    chat,
    client,  # noqa: F401  a fixture of those tests
    greedy_generate,
    test_a_stop_string_spanning_tokens_ends_the_reply_before_it,  # noqa: F401
    test_greedy_completion_is_what_transformers_generates_streamed_or_not,  # noqa: F401
    test_n_choices_with_a_seed,  # noqa: F401
    test_streamed_chat_equals_the_unstreamed_reply,  # noqa: F401
)
from server_process import TEST_SERVER_ARGS, ServerProcess, wait_until_gone  # noqa: E402

READY_TIMEOUT_S = 60
HI = [{"role": "user", "content": "hi"}]


class Gateway:
    """``smg launch`` in front of ``workers`` with ``policy``, on free ports; ``.url`` as a server's."""

    def __init__(self, workers: list[str], policy: str, log_path: Path):
        port, metrics_port = free_port(), free_port()
        self.url, self.metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        command = [str(Path(sys.executable).parent / "smg"), "launch", "--worker-urls", *workers, "--policy", policy,
                   "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
                   "--prometheus-port", str(metrics_port), "--log-level", "warn",
                   "--health-check-interval-secs", "1", "--health-failure-threshold", "1"]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_for_healthy_workers(len(workers))
        except AssertionError:
            self.stop()
            raise

    def healthy_workers(self) -> int:
        try:
            return httpx.get(self.url + "/readiness", timeout=5).json()["healthy_workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return -1

    def wait_for_healthy_workers(self, count: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.healthy_workers() != count:
            assert self.process.poll() is None, f"the gateway exited:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"the gateway never saw {count} healthy workers"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # still registering its workers, it may not act on SIGTERM yet
            self.process.kill()
            self.process.wait(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workers(start_server, tiny_chat_model) -> list[ServerProcess]:
    args = ("--model-path", str(tiny_chat_model), "--served-model-name", MODEL)
    with ThreadPoolExecutor(2) as pool:  # they load side by side
        return list(pool.map(lambda _: start_server(*args), range(2)))


@pytest.fixture(scope="module")
def gateways(workers, tmp_path_factory):
    folder, started = tmp_path_factory.mktemp("gateways"), {}
    try:
        for policy in ("round_robin", "cache_aware", "power_of_two"):
            started[policy] = Gateway([w.url for w in workers], policy, folder / f"{policy}.log")
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


@pytest.fixture(scope="module")
def server(gateways):
    """The contract's tests go through the round-robin gateway: consecutive requests reach different workers,
    which must answer alike (a reply and its streamed copy, two seeded samplings)."""
    return gateways["round_robin"]


@pytest.fixture(scope="module")
def greedy(tiny_chat_model):
    """The contract's oracle on the workers' model: transformers' greedy ``generate`` in float32."""
    return greedy_generate(tiny_chat_model)


def post(url: str, path: str, body: dict, status: int = 200):
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def prompt_tokens(worker: ServerProcess) -> int:
    """Prompt tokens the worker has taken in so far (its scheduler's count)."""
    return httpx.get(worker.url + "/state").json()["prompt_tokens"]


# ---------------------------------------------------------------- what the gateway sends, straight to a worker

# The bodies the gateway forwards for a bare request (recorded from sglang-router 0.3.2): SGLang's fields, set
# to their defaults, whether the client sent them or not.
FORWARDED = [
    ("/v1/chat/completions", {"messages": HI, "model": MODEL, "logprobs": False, "max_completion_tokens": 2,
                              "stream": False, "no_stop_trim": False, "ignore_eos": False,
                              "continue_final_message": False, "skip_special_tokens": True,
                              "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": False, "echo": False,
                         "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                         "return_hidden_states": False}),
    ("/generate", {"text": "hi", "model": None, "sampling_params": {"max_new_tokens": 2},
                   "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                   "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
                   "return_entropy": False}),
]


@pytest.mark.parametrize("path, body", FORWARDED)
def test_what_the_gateway_forwards_is_accepted(workers, path, body):
    reply = post(workers[0].url, path, body)
    assert (reply["usage"] if "usage" in reply else reply["meta_info"])["completion_tokens"] == 2


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
    ("/v1/completions", {"return_hidden_states": True}, "return_hidden_states"),
    ("/generate", {"log_metrics": False}, "log_metrics"),
    ("/generate", {"no_logs": True}, "no_logs"),
    ("/generate", {"return_entropy": True}, "return_entropy"),
])
def test_sglang_fields_are_refused_past_their_neutral_value(workers, path, extra, param):
    prompt = {"/v1/chat/completions": {"messages": HI}, "/v1/completions": {"prompt": "hi"},
              "/generate": {"text": "hi"}}[path]
    error = post(workers[0].url, path, prompt | extra, 400)["error"]
    assert error["param"] == param and "not supported" in error["message"]


def test_reasoning_fields_leave_the_text_whole_at_either_value(workers):
    """SGLang separates reasoning only with a reasoning parser, which this server has not."""
    body = {"messages": HI, "max_tokens": 6, "temperature": 0}
    whole = post(workers[0].url, "/v1/chat/completions", body)["choices"][0]["message"]
    for value in (True, False):
        flags = {"separate_reasoning": value, "stream_reasoning": value}
        assert post(workers[0].url, "/v1/chat/completions", body | flags)["choices"][0]["message"] == whole


def test_generate_takes_a_model_only_if_it_is_the_served_one(workers):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    assert post(workers[0].url, "/generate", body | {"model": MODEL})["meta_info"]["completion_tokens"] == 2
    error = post(workers[0].url, "/generate", body | {"model": "gpt-17"}, 404)["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_no_stop_trim_keeps_the_matched_stop_string(workers, gateways):
    """Straight to a worker and through the gateway, which forwards the field: the text ends with the stop
    string (and nothing of what the same token decoded to after it), whole or streamed, in a chat and in
    /generate."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16,
            "temperature": 0}
    text = post(workers[0].url, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    stop = text[6:10]
    kept, trimmed = text[: text.index(stop) + len(stop)], text[: text.index(stop)]
    for url in (workers[0].url, gateways["round_robin"].url):
        choice = post(url, "/v1/chat/completions", body | {"stop": [stop], "no_stop_trim": True})["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"], choice["matched_stop"]) == (kept, "stop", stop)
        assert post(url, "/v1/chat/completions", body | {"stop": [stop]})["choices"][0]["message"]["content"] == trimmed
        streamed = streamed_chat(url, body | {"stop": [stop], "no_stop_trim": True})
        assert streamed == kept
    generate = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    text = post(workers[0].url, "/generate", generate)["text"]
    stop = text[6:10]
    generate["sampling_params"] |= {"stop": stop, "no_stop_trim": True}
    out = post(workers[0].url, "/generate", generate)
    assert out["text"] == text[: text.index(stop) + len(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def streamed_chat(url: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_model_and_server_info_answer_under_sglangs_newer_names_too(workers):
    url = workers[0].url
    assert httpx.get(url + "/model_info").json() == httpx.get(url + "/get_model_info").json()
    info = httpx.get(url + "/server_info").json()
    assert info["served_model_name"] == MODEL and info["dp_size"] == 1  # a gateway reads dp_size


def test_get_load_counts_the_running_requests_and_their_tokens(workers):
    """SGLang's shape, which the gateway's power_of_two policy reads: one entry per data-parallel rank."""
    url = workers[1].url
    assert httpx.get(url + "/get_load").json() == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0,
                                                    "num_tokens": 0}]
    body = {"model": MODEL, "messages": HI, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                load = httpx.get(url + "/get_load").json()  # still connected: the request is running
                break
    assert load[0]["num_reqs"] == 1 and load[0]["num_waiting_reqs"] == 0 and load[0]["num_tokens"] > 0


# ---------------------------------------------------------------- through the gateway


def test_requests_through_the_gateway_answer_as_a_worker_does(workers, gateways):
    url = gateways["cache_aware"].url
    body = {"text": "The sky is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    out, own = post(url, "/generate", body), post(workers[0].url, "/generate", body)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4} and out["text"] == own["text"]
    events = httpx.post(url + "/generate", json=body | {"stream": True}, timeout=60).text.split("\n\n")
    streamed = [json.loads(event[6:]) for event in events if event.startswith("data: {")]
    assert streamed[-1]["text"] == out["text"]  # the text so far, as SGLang streams it
    assert [m.id for m in openai_client(gateways["cache_aware"]).models.list()] == [MODEL]
    # A worker's refusal reaches the client as the worker sent it: OpenAI's shape, naming the field.
    body = {"model": MODEL, "messages": HI, "logit_bias": {"999999": 1}}  # past the vocabulary: the worker says no
    error = post(url, "/v1/chat/completions", body, 400)["error"]
    assert error["param"] == "logit_bias"


def test_cache_aware_keeps_a_shared_prefix_on_one_worker_and_round_robin_spreads(workers, gateways):
    prefix = "You are a helpful assistant who answers in one short sentence. " * 6
    for policy, suffix in (("cache_aware", "Hello!"), ("round_robin", "Hi there!")):
        before = [prompt_tokens(w) for w in workers]
        replies = [chat(openai_client(gateways[policy]), prefix + f"{suffix} ({i})", max_tokens=2, temperature=0)
                   for i in range(4)]
        took = [prompt_tokens(w) - b for w, b in zip(workers, before)]
        total = sum(r.usage.prompt_tokens for r in replies)
        if policy == "cache_aware":  # all on one worker, whose prefix cache serves every request after the first
            assert sorted(took) == [0, total], took
            assert all(r.usage.prompt_tokens_details.cached_tokens >= 64 for r in replies[1:])
        else:  # in turn: two each
            assert took == [total // 2, total // 2], took


def openai_client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_gateways_health_load_and_metrics_endpoints_answer(gateways):
    gateway = gateways["power_of_two"]
    assert httpx.get(gateway.url + "/health").status_code == 200
    assert httpx.get(gateway.url + "/readiness").json()["healthy_workers"] == 2
    # The gateway reads each worker's /get_load (-1 where it could not).
    loads = httpx.get(gateway.url + "/get_loads").json()["workers"]
    assert len(loads) == 2 and all(entry["load"] == 0 for entry in loads)
    assert chat(openai_client(gateway), "Say hi.", max_tokens=2).usage.completion_tokens == 2
    metrics = httpx.get(gateway.metrics_url).text
    assert 'smg_http_requests_total{method="POST",path="/v1/chat/completions"}' in metrics


def test_a_dead_worker_leaves_the_rotation_and_the_other_serves_every_request(workers, gateways):
    """Runs last of the tests that use the workers: it kills one."""
    gateway, (alive, dead) = gateways["round_robin"], workers
    dead.process.kill()  # its API server, at once (its children follow it)
    through = openai_client(gateway)
    # Until its next health check the gateway may still pick it: it then retries the request on the other.
    assert all(chat(through, f"Count to {i}.", max_tokens=2).usage.completion_tokens == 2 for i in range(4))
    gateway.wait_for_healthy_workers(1)
    before = prompt_tokens(alive)
    replies = [chat(through, f"Name a color ({i}).", max_tokens=2) for i in range(4)]
    assert prompt_tokens(alive) - before == sum(r.usage.prompt_tokens for r in replies)


# ---------------------------------------------------------------- --dp-size


def test_dp_size_serves_behind_the_gateway_and_sigterm_ends_every_process(request, tiny_chat_model):
    server = ServerProcess(request.config.minisgl_root, *TEST_SERVER_ARGS, "--model-path", str(tiny_chat_model),
                           "--dp-size", "2", "--router-policy", "round_robin", ready_timeout=180)
    try:
        out = post(server.url, "/v1/completions", {"model": tiny_chat_model.name, "prompt": "hi", "max_tokens": 2})
        assert out["usage"]["completion_tokens"] == 2
        tree = server.descendants()
        assert len(tree) >= 2 * 3 + 1, tree  # each replica's API server, scheduler and detokenizer; the gateway
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0, server.log_tail()
        assert wait_until_gone(tree) == [], "processes left behind"
    finally:
        server.stop()
