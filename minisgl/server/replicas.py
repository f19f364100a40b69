"""``--dp-size N``: N replicas of the server behind SGLang's Model Gateway (introduced in chapter 06).

    python -m minisgl --dp-size 2 --port 1919          # this launcher, then, each in a session of its own:
      python -m minisgl --port P0 ...                  # replica 0: a whole server, the other options alike
      python -m minisgl --port P1 ...                  # replica 1
      smg launch --worker-urls ... --port 1919         # the gateway, which the clients talk to

Data parallelism is the simplest way to serve more: N copies of everything, each with its own KV cache
and batches, and something in front that sends each request to one of them. SGLang builds no router into
its engine; it ships one, the Model Gateway (``pip install sglang-router``, a Rust program), which talks
to each replica over the endpoints every SGLang server has: the OpenAI ones, ``/generate``, ``/health``,
``/get_server_info``, ``/get_model_info``, ``/get_load``. This server has them too, so this module only
starts the processes and watches them. The gateway's policy (``--router-policy``) picks the replica:
``cache_aware``, the default, remembers which prompts went where and sends a request to the replica that
saw the longest beginning of its prompt, whose prefix cache likely still holds it (unless the replicas'
loads drift too far apart); ``round_robin`` takes them in turn.

The replicas listen on 127.0.0.1 (only the gateway faces clients), on free ports, and log to files in
one folder, the gateway's log too, so that this terminal shows the launcher's lines alone. Start-up
waits until every replica answers ``/health`` and the gateway counts all of them healthy, then prints
where it serves. Any process that exits, or Ctrl-C or SIGTERM, stops them all; the launcher exits
non-zero if one failed (and keeps the logs).

Replicas on several machines need no launcher: each machine runs ``python -m minisgl --host 0.0.0.0
--port P`` and one of them ``smg launch --worker-urls http://m1:P http://m2:P --policy cache_aware``.
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ..args import ServerArgs, to_argv

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 600  # a replica loads its model; as launch.py allows its workers
STOP_GRACE_S = 15.0  # a replica ends its requests and stops its own children first
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the processes are local: no proxy


def serve_replicas(args: ServerArgs) -> int:
    """Run ``args.dp_size`` replicas and the gateway until Ctrl-C or SIGTERM (0) or the end of any of them (1)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    logs = Path(tempfile.mkdtemp(prefix="minisgl-dp-"))
    processes: dict[str, subprocess.Popen] = {}  # by name, which is also its log's: replica-0, ..., gateway
    try:
        start_and_watch(args, logs, processes, stop)
    except RuntimeError as error:
        logger.error("%s\nstopping every replica and the gateway (logs kept in %s)", error, logs)
        return 1
    finally:
        stop_all(processes)
    shutil.rmtree(logs, ignore_errors=True)
    logger.info("stopped")
    return 0


def start_and_watch(args: ServerArgs, logs: Path, processes: dict, stop: threading.Event) -> None:
    """Start the replicas, then the gateway, and watch them; return once stopped, raise if one fails."""
    ports = [free_port() for _ in range(args.dp_size)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for i, port in enumerate(ports):
        processes[f"replica-{i}"] = start(replica_command(args, port), logs / f"replica-{i}.log")
        logger.info("replica %d: %s, logging to %s", i, urls[i], logs / f"replica-{i}.log")
    if not wait_until(lambda: all(answers(url + "/health") for url in urls), processes, stop):
        return
    port, metrics_port = args.port or free_port(), free_port()
    processes["gateway"] = start(gateway_command(args, urls, port, metrics_port), logs / "gateway.log")
    gateway = f"http://{args.host}:{port}"
    if not wait_until(lambda: healthy_replicas(gateway) == len(urls), processes, stop):
        return
    model = get_json(urls[0] + "/get_model_info", args.api_key)["served_model_name"]
    logger.info("gateway: policy %s, metrics on http://%s:%d/metrics, logging to %s", args.router_policy, args.host,
                metrics_port, logs / "gateway.log")
    # The only line that says " at http://", as a single server's: scripts and tests read the URL from it.
    logger.info("serving %s at %s", model, gateway)
    if (ended := first_to_exit(processes, stop)) is not None:
        tail = "\n".join((logs / f"{ended}.log").read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{ended} exited (exit code {processes[ended].returncode}); the end of its log:\n{tail}")


def replica_command(args: ServerArgs, port: int) -> list[str]:
    """A whole server with the launcher's options, but on its own local port, and alone."""
    replica = dataclasses.replace(args, host="127.0.0.1", port=port, dp_size=1, router_policy=ServerArgs.router_policy)
    return [sys.executable, "-m", "minisgl", *to_argv(replica)]


def gateway_command(args: ServerArgs, urls: list[str], port: int, metrics_port: int) -> list[str]:
    """``smg launch`` (the same program, run by this interpreter): with ``--api-key`` it wants the key from
    clients and sends it to the replicas."""
    level = {"warning": "warn"}.get(args.log_level, args.log_level)
    command = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls,
               "--policy", args.router_policy, "--host", args.host, "--port", str(port),
               "--prometheus-host", args.host, "--prometheus-port", str(metrics_port), "--log-level", level]
    return command + (["--api-key", args.api_key] if args.api_key else [])


def start(command: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: Ctrl-C in the terminal reaches the launcher alone, which then stops each
    # process in turn (and, if need be, its whole group: a replica's scheduler and detokenizer too).
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_until(ready, processes: dict, stop: threading.Event) -> bool:
    """Wait until ``ready()``; False if Ctrl-C or SIGTERM came first. A process that exits meanwhile, or a
    start-up past ``READY_TIMEOUT_S``, is a failure."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if (ended := first_to_exit(processes, stop, timeout_s=0.5)) is not None:
            raise RuntimeError(f"{ended} exited during start-up (exit code {processes[ended].returncode})")
        if stop.is_set():
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {READY_TIMEOUT_S}s")
    return True


def first_to_exit(processes: dict, stop: threading.Event, timeout_s: float = float("inf")) -> str | None:
    """The name of a process that exited, or None once Ctrl-C or SIGTERM came (or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                return name
        stop.wait(0.1)
    return None


def stop_all(processes: dict) -> None:
    """SIGTERM to each (the gateway first: no new requests), then SIGKILL to the group of any still there."""
    for process in reversed(processes.values()):
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes.values():
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of its session is left: no orphans
        except ProcessLookupError:
            pass


def answers(url: str) -> bool:
    try:
        with NO_PROXY.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # not listening yet, or not serving yet
        return False


def healthy_replicas(gateway: str) -> int:
    """How many replicas the gateway has registered and found healthy (its readiness probe says)."""
    try:
        return get_json(gateway + "/readiness").get("healthy_workers", 0)
    except (OSError, ValueError):
        return 0


def get_json(url: str, api_key: str = ""):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with NO_PROXY.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
