"""The process tree: named workers, a clean stop on Ctrl-C and SIGTERM (every stream in flight told with an
error event), no orphans after a crash, and two servers side by side. Pids are checked through /proc, with
bounded waits."""

import os
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest

from server_process import is_alive, wait_until_gone
from streams import ended_with_error_events, open_streams

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the process tree from Linux's /proc")

MODEL = "SmolLM2-135M-Instruct"


def socket_folder(server) -> Path:
    """The server's own socket folder, which it names in its log."""
    line = next(line for line in server.lines if "sockets in " in line)
    return Path(line.rsplit("sockets in ", 1)[1].strip())


def names(pids):
    return sorted(Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0] for pid in pids if is_alive(pid))


def test_workers_are_named(start_server):
    server = start_server("--num-tokenizer", "2")
    try:
        workers = {"minisgl-scheduler", "minisgl-detokenizer", "minisgl-tokenizer-0", "minisgl-tokenizer-1"}
        assert workers <= set(names(server.descendants()))
        body = {"model": MODEL, "prompt": "One, two,", "max_tokens": 4}
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_every_child_and_removes_the_sockets(start_server, stop_signal):
    server = start_server()
    children, sockets = server.descendants(), socket_folder(server)
    assert len(children) >= 2
    assert sorted(p.name for p in sockets.iterdir()) == ["api.ipc", "detokenizer.ipc", "scheduler.ipc", "tokenizer.ipc"]
    streams = open_streams(server, 2)  # in flight when the signal comes
    server.process.send_signal(stop_signal)
    server.process.wait(30)
    assert wait_until_gone(children) == []
    assert not sockets.exists()
    assert ended_with_error_events(*streams), streams[1]  # each client is told, none is cut off without a word


def test_a_dead_scheduler_fails_requests_in_flight_and_the_server_exits(start_server):
    server = start_server()
    children = server.descendants()
    scheduler = next(pid for pid in children if names([pid]) == ["minisgl-scheduler"])
    story = [{"role": "user", "content": "Write a long story."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 400, "ignore_eos": True}
    result = {}

    def long_request():
        result["response"] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)

    client = threading.Thread(target=long_request)
    client.start()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=120) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)  # generating
        os.kill(scheduler, signal.SIGKILL)
        rest = list(lines)
    client.join(120)
    assert any('"error"' in line for line in rest)  # the stream ends with an error, it does not hang
    assert result["response"].status_code == 500 and "died" in result["response"].json()["error"]["message"]
    assert server.process.wait(30) != 0
    assert any("worker process died" in line for line in server.lines)
    assert wait_until_gone(children) == []


def test_two_servers_run_side_by_side(start_server):
    first, second = start_server(), start_server()
    try:
        assert first.url != second.url
        for server in (first, second):
            body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 3}
            reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
    finally:
        first.stop()
        second.stop()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where --device cuda fails")
def test_a_worker_that_fails_to_start_stops_the_launch_with_its_error(request):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "minisgl", "--port", "0", "--device", "cuda"],
        cwd=request.config.minisgl_root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "minisgl-scheduler failed to start" in result.stderr and "CUDA" in result.stderr
