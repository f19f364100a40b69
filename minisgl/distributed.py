"""Tensor parallelism's plumbing: the process group, our place in it, the collectives (introduced in chapter 04).

With ``--tp-size N`` the server runs N scheduler processes, the *ranks*, each holding a shard of every
layer. They are joined by ``torch.distributed``: gloo on CPU, NCCL for tensors on GPU. They meet first
at a TCP *rendezvous*, an address and port that rank 0 listens on and the others connect to
(``--dist-init-addr``), which is why the same code works for ranks on one machine or on several.

Two collectives are all the model needs:

- ``all_reduce``: every rank holds a partial sum of the same tensor; afterwards every rank holds the
  whole sum. A row-parallel layer ends with one.
- ``all_gather``: every rank holds a slice; afterwards every rank holds all slices side by side. The
  LM head ends with one, so that every rank sees the logits of the whole vocabulary.

And the schedulers need one more thing: rank 0 must hand each step's incoming messages to the other
ranks (``broadcast_messages``). On a GPU that goes through a second, gloo group on the CPU: control
messages are small Python objects, and NCCL moves only GPU tensors. (``gather_objects``, the lockstep
check's, goes the same way.)

Every rank also beats a heartbeat in the rendezvous' store and watches the others': a rank whose beat
stops for ``LOST_AFTER_S`` (killed, frozen, or on a machine that went away) is lost, and the ranks that
notice exit, which their launchers see on every node. gloo would notice a dead peer anyway (its
connection closes); NCCL waits out the whole ``--dist-timeout``, and no collective notices a frozen one.

At TP size 1 nothing is initialised and every helper returns its input: chapter 03's single process
runs this code unchanged.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPInfo:
    """Who this process is among the tensor-parallel ranks."""

    rank: int = 0
    size: int = 1


_tp = TPInfo()
_control_group = None  # the gloo group that carries the schedulers' messages
_store = None  # the rendezvous' key-value store, served by rank 0: also where every rank's heartbeat is counted
_stopping = threading.Event()  # set by shutdown(): this rank leaves, the others' silence is expected now
HEARTBEAT_S = 0.5
# A rank silent this long is lost. Generous: a false alarm takes the server down, and a rank that is busy
# still beats from its own thread; but seconds, not the minutes of --dist-timeout.
LOST_AFTER_S = 10.0
logger = logging.getLogger(__name__)


def tp_info() -> TPInfo:
    return _tp


# --8<-- [start:init-distributed]
def init_distributed(rank: int, size: int, init_addr: str, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group as ``rank`` of ``size``, through the TCP rendezvous at ``init_addr`` ("host:port").

    Blocks until every rank has joined, or raises after ``timeout_s`` seconds. A collective that waits
    longer than ``timeout_s`` raises too (the schedulers make sure an idle rank never does).
    """
    global _tp, _control_group, _store
    _tp = TPInfo(rank, size)
    if size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    host, port = init_addr.rsplit(":", 1)
    timeout = timedelta(seconds=timeout_s)
    _store = dist.TCPStore(host, int(port), size, is_master=rank == 0, timeout=timeout)
    dist.init_process_group(backend, store=_store, rank=rank, world_size=size, timeout=timeout)
    # The schedulers' messages get a gloo group of their own, on a CPU too: with overlap scheduling the model's
    # collectives (on the forward thread) and the messages (on the scheduler's) travel at the same time, and two
    # threads' collectives on one group would meet in a different order on each rank.
    _control_group = dist.new_group(backend="gloo")
    _stopping.clear()
    threading.Thread(target=heartbeat, args=(rank, size), name="minisgl-heartbeat", daemon=True).start()
# --8<-- [end:init-distributed]


