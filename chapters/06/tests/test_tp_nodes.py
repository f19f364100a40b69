"""Tensor parallelism as it runs on GPUs: the lockstep check on a default group that, like NCCL's, moves no CPU
tensor, and ranks that notice a rank on another node gone silent (the heartbeat) without waiting for
``--dist-timeout``.

gloo stands in for NCCL on this machine. NCCL refuses CPU tensors: so does a default group of gloo
registered for CUDA tensors alone (``"cuda:gloo"``). NCCL does not notice a dead peer until the timeout, and
no backend notices a frozen one: a rank stopped with SIGSTOP keeps its sockets open and stops beating.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from ranks import free_port, run_ranks
from server_process import TEST_SERVER_ARGS, ServerProcess, descendants, wait_until_gone

MODEL = "tiny-chat"


# ------------------------------------------------------------------------------------------- lockstep


def lockstep_where_the_default_group_refuses_cpu_tensors(tokens_of_rank: list[list[int]]) -> str:
    """One rank, its groups rebuilt as ``init_distributed`` builds them on GPUs: a default group that takes
    device tensors only, and the gloo control group. Returns what ``check_same_tokens`` said."""
    import torch.distributed as dist

    from minisgl import distributed
    from minisgl.distributed import tp_info
    from minisgl.scheduler.worker import check_same_tokens

    rank, size = tp_info().rank, tp_info().size
    dist.destroy_process_group()
    dist.init_process_group("cuda:gloo", store=dist.PrefixStore("like-nccl/", distributed._store), rank=rank,
                            world_size=size)
    distributed._control_group = dist.new_group(backend="gloo")
    output = SimpleNamespace(outputs=[SimpleNamespace(token=t) for t in tokens_of_rank[rank]])
    try:
        check_same_tokens(output)
    except RuntimeError as error:
        return str(error)
    return "same"


@pytest.mark.ranks(3)
def test_the_lockstep_check_gathers_on_the_control_group_not_the_model_s():
    """On the old path (an all-gather of a CPU tensor on the default group) every rank fails with "No backend
    type associated with device type cpu", as every rank on NCCL would at the first token."""
    same = run_ranks(3, lockstep_where_the_default_group_refuses_cpu_tensors, [[5, 7, 9]] * 3, timeout=120)
    assert same == ["same"] * 3
    differ = run_ranks(3, lockstep_where_the_default_group_refuses_cpu_tensors, [[5, 7], [5, 8], [5, 7]],
                       timeout=120)
    assert differ[0] == "ranks [1] sampled other tokens than rank 0: ranks left lockstep", differ
    assert differ[1] == "ranks [0, 2] sampled other tokens than rank 1: ranks left lockstep", differ


# ------------------------------------------------------------------------------------------- heartbeats


def test_a_rank_whose_heartbeat_stops_is_reported_lost_and_one_that_beats_is_not():
    import torch.distributed as dist

    from minisgl import distributed

    saved = distributed._store
    distributed._store = dist.HashStore()
    lost = []
    reported = threading.Event()
    try:
        beats = dict(every_s=0.01, lost_after_s=0.5)
        # Ranks 0 and 1 beat; rank 2 never does. Rank 1's report goes nowhere.
        other = threading.Thread(target=distributed.heartbeat, args=(1, 3), kwargs=dict(beats, on_lost=print),
                                 daemon=True)
        watcher = threading.Thread(target=distributed.heartbeat, args=(0, 3),
                                   kwargs=dict(beats, on_lost=lambda r: (lost.append(r), reported.set())), daemon=True)
        other.start()
        watcher.start()
        assert reported.wait(30), "rank 2 never beat, and nobody noticed"
        watcher.join(5)
        assert lost == [[2]]  # rank 1 beats: never named
    finally:
        distributed._stopping.set()  # what shutdown() does: the threads end
        other.join(5)
        distributed._stopping.clear()
        distributed._store = saved


class SilentStore:
    """A store on a machine that went silent: a read never returns (a TCPStore's does not, whatever its
    timeout), until the test lets it go."""

    def __init__(self):
        self.released = threading.Event()

    def add(self, key: str, amount: int) -> int:
        self.released.wait()
        raise ConnectionError("gone")


def test_a_rendezvous_that_stops_answering_means_rank_0_is_lost():
    from minisgl import distributed

    saved, store = distributed._store, SilentStore()
    distributed._store = store
    lost = []
    reported = threading.Event()
    try:
        watcher = threading.Thread(target=distributed.heartbeat, args=(2, 3),
                                   kwargs=dict(every_s=0.01, lost_after_s=0.5,
                                               on_lost=lambda r: (lost.append(r), reported.set())), daemon=True)
        watcher.start()
        assert reported.wait(30), "the store never answered, and nobody noticed"
        assert lost == [[0]]  # rank 1 was never heard either, but only rank 0's silence is known for sure
    finally:
        distributed._stopping.set()
        store.released.set()
        watcher.join(5)
        distributed._stopping.clear()
        distributed._store = saved


# ------------------------------------------------------------------------------------------- two nodes


@pytest.mark.ranks(4)
def test_a_frozen_rank_on_the_other_node_ends_both_nodes_long_before_the_dist_timeout(request, tiny_chat_model,
                                                                                         tmp_path):
    """Rank 3 on node 1 is frozen mid-stream (SIGSTOP: its sockets stay open, its heartbeat stops). The other
    ranks notice that it stopped beating and exit; node 0 fails the stream with an error and exits non-zero,
    node 1 exits non-zero too, and no process is left. Without the heartbeat's watch both would wait out
    --dist-timeout (300 s), far past the wait below."""
    root, address = request.config.minisgl_root, f"127.0.0.1:{free_port()}"
    common = ["--model-path", str(tiny_chat_model), "--tp-size", "4", "--nnodes", "2", "--dist-init-addr", address,
              "--dist-timeout", "300", *TEST_SERVER_ARGS]
    log1 = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen([sys.executable, "-m", "minisgl", *common, "--node-rank", "1"], cwd=root,
                             stdout=log1, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                             start_new_session=True)
    node0 = None
    try:
        node0 = ServerProcess(root, *common, "--node-rank", "0", "--served-model-name", MODEL, own_session=True)
        tree = [node0.pid, *descendants(node0.pid), node1.pid, *descendants(node1.pid)]
        rank3 = [pid for pid in descendants(node1.pid)
                 if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"minisgl-scheduler-3\0")]
        assert rank3, open(tmp_path / "node1.log").read()[-3000:]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "A long story, please."}],
                "max_tokens": 450, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", node0.url + "/v1/chat/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: "):]))
                    if len(events) == 2:  # tokens are flowing: every rank is in the loop
                        os.kill(rank3[0], signal.SIGSTOP)
                        frozen_at = time.monotonic()
        assert len(events) >= 2, events
        finishes = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
        assert "error" in finishes or any("error" in e for e in events), events[-3:]
        assert node0.process.wait(60) != 0
        node0_s = time.monotonic() - frozen_at
        assert node1.wait(60) != 0
        print(f"\nrank 3 frozen; node 0 exited {node0_s:.1f} s later, node 1 {time.monotonic() - frozen_at:.1f} s")
        log = "\n".join(node0.lines)
        assert "lost rank 3: no heartbeat" in log, log[-3000:]
        assert wait_until_gone(tree) == []
    finally:  # whatever is left of either tree, frozen or not, goes (each node runs in a session of its own)
        if node0 is not None:
            node0.stop()
        try:
            os.killpg(node1.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node1.wait(30)
        log1.close()
