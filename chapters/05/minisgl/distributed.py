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
messages are small Python objects, and NCCL moves only GPU tensors.

At TP size 1 nothing is initialised and every helper returns its input: chapter 03's single process
runs this code unchanged.
"""

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
HEARTBEAT_S = 0.5


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
    _control_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    threading.Thread(target=heartbeat, args=(rank,), name="minisgl-heartbeat", daemon=True).start()
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


def heartbeat(rank: int, every_s: float = HEARTBEAT_S) -> None:
    """Count up ``beat/RANK`` in the store, forever, from a thread of its own: a rank blocked in a
    collective still beats (the collective waits without the GIL), a dead one does not."""
    while True:
        try:
            _store.add(f"beat/{rank}", 1)
        except Exception:  # the store, which lives in rank 0, is gone: nothing left to tell
            return
        time.sleep(every_s)


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
    if dist.is_initialized():
        dist.destroy_process_group()