def share_of_cores(ranks_on_this_machine: int) -> int:
    """The torch threads each rank should use: its share of this machine's cores (at least one).

    Every rank is a process with its own thread pool; at torch's default of one thread per core, N
    ranks on one machine would run N times as many threads as there are cores, and wait on each other.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, ranks_on_this_machine))


# --8<-- [start:collectives]
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks, in place; every rank gets the sum."""
    if _tp.size > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x``, side by side along ``dim``, in rank order."""
    if _tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_tp.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


def broadcast_messages(messages: list | None) -> list:
    """Rank 0's ``messages`` (any picklable objects), handed to every rank; the others pass None."""
    if _tp.size == 1:
        return messages or []
    box = [messages if _tp.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]
# --8<-- [end:collectives]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (any picklable object), in rank order. On the control group, like
    ``broadcast_messages``: the schedulers' own small data lives on the CPU, which NCCL does not serve."""
    if _tp.size == 1:
        return [obj]
    gathered = [None] * _tp.size
    dist.all_gather_object(gathered, obj, group=_control_group)
    return gathered


# --8<-- [start:heartbeat]
def heartbeat(rank: int, size: int, every_s: float = HEARTBEAT_S, lost_after_s: float = LOST_AFTER_S,
              on_lost=None) -> None:
    """Count up ``beat/RANK`` in the store, and watch the other ranks' counts, until ``shutdown()``.

    Runs on a thread of its own: a rank blocked in a collective still beats (the collective waits without
    the GIL); a dead or frozen one does not. A rank whose count has not moved for ``lost_after_s`` is lost,
    and so is rank 0 when the store it serves has not answered for that long. ``on_lost`` (by default:
    log, and exit this process) gets the lost ranks. The store is read on one more thread, because a read
    from a store whose machine went silent never returns; this one only judges what that one heard.
    """
    on_lost = on_lost or exit_lost
    start = time.monotonic()
    moved = {r: (None, start) for r in range(size) if r != rank}  # rank -> (its count, when it last moved)
    answered = [start]  # when the store last answered

    def beat_and_listen():
        while not _stopping.is_set():
            try:
                _store.add(f"beat/{rank}", 1)
                for r, (last, _) in list(moved.items()):
                    if (count := _store.add(f"beat/{r}", 0)) != last:  # adding 0 reads
                        moved[r] = (count, time.monotonic())
                answered[0] = time.monotonic()
            except Exception:  # the store, in rank 0, is gone: judged below, by how long it has been silent
                pass
            _stopping.wait(every_s)

    threading.Thread(target=beat_and_listen, name="minisgl-beat", daemon=True).start()
    while not _stopping.wait(every_s):
        now = time.monotonic()
        if now - answered[0] > lost_after_s:  # no word from the store: rank 0 is gone, the others unknown
            lost = [] if rank == 0 else [0]
        else:
            lost = sorted(r for r, (_, since) in moved.items() if now - since > lost_after_s)
        if lost:
            on_lost(lost)
            return


def exit_lost(lost: list[int]) -> None:
    """A rank was lost: end this process at once. Its main thread may sit in a collective that would never
    return (NCCL waits for a dead peer, every backend for a frozen one), so nothing gentler would do."""
    logger.error("rank %d of %d lost rank %s: no heartbeat for %.0f s; exiting", _tp.rank, _tp.size,
                 ", ".join(map(str, lost)), LOST_AFTER_S)
    os._exit(3)
# --8<-- [end:heartbeat]


def lost_ranks() -> list[int] | None:
    """After a collective failed: which other ranks are dead, the ones whose heartbeat stopped. None if
    the store itself is gone: it lives in rank 0, so rank 0 is."""
    try:
        beats = lambda: [_store.add(f"beat/{r}", 0) for r in range(_tp.size)]  # noqa: E731  adding 0 reads
        before = beats()
        time.sleep(3 * HEARTBEAT_S)
        after = beats()
    except Exception:  # failing to reach the store means rank 0's process is gone
        return None
    return [r for r in range(_tp.size) if r != _tp.rank and after[r] == before[r]]


def shutdown() -> None:
    _stopping.set()
    if dist.is_initialized():
        dist.destroy_process_group()
