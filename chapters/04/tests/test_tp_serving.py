"""Serving with several ranks: lockstep, two nodes on one machine, dead ranks, and bad configurations.

Every server here runs with ``--tp-check-lockstep``: after each step the ranks all-gather the tokens
they sampled and stop if any differs, so "the server is still serving" also means "the ranks agreed".
"""

import concurrent.futures
import os
import random
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ranks import free_port
from server_process import TEST_SERVER_ARGS, ServerProcess, descendants, is_alive, wait_until_gone
from streams import ended_with_error_events, open_streams

MODEL = "SmolLM2-135M-Instruct"


def chat(url: str, content: str, timeout: float = 120, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=timeout)


def process_names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            names.append(open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode())
        except OSError:
            pass
    return names


# ------------------------------------------------------------------------------------------- lockstep


@pytest.mark.ranks(3)
def test_every_rank_samples_the_same_tokens_under_a_mixed_workload(server):
    # Seeded and unseeded sampling, greedy, streams cut short: any step where a rank sampled another token
    # than rank 0 (an unseeded request drawing its own randomness on each rank, say) stops the server.
    rng = random.Random(0)

    def one(i: int):
        body = {"max_tokens": rng.randint(4, 24), "temperature": rng.choice([0, 0.7, 1.2]), "top_p": 0.9}
        if i % 3 == 0:
            body["seed"] = i
        if i % 4 == 1:  # a client that leaves mid-stream: its abort travels to every rank
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": [{"role": "user", "content": f"Story {i}"}],
                                    "stream": True, **body}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        break
            return "left"
        return chat(server.url, f"Say something about the number {i}.", **body).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert all(r in (200, "left") for r in results), results
    assert server.process.poll() is None, server.log_tail()
    assert chat(server.url, "Still there?", max_tokens=4).status_code == 200
    deadline = time.monotonic() + 30  # the aborts of the clients that left travel through every rank
    while (state := httpx.get(server.url + "/state").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state["running"] == 0 and state["waiting"] == 0 and state["free_slots"] == state["total_slots"]


@pytest.mark.ranks(3)
def test_one_scheduler_process_per_rank(server):
    names = process_names(descendants(server.pid))
    schedulers = sorted(n for n in names if n.startswith("minisgl-scheduler"))
    assert schedulers == ["minisgl-scheduler-0", "minisgl-scheduler-1", "minisgl-scheduler-2"], names


# ------------------------------------------------------------------------------------------- two nodes


def launch_node(root, model, node_rank: int, address: str, *extra, env=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "minisgl", "--model-path", str(model), "--tp-size", "4", "--nnodes", "2",
               "--node-rank", str(node_rank), "--dist-init-addr", address, *TEST_SERVER_ARGS, *extra]
    return subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture
def two_nodes(request, tiny_chat_model):
    """Node 0 (HTTP server, tokenizer, detokenizer, ranks 0-1) and node 1 (ranks 2-3) as two launches."""
    root = request.config.minisgl_root
    address = f"127.0.0.1:{free_port()}"
    node1 = launch_node(root, tiny_chat_model, 1, address, "--dist-timeout", "60", "--tp-check-lockstep")
    node0 = ServerProcess(root, "--model-path", str(tiny_chat_model), "--tp-size", "4", "--nnodes", "2",
                          "--node-rank", "0", "--dist-init-addr", address, "--dist-timeout", "60",
                          "--tp-check-lockstep", "--served-model-name", MODEL, *TEST_SERVER_ARGS)
    tree = [node1.pid, *descendants(node1.pid)]
    yield node0, node1, tree
    node0.stop()
    if node1.poll() is None:
        node1.send_signal(signal.SIGTERM)
        node1.wait(30)
    assert wait_until_gone(tree) == []


@pytest.mark.ranks(4)
def test_two_nodes_on_one_machine_serve_together(two_nodes):
    node0, node1, tree = two_nodes
    names = process_names(descendants(node0.pid)) + process_names(descendants(node1.pid))
    assert sorted(n for n in names if n.startswith("minisgl-scheduler")) == [
        f"minisgl-scheduler-{r}" for r in range(4)
    ], names
    assert not [n for n in process_names(descendants(node1.pid)) if "tokeniz" in n]  # node 1: ranks only
    for i in range(3):
        reply = chat(node0.url, f"Hello {i}", max_tokens=8, temperature=0.9)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8


@pytest.mark.ranks(4)
def test_a_rank_killed_on_the_other_node_fails_the_requests_and_stops_both(two_nodes):
    node0, node1, tree = two_nodes
    ranks = [pid for pid in descendants(node1.pid) if process_names([pid]) == ["minisgl-scheduler-3"]]
    assert ranks, process_names(descendants(node1.pid))
    node0_tree = [node0.pid, *descendants(node0.pid)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, node0.url, "A long story, please.", 60, max_tokens=400, ignore_eos=True)
        time.sleep(1.0)
        os.kill(ranks[0], signal.SIGKILL)
        reply = pending.result()
    assert reply.status_code >= 500 or reply.json()["choices"][0]["finish_reason"] == "error", reply.text
    assert node0.process.wait(30) != 0
    assert node1.wait(30) != 0
    log = "\n".join(node0.lines)
    lost = [line for line in log.splitlines() if " lost " in line]
    # Names the dead rank. Which of node 0's ranks notices first (and logs it before the tree is torn down) is
    # a race: rank 0, or rank 1 in the same collective.
    assert any(re.search(r"rank [01] of 4 lost rank 3:", line) for line in lost), lost or log[-3000:]
    assert wait_until_gone(node0_tree + tree) == []


@pytest.mark.ranks(4)
def test_a_node_launched_with_other_settings_is_refused(request, tiny_chat_model):
    root, address = request.config.minisgl_root, f"127.0.0.1:{free_port()}"
    node1 = launch_node(root, tiny_chat_model, 1, address, "--dist-timeout", "30", "--max-running-requests", "8")
    node0 = launch_node(root, tiny_chat_model, 0, address, "--dist-timeout", "30", "--port", "0")
    output1, _ = node1.communicate(timeout=120)
    node0.communicate(timeout=120)
    assert node1.returncode != 0 and node0.returncode != 0
    assert "--max-running-requests 8 (rank 0: 4)" in output1, output1[-3000:]


# ------------------------------------------------------------------------------------------- faults


@pytest.mark.ranks(3)
def test_a_dead_rank_is_named_fails_the_requests_and_ends_the_server(start_server):
    server = start_server("--tp-size", "3")
    tree = [server.pid, *descendants(server.pid)]
    rank2 = [pid for pid in tree if process_names([pid]) == ["minisgl-scheduler-2"]][0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, server.url, "A long story, please.", 60, max_tokens=400, ignore_eos=True)
        time.sleep(1.0)
        os.kill(rank2, signal.SIGKILL)
        reply = pending.result()
    assert reply.status_code >= 500 or reply.json()["choices"][0]["finish_reason"] == "error", reply.text
    assert server.process.wait(30) != 0
    log = "\n".join(server.lines)
    assert "worker process died: minisgl-scheduler-2 (exit code -9)" in log or "lost rank 2" in log, log[-3000:]
    assert wait_until_gone(tree) == []


@pytest.mark.ranks(3)
def test_sigterm_ends_every_rank(start_server):
    server = start_server("--tp-size", "3")
    tree = [server.pid, *descendants(server.pid)]
    assert len([n for n in process_names(tree) if n.startswith("minisgl-scheduler")]) == 3
    streams = open_streams(server, 2)  # in flight when the signal comes
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    assert wait_until_gone(tree) == []
    assert not any(is_alive(pid) for pid in tree)
    assert ended_with_error_events(*streams), streams[1]  # each client is told, none is cut off without a word


# ------------------------------------------------------------------------------------------- bad configurations


def run_launch(root, *args, timeout=120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "minisgl", *TEST_SERVER_ARGS, "--port", "0", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)


def test_a_tp_size_that_does_not_divide_the_heads_is_refused_naming_the_numbers(request):
    result = run_launch(request.config.minisgl_root, "--tp-size", "2")
    assert result.returncode == 2
    assert "--tp-size 2 does not divide the model's 9 attention heads" in result.stderr and "(1, 3)" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--nnodes", "2", "--node-rank", "2", "--tp-size", "2", "--dist-init-addr", "127.0.0.1:1"],
     "--node-rank 2 is out of range: with --nnodes 2 it is 0 .. 1"),
    (["--nnodes", "2", "--tp-size", "3", "--dist-init-addr", "127.0.0.1:1"],
     "--tp-size 3 does not split evenly over --nnodes 2"),
    (["--nnodes", "2", "--tp-size", "2"], "--nnodes > 1 needs --dist-init-addr"),
    (["--tp-size", "3", "--dist-init-addr", "nowhere"], "--dist-init-addr must be HOST:PORT"),
])
def test_bad_node_options_are_refused(request, args, message):
    result = run_launch(request.config.minisgl_root, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.ranks(2)
def test_an_unreachable_rendezvous_fails_after_a_bounded_wait(request, tiny_chat_model):
    # Node 1 of 2 pointed at a port where nobody listens: it must give up after --dist-timeout, not hang.
    started = time.monotonic()
    result = run_launch(request.config.minisgl_root, "--model-path", str(tiny_chat_model), "--tp-size", "2",
                        "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", f"127.0.0.1:{free_port()}",
                        "--dist-timeout", "5")
    assert result.returncode != 0
    assert time.monotonic() - started < 90
    assert "failed to start" in result.stdout + result.stderr
