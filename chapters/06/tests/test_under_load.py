"""The complete server under load, faults and hostile input: every accepted request gets its reply or an
error, nothing leaks, a misbehaving client holds up no one, and a dying process takes the whole tree down
cleanly.

A tiny random model with the default model's tokenizer serves, so that hundreds of requests fit in a test's
time; the bookkeeping under test is the real server's. Counts and states are asserted, never timings
(the bounded waits only stop a test that would otherwise hang).
"""

import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from openai_contract import MODEL
from server_process import is_alive, wait_until_gone
from streams import open_streams

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the process tree from Linux's /proc")


@pytest.fixture(scope="module")
def busy(start_server, tiny_chat_model):
    return start_server("--model-path", str(tiny_chat_model), "--served-model-name", MODEL,
                        "--max-running-requests", "32")


def wait_for_idle(server, timeout: float = 60) -> dict:
    """/state once nothing runs, waits or is routed any more."""
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(server.url + "/state", timeout=30).json()
        if state["running"] == state["waiting"] == state["api_in_flight"] == 0 or time.monotonic() > deadline:
            return state


def assert_pool_whole(state: dict) -> None:
    assert state["running"] == state["waiting"] == state["api_in_flight"] == 0, state
    assert state["in_use_pages"] == 0, state  # every page is free or held by the prefix cache alone
    assert state["free_pages"] + state["cached_pages"] == state["total_pages"], state


def random_body(rng: random.Random, i: int) -> tuple[str, dict]:
    """A streamed request of a random shape: chat or completion, greedy or sampled, 1 to 24 tokens."""
    sampling = rng.choice([{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": i},
                           {"temperature": 1.2, "top_k": 20, "seed": i}, {"temperature": 0.7}])
    vocabulary = ["sea", "light", "keeper", "storm", "ship", "night"]
    words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 60)))
    body = {"model": MODEL, "max_tokens": rng.randint(1, 24), "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}
    if rng.random() < 0.5:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": words}]}
    return "/v1/completions", body | {"prompt": words}


async def stream_one(client: httpx.AsyncClient, url: str, path: str, body: dict, leave_after: int | None = None):
    """(status, events, finish reasons, usage); with ``leave_after``, disconnect after that many text events."""
    events, finishes, usage, texts = 0, [], None, 0
    async with client.stream("POST", url + path, json=body) as response:
        if response.status_code != 200:
            return response.status_code, 0, [], None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events += 1
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                finishes += [choice["finish_reason"]] if choice.get("finish_reason") else []
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    texts += 1
            if leave_after is not None and texts >= leave_after:
                return "left", events, finishes, usage
    return response.status_code, events, finishes, usage


async def storm(url: str, bodies: list[tuple[str, dict]], leave_after: list[int | None]) -> list:
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300, connect=60)) as client:
        return await asyncio.gather(*(stream_one(client, url, path, body, leave)
                                      for (path, body), leave in zip(bodies, leave_after)))


def test_256_concurrent_streams_of_mixed_settings_all_complete(busy):
    rng = random.Random(0)
    bodies = [random_body(rng, i) for i in range(256)]
    results = asyncio.run(storm(busy.url, bodies, [None] * 256))
    for (path, body), (status, events, finishes, usage) in zip(bodies, results):
        assert status == 200, (path, body)
        assert finishes == ["length"], (path, body, finishes)
        assert usage is not None and usage["completion_tokens"] == body["max_tokens"], (path, body, usage)
    assert_pool_whole(wait_for_idle(busy))


