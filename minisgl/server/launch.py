"""Launch the server as a tree of processes (introduced in chapter 02).

    python -m minisgl                   # the API server (this process), then, as children:
      minisgl-scheduler                 # the model, the KV cache, the batching loop
      minisgl-detokenizer               # token ids -> text (and, with --num-tokenizer 0, text -> ids)
      minisgl-tokenizer-0 ... N-1       # text -> token ids

With ``--tp-size N`` there is one scheduler per rank, ``minisgl-scheduler-0 ... N-1``. Spread over
several machines (``--nnodes``), node 0 runs all of the above with its share of the ranks; every other
node runs only its ranks' schedulers, under a launcher that watches them (``serve_ranks``). With
``--dp-size N`` (chapter 06) this whole tree is one replica: ``replicas.py`` starts N of them behind SGLang's
Model Gateway.

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
import dataclasses
import logging
import multiprocessing as mp
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait

import uvicorn

from ..args import ServerArgs
from ..config import ServerConfig, resolve_config
from ..ipc import Addresses
from ..process import scheduler_name, start_child
from .app import create_app
from .frontend import COUNTS, Frontend
from .replicas import serve_replicas

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 600
LOST_RANKS_GRACE_S = 3.0


# --8<-- [start:start-workers]
def start_workers(config: ServerConfig, addresses: Addresses, counts) -> list:
    """Start every child process and wait until each says it is ready."""
    context = mp.get_context("spawn")
    ready = context.Queue()
    # Targets are named, not imported: this process must not load the scheduler's torch.
    scheduler, tokenizer = "minisgl.scheduler.worker:run_scheduler", "minisgl.tokenizer.worker:run_tokenizer_worker"
    args = config.args
    tokenizes_too = args.num_tokenizer == 0
    processes = [
        start_child(context, scheduler_name(rank, args.tp_size), scheduler, config, addresses, ready, counts, rank)
        for rank in ranks_of_this_node(args)
    ]
    if args.node_rank == 0:
        processes.append(start_child(context, "minisgl-detokenizer", tokenizer, config, addresses,
                                     "minisgl-detokenizer", tokenizes_too, True, ready))
        for i in range(args.num_tokenizer):
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


def ranks_of_this_node(args: ServerArgs) -> range:
    """The tensor-parallel ranks this node runs: its consecutive share of them."""
    per_node = args.tp_size // args.nnodes
    return range(args.node_rank * per_node, (args.node_rank + 1) * per_node)


def with_rendezvous(args: ServerArgs) -> ServerArgs:
    """On one machine, the ranks need no address from the user: a free local port will do."""
    if args.tp_size == 1 or args.dist_init_addr:
        return args
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return dataclasses.replace(args, dist_init_addr=f"127.0.0.1:{probe.getsockname()[1]}")


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
    if args.dp_size > 1:
        return serve_replicas(args)
    if args.node_rank > 0:
        return serve_ranks(args)
    config = resolve_config(with_rendezvous(args))  # every start-up fact, once; bad input fails here, clearly
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
        in_flight = args.max_running_requests + args.max_queued_requests if args.max_queued_requests else 0
        frontend = Frontend(addresses, counts, in_flight)

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

        app = create_app(frontend, config, lifespan)
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


# --8<-- [start:serve-ranks]
def serve_ranks(args: ServerArgs) -> int:
    """A node other than node 0: run this node's ranks until they end, or until Ctrl-C or SIGTERM.

    Its ranks take part in every step, but requests reach them from rank 0 through the collectives, so
    this node needs no HTTP server, tokenizer or socket of its own. If a rank dies (or rank 0's node
    goes away, which makes every collective here fail), the others follow and the launcher exits
    non-zero; Ctrl-C or SIGTERM stops the ranks and exits 0.
    """
    config = resolve_config(args)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    counts = shared_counts()  # only rank 0 writes it; unused here
    processes: list = []
    try:
        processes += start_workers(config, Addresses.in_folder(tempfile.gettempdir()), counts)
        logger.info("node %d of %d: ranks %s joined", args.node_rank, args.nnodes, list(ranks_of_this_node(args)))
        while not stop.is_set():
            ended = wait([p.sentinel for p in processes], timeout=0.2)
            if ended:
                gone = [p for p in processes if p.sentinel in ended]
                for process in gone:
                    process.join(1.0)
                dead = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in gone)
                logger.error("rank process ended: %s; stopping this node's ranks", dead)
                # The others' collectives fail now too; give them a moment to tell rank 0 they are alive
                # (distributed.lost_ranks), so that rank 0 names the rank that really died.
                wait([p.sentinel for p in processes if p not in gone], timeout=LOST_RANKS_GRACE_S)
                return 1
        return 0
    except RuntimeError as error:  # a rank failed to start (the rendezvous unreachable, say)
        logger.error("%s", error)
        return 1
    finally:
        stop_workers(processes)
# --8<-- [end:serve-ranks]


def bind(host: str, port: int) -> socket.socket:
    # Bound and listening before the workers start: a client that connects early waits in the
    # backlog instead of being refused. Port 0 picks a free port (the log line says which).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


