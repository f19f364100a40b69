"""Launch the server as a tree of processes (introduced in chapter 02).

    python -m minisgl                   # the API server (this process), then, as children:
      minisgl-scheduler                 # the model, the KV cache, the batching loop
      minisgl-detokenizer               # token ids -> text (and, with --num-tokenizer 0, text -> ids)
      minisgl-tokenizer-0 ... N-1       # text -> token ids

Children are started with ``spawn`` (a fresh interpreter: no copy of the parent's threads, sockets or
CUDA state) and each reports on a multiprocessing queue once it is ready; the server accepts requests
only when all have. A child that fails to start stops the launch with its error.

While serving, a watchdog thread waits on the children. If one dies, the server says so, fails the
requests in flight instead of leaving them hanging, shuts down and exits non-zero. On Ctrl-C or
SIGTERM (uvicorn catches both), every request in flight ends with an error (``EndingServer``: a stream
gets an error event, not a silent cut), then the children are stopped and the socket folder is removed.
"""

import asyncio
import contextlib
import logging
import multiprocessing as mp
import queue
import shutil
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait

import uvicorn

from ..args import ServerArgs
from ..config import ServerConfig, resolve_config
from ..ipc import Addresses
from ..process import start_child
from .api import create_app
from .frontend import COUNTS, Frontend

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 600


# --8<-- [start:start-workers]
def start_workers(config: ServerConfig, addresses: Addresses, counts) -> list:
    """Start every child process and wait until each says it is ready."""
    context = mp.get_context("spawn")
    ready = context.Queue()
    # Targets are named, not imported: this process must not load the scheduler's torch.
    scheduler, tokenizer = "minisgl.scheduler.worker:run_scheduler", "minisgl.tokenizer.worker:run_tokenizer_worker"
    tokenizes_too = config.args.num_tokenizer == 0
    processes = [
        start_child(context, "minisgl-scheduler", scheduler, config, addresses, ready, counts),
        start_child(context, "minisgl-detokenizer", tokenizer, config, addresses, "minisgl-detokenizer", tokenizes_too,
                    True, ready),
    ]
    for i in range(config.args.num_tokenizer):
        name = f"minisgl-tokenizer-{i}"
        processes.append(start_child(context, name, tokenizer, config, addresses, name, True, False, ready))
    waiting, deadline = {p.name for p in processes}, time.monotonic() + READY_TIMEOUT_S
    while waiting:
        try:
            name, error = ready.get(timeout=1.0)
        except queue.Empty:  # no news: check that no one died silently (killed while loading, say)
            dead = [p for p in processes if p.name in waiting and not p.is_alive()]
            if dead:
                name, error = dead[0].name, f"exited during start-up (exit code {dead[0].exitcode})"
            elif time.monotonic() > deadline:
                name, error = ", ".join(sorted(waiting)), f"not ready after {READY_TIMEOUT_S}s"
            else:
                continue
        if error is not None:
            stop_workers(processes)
            raise RuntimeError(f"{name} failed to start:\n{error}")
        logger.info("%s is ready", name)
        waiting.discard(name)
    return processes
# --8<-- [end:start-workers]


def shared_counts():
    """The array rank 0's scheduler publishes its ``COUNTS`` in, for ``/state``: of 64-bit integers, since counts
    that only grow (the prompt tokens seen, from chapter 05 on) pass 2**31 within days of serving, where 32-bit
    ones would wrap to negative."""
    return mp.get_context("spawn").Array("q", len(COUNTS), lock=False)


def stop_workers(processes: list, grace_s: float = 3.0) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join(1.0)


# --8<-- [start:serve]
def serve(args: ServerArgs) -> int:
    """Run the server until Ctrl-C, SIGTERM or the death of a child; returns the exit code."""
    config = resolve_config(args)  # every start-up fact, once; and a bad model folder fails here, clearly
    folder = tempfile.mkdtemp(prefix="minisgl-")  # the sockets of this server, and of no other
    addresses = Addresses.in_folder(folder)
    logger.info("sockets in %s", folder)
    counts = shared_counts()  # the scheduler writes, /state reads
    processes: list = []
    crashed: list[str] = []
    stopping = threading.Event()

    def clean_up():
        stopping.set()
        stop_workers(processes)
        shutil.rmtree(folder, ignore_errors=True)

    try:
        sock = bind(args.host, args.port)
        processes += start_workers(config, addresses, counts)
        frontend = Frontend(addresses, counts)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            receiver = asyncio.create_task(frontend.receive_loop())
            loop = asyncio.get_running_loop()
            watchdog_args = (processes, stopping, crashed, loop, frontend, http)
            threading.Thread(target=watch, args=watchdog_args, daemon=True).start()
            logger.info("serving %s at http://%s:%d", config.model_name, args.host, sock.getsockname()[1])
            yield
            # Shutting down (Ctrl-C, SIGTERM or a crash). Clean up here, not after run() returns:
            # uvicorn re-raises the signal that stopped it, and SIGTERM's default action ends the
            # process on the spot.
            receiver.cancel()
            clean_up()
            logger.info("stopped")

        app = create_app(frontend, config.model_name, config.context_length, args.max_request_bytes, lifespan)
        http = EndingServer(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3), frontend)
        http.run(sockets=[sock])
    except RuntimeError as error:  # a worker failed to start
        logger.error("%s", error)
        return 1
    finally:
        clean_up()
    return 1 if crashed else 0
# --8<-- [end:serve]


class EndingServer(uvicorn.Server):
    """uvicorn's server that, on Ctrl-C or SIGTERM, first ends every request in flight with an error. uvicorn
    alone would wait for them until its graceful timeout while the workers are already gone, and a stream
    would stop without a word: now each gets an error event, and its connection closes."""

    def __init__(self, config: uvicorn.Config, frontend: Frontend):
        super().__init__(config)
        self.frontend = frontend

    def handle_exit(self, sig, frame) -> None:
        if self.frontend.failure is None:
            try:
                loop = asyncio.get_running_loop()  # a signal handler runs on the loop's thread, between steps
            except RuntimeError:
                loop = None
            if loop is not None:  # not touching the queues from inside the handler: on the loop, next
                loop.call_soon_threadsafe(self.frontend.fail_all, "the server is shutting down")
        super().handle_exit(sig, frame)


# --8<-- [start:watch]
def watch(processes, stopping: threading.Event, crashed: list, loop, frontend: Frontend, http: uvicorn.Server) -> None:
    """Wait for any child to exit; unless we are shutting down anyway, that is a crash."""
    ended = wait([p.sentinel for p in processes])
    if stopping.is_set():
        return
    gone = [p for p in processes if p.sentinel in ended]
    for process in gone:
        process.join(1.0)  # collect it, so that its exit code is known
    dead = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in gone)
    logger.error("worker process died: %s; failing requests in flight and shutting down", dead)
    crashed.append(dead)
    loop.call_soon_threadsafe(frontend.fail_all, f"a worker process died: {dead}")
    http.should_exit = True
# --8<-- [end:watch]


def bind(host: str, port: int) -> socket.socket:
    # Bound and listening before the workers start: a client that connects early waits in the
    # backlog instead of being refused. Port 0 picks a free port (the log line says which).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