def test_a_storm_where_half_the_clients_leave_mid_stream_leaves_nothing_behind(busy):
    rng = random.Random(1)
    bodies = [random_body(rng, i) for i in range(64)]
    bodies = [(path, body | {"max_tokens": 40}) for path, body in bodies]
    leave_after = [1 if i % 2 else None for i in range(64)]
    before = {outcome: counter(busy, "minisgl:num_requests_by_outcome_total", outcome=outcome)
              for outcome in ("length", "abort")}
    requests = counter(busy, "sglang:num_requests_total")
    results = asyncio.run(storm(busy.url, bodies, leave_after))
    assert [r[0] for r in results[1::2]] == ["left"] * 32
    assert all(r[0] == 200 and r[3]["completion_tokens"] == 40 for r in results[::2])
    assert_pool_whole(wait_for_idle(busy))
    # every request counted once, as served whole or as aborted (a leaver may have been served whole first)
    ended = {outcome: counter(busy, "minisgl:num_requests_by_outcome_total", outcome=outcome) - before[outcome]
             for outcome in before}
    assert ended["length"] + ended["abort"] == 64 and ended["abort"] >= 1, ended
    assert counter(busy, "sglang:num_requests_total") - requests == 64


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_resident_memory_stays_flat_over_a_thousand_requests(busy):
    """After a warm-up (allocators grow to their working size), 1,000 more requests move the resident memory
    of the whole process tree by a few percent at most."""
    rng = random.Random(2)
    pids = [busy.pid, *busy.descendants()]

    def wave(n: int):
        bodies = [random_body(rng, i) for i in range(n)]
        bodies = [(path, body | {"max_tokens": 2}) for path, body in bodies]
        for start in range(0, n, 50):
            results = asyncio.run(storm(busy.url, bodies[start:start + 50], [None] * 50))
            assert all(r[0] == 200 for r in results)

    wave(300)
    before = rss_kib(pids)
    wave(1000)
    wait_for_idle(busy)
    after = rss_kib(pids)
    print(f"resident memory of the server's {len(pids)} processes: {before} KiB after 300 requests, {after} KiB "
          "after 1,000 more")  # shown with pytest -s
    assert after < before * 1.05, f"resident memory grew from {before} KiB to {after} KiB"


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_a_client_that_stalls_or_sends_garbage_holds_up_no_one(busy):
    stalled = raw_connection(busy.url)
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # half its headers
    trickle = raw_connection(busy.url)
    trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\": ")
    garbage = raw_connection(busy.url)
    garbage.sendall(bytes(range(256)) * 4 + b"\r\n\r\n")
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
        reply = httpx.post(busy.url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        answer = garbage.recv(4096)  # the server answers garbage with 400 and closes, or just closes
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    finally:
        for sock in (stalled, trickle, garbage):
            sock.close()
    reply = httpx.post(busy.url + "/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 2},
                       timeout=60)
    assert reply.status_code == 200


# ---- stop strings: bounded, and cheap for everyone else even at the bounds ----

STOP_AT_LIMIT = ["x" * 255 + end for end in "yz!?"]  # 4 of 256 characters: as many and as long as allowed


def only_x(tokenizer) -> dict:
    """Sampling that makes even a random model write "xxxx...": greedy, with "x" pushed far above the rest.
    Against ``STOP_AT_LIMIT`` its first 255 characters are all held back (each could begin a stop string)."""
    return {"temperature": 0, "logit_bias": {str(tokenizer.encode("x", add_special_tokens=False)[0]): 100}}


def counter(server, name: str, **labels) -> float:
    """The value of one series of /metrics (read by prometheus-client's parser), selected by its other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    samples = (sample for family in text_string_to_metric_families(text) for sample in family.samples)
    return next(sample.value for sample in samples if sample.name == name and labels.items() <= sample.labels.items())


def wait_until_running(server, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/state", timeout=30).json()["running"] < count:
        assert time.monotonic() < deadline, "the request never started running"


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", CHAT | {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stop": "x" * 257}, "stop"),
    ("/generate", {"text": "hello", "sampling_params": {"stop": ["a", "b", "c", "d", "e"]}}, "sampling_params.stop"),
    ("/generate", {"text": "hello", "sampling_params": {"stop": "é" * 257}}, "sampling_params.stop"),
])
def test_more_or_longer_stop_strings_than_allowed_get_a_400_that_names_the_limit(busy, path, body, param):
    reply = httpx.post(busy.url + path, json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert ("at most 4" if isinstance(body.get("stop", body.get("sampling_params", {}).get("stop")), list)
            else "at most 256") in error["message"]


def test_stop_strings_at_the_limit_hold_up_no_other_request(busy, tokenizer):
    hostile = CHAT | {"max_tokens": 440, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                      "stop": STOP_AT_LIMIT, **only_x(tokenizer)}
    normal = CHAT | {"max_tokens": 32, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                     "temperature": 0}

    async def both():
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=60)) as client:
            hostile_run = asyncio.ensure_future(stream_one(client, busy.url, "/v1/chat/completions", hostile))
            await asyncio.to_thread(wait_until_running, busy)
            normal_result = await stream_one(client, busy.url, "/v1/chat/completions", normal)
            hostile_running = not hostile_run.done()  # it has 440 tokens to make; the normal one, 32
            return normal_result, hostile_running, await hostile_run

    (status, _, finishes, usage), hostile_running, hostile_result = asyncio.run(both())
    assert (status, finishes, usage["completion_tokens"]) == (200, ["length"], 32)
    assert hostile_running  # the normal request was served whole while the hostile one ran beside it
    status, _, finishes, usage = hostile_result
    assert (status, finishes, usage["completion_tokens"]) == (200, ["length"], 440)
    assert_pool_whole(wait_for_idle(busy))


def test_a_client_that_leaves_while_all_its_text_is_held_back_is_aborted_at_once(busy, tokenizer):
    body = CHAT | {"max_tokens": 440, "ignore_eos": True, "stream": True, "stop": STOP_AT_LIMIT, **only_x(tokenizer)}
    aborted = counter(busy, "sglang:num_aborted_requests_total")
    generated = counter(busy, "sglang:generation_tokens_total")
    payload = json.dumps(body).encode()
    client = raw_connection(busy.url)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    wait_until_running(busy)  # generating, with not a byte of the reply sent: its first 255 tokens are held
    client.close()
    assert_pool_whole(wait_for_idle(busy))
    assert counter(busy, "sglang:num_aborted_requests_total") == aborted + 1
    # Aborted before its text was released: no output of it ever reached the API server. Had the leave been
    # noticed only when the reply started, the abort would have counted the 256 tokens that made it.
    assert counter(busy, "sglang:generation_tokens_total") == generated


ODD_CONVERSATIONS = {
    "nul characters": [{"role": "user", "content": "a\u0000b\u0000"}],
    "an escaped lone surrogate": "RAW",
    "fifty messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(49)]
    + [{"role": "user", "content": "and now?"}],
    "system only": [{"role": "system", "content": "You are terse."}],
    "an unknown role": [{"role": "wizard", "content": "abracadabra"}],
    "a tool role": [{"role": "tool", "content": "42"}],
    "content as parts": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]}],
    "an empty content": [{"role": "user", "content": ""}],
}


@pytest.mark.parametrize("case", ODD_CONVERSATIONS)
def test_odd_but_valid_json_gets_a_reply_or_an_openai_4xx_never_a_5xx(busy, case):
    if ODD_CONVERSATIONS[case] == "RAW":
        message = b'{"role": "user", "content": "x\\ud800y"}'  # a lone surrogate, escaped as JSON allows
        raw = b'{"model": "%s", "max_tokens": 3, "messages": [%s]}' % (MODEL.encode(), message)
        reply = httpx.post(busy.url + "/v1/chat/completions", content=raw,
                           headers={"content-type": "application/json"}, timeout=60)
    else:
        body = {"model": MODEL, "max_tokens": 3, "messages": ODD_CONVERSATIONS[case]}
        reply = httpx.post(busy.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code < 500, reply.text
    if reply.status_code == 200:
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(busy.url + "/health", timeout=30).status_code == 200


# The fault tests run the default model, slow enough that 4 streams of 480 tokens are still running when the
# fault comes; the tiny model would finish some of them first.


def test_sigterm_while_requests_stream_ends_every_process_within_15_s(start_server):
    server = start_server()
    children = server.descendants()
    threads, outcomes = open_streams(server, 4)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(15)
    assert wait_until_gone(children, timeout=15) == []
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)  # no stream hangs
    assert outcomes == ["error event"] * 4, outcomes  # each ended early, and its client was told


def process_named(server, name: str) -> int:
    for pid in server.descendants():
        if is_alive(pid) and Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0] == name:
            return pid
    raise AssertionError(f"no process {name} under the server")


@pytest.mark.parametrize("victim, options", [
    ("minisgl-scheduler", ()),
    ("minisgl-detokenizer", ()),
    ("minisgl-tokenizer-0", ("--num-tokenizer", "1")),
    ("minisgl-scheduler-2", ("--tp-size", "3")),  # a TP rank other than the one that talks to the others
], ids=["scheduler", "detokenizer", "tokenizer", "tp-rank"])
def test_kill_9_of_any_child_fails_the_requests_in_flight_and_exits_non_zero(start_server, victim, options):
    server = start_server(*options)
    children = server.descendants()
    threads, outcomes = open_streams(server, 4)
    os.kill(process_named(server, victim), signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes == ["error event"] * 4, outcomes
    assert server.process.wait(30) != 0
    assert wait_until_gone(children) == []  # no orphans
