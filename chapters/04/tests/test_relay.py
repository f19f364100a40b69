"""The relay of rank 0's messages to every rank (exercise ``relay``), in two real ranks joined by gloo."""

import time

import pytest

from ranks import run_ranks


def relay_in_a_rank(raw_messages: list[bytes]) -> list[tuple]:
    """One rank: rank 0 finds ``raw_messages`` in its inbox; every rank returns what ``next_messages`` gave it."""
    import zmq

    from minisgl.distributed import tp_info
    from minisgl.messages import ToScheduler, decoder
    from minisgl.scheduler.worker import next_messages

    inbox = None
    if tp_info().rank == 0:
        context = zmq.Context()
        inbox = context.socket(zmq.PULL)
        port = inbox.bind_to_random_port("tcp://127.0.0.1")
        sender = context.socket(zmq.PUSH)
        sender.connect(f"tcp://127.0.0.1:{port}")
        for raw in raw_messages:
            sender.send(raw)
        deadline = time.monotonic() + 5
        while not inbox.poll(10) and time.monotonic() < deadline:  # the first message has arrived
            pass
        time.sleep(0.2)  # and the others behind it
    got = next_messages(inbox, decoder(ToScheduler), idle=False)
    return [(type(m).__name__, m.uid, m.params.seed if hasattr(m, "params") else None) for m in got]


def described(messages: list[tuple]) -> str:
    return ", ".join(f"{kind}({uid!r}{'' if seed is None else f', seed={seed}'})" for kind, uid, seed in messages)


@pytest.mark.ranks(2)
@pytest.mark.exercise("relay", focused=True)
def test_relay_gives_every_rank_rank_0s_messages_in_order_with_seeds():
    from minisgl.core import SamplingParams
    from minisgl.messages import AbortRequest, UserRequest, encode, pack_ids

    sent = [
        UserRequest("a", pack_ids([1, 2, 3]), SamplingParams(temperature=0.7, seed=42)),
        UserRequest("b", pack_ids([4, 5]), SamplingParams(temperature=0.7)),  # no seed
        AbortRequest("a"),
        UserRequest("c", pack_ids([6]), SamplingParams()),  # greedy, no seed either
    ]
    rank0, rank1 = run_ranks(2, relay_in_a_rank, [encode(m) for m in sent], timeout=120)
    order = [uid for _, uid, _ in rank0]
    assert order == ["a", "b", "a", "c"], (
        f"rank 0 returned {described(rank0)}; its inbox held UserRequest('a'), UserRequest('b'), AbortRequest('a'), "
        "UserRequest('c'): take every message waiting in the inbox, in the order it came"
    )
    assert rank1 == rank0, (
        f"rank 0 returned {described(rank0)} but rank 1 got {described(rank1)}: every rank must get exactly "
        "rank 0's messages, in rank 0's order (rank 0 broadcasts them; the other ranks only receive)"
    )
    seeds = {uid: seed for kind, uid, seed in rank0 if kind == "UserRequest"}
    assert seeds["a"] == 42, f"request 'a' came with seed 42 and left rank 0 with seed {seeds['a']}: keep a seed"
    for uid in ("b", "c"):
        assert seeds[uid] is not None, (
            f"request {uid!r} has no seed after the relay: rank 0 must give every request without a seed one "
            "before relaying it, or each rank would draw its own random tokens and the ranks would disagree"
        )
