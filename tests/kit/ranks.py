"""Run a function in N tensor-parallel ranks on this machine, for tests (introduced in chapter 04).

``run_ranks(n, target, *args)`` starts n processes (the ``spawn`` start method: a fresh interpreter, no
copy of the test process's state), joins them into one process group through a TCP rendezvous on a
free port of 127.0.0.1 (gloo, on the CPU), calls ``target(*args)`` in each, and returns the n results
in rank order. ``target`` must be importable by name (a module-level function), and its arguments and
result picklable.

A rank that raises fails the call with its traceback, and the other ranks are killed at once: they may
be waiting in a collective for the rank that failed, and would otherwise wait until the timeout.

Which ``minisgl`` a rank imports is the test process's: the chapter's ``conftest.py`` puts the chapter's
snapshot first on ``sys.path``, and the child gets the parent's ``sys.path`` before it imports anything
(``multiprocessing``'s spawn passes it along; ``_rank_main`` sets it again, so the rule is stated here).
This module imports neither torch nor ``minisgl`` until a rank runs.
"""

import multiprocessing
import pickle
import queue
import socket
import sys
import time
import traceback


class RankError(RuntimeError):
    """A rank raised: the message carries its rank and its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, address: str, path: list[str], results, target, args) -> None:
    sys.path[:] = path  # the parent's, snapshot first: the same minisgl as the test's
    try:
        import torch

        from minisgl.distributed import init_distributed, share_of_cores, shutdown

        torch.set_num_threads(share_of_cores(size))  # n ranks share this machine's cores
        init_distributed(rank, size, address, torch.device("cpu"), timeout_s=120)
        try:
            result = target(*args)
        finally:
            shutdown()
        # Pickled here, by value: through the queue torch would pass tensors as shared memory, which
        # is gone once this process has exited.
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(n: int, target, *args, timeout: float = 120.0) -> list:
    """``target(*args)`` in each of n ranks; their results in rank order."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    address = f"127.0.0.1:{free_port()}"
    ranks = [
        context.Process(target=_rank_main, args=(r, n, address, list(sys.path), results, target, args), daemon=True)
        for r in range(n)
    ]
    for process in ranks:
        process.start()
    done: dict[int, object] = {}
    deadline, last_dead = time.monotonic() + timeout, []
    try:
        while len(done) < n:
            try:
                rank, ok, payload = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(ranks) if r not in done and not p.is_alive()]
                if dead and dead == last_dead:  # dead for a whole wait without a word (killed, or crashed in C)
                    raise RankError(f"rank {dead[0]} of {n} exited with code {ranks[dead[0]].exitcode}") from None
                last_dead = dead  # a result may still be on its way: look once more before calling it lost
                if time.monotonic() > deadline:
                    waiting = sorted(set(range(n)) - set(done))
                    raise TimeoutError(f"ranks {waiting} of {n} gave no result within {timeout:.0f} s") from None
                continue
            if not ok:
                raise RankError(f"rank {rank} of {n} failed:\n{payload}")
            done[rank] = pickle.loads(payload)
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
        for process in ranks:
            process.join()
        results.close()
    return [done[r] for r in range(n)]
