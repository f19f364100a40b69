"""The scheduler process (introduced in chapter 03): the model, the KV cache and the loop, behind two sockets.

With tensor parallelism there is one such process per rank, each with a shard of the model. Only
rank 0 talks to the rest of the server: it receives requests and aborts from the tokenizers, and it
sends each step's tokens to the detokenizer. The other ranks hear about requests from rank 0 alone.
"""

import dataclasses
import logging
import random
import traceback

import msgspec
import torch
import zmq

from ..args import overlap_schedule
from ..config import ServerConfig
from ..distributed import (
    broadcast_messages,
    gather_objects,
    init_distributed,
    lost_ranks,
    share_of_cores,
    shutdown,
    tp_info,
)
from ..engine import Engine
from ..engine.engine import resolve_device
from ..grammar import GrammarManager, Grammars
from ..ipc import Addresses, pull_socket, push_socket, receive_all
from ..messages import COUNTS, ToScheduler, UserRequest, decoder, encode
from ..process import become_child, scheduler_name
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

# An idle rank 0 waits this long for a message before it lets the other ranks go round their loop once
# more: none of them ever sits in a collective for long, however quiet the server is.
IDLE_POLL_MS = 100


# --8<-- [start:run-scheduler]
def run_scheduler(config: ServerConfig, addresses: Addresses, ready, counts, rank: int = 0) -> None:
    """``counts`` is a shared array the API server reads for /state (``messages.COUNTS``)."""
    args = config.args
    name = scheduler_name(rank, args.tp_size)
    become_child(name)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    try:
        device = rank_device(args.device, rank, args.tp_size // args.nnodes)
        if args.tp_size > 1:
            torch.set_num_threads(share_of_cores(args.tp_size // args.nnodes))
            init_distributed(rank, args.tp_size, args.dist_init_addr, device, args.dist_timeout)
            check_same_settings(config)
        engine = Engine(config.model_path, args.dtype, str(device), config.num_pages, args.page_size,
                        config.context_length, kv_cache_bytes=args.kv_cache_memory * 2**20,
                        attention_backend=args.attention_backend, quantization=args.quantization,
                        cuda_graph_max_bs=0 if args.disable_cuda_graph else args.cuda_graph_max_bs,
                        max_running_requests=args.max_running_requests,
                        compile_attention=args.enable_torch_compile)
        num_pages = engine.kv_cache.num_pages
        # Constraints compile on a thread of their own on one rank; under TP at once (``GrammarManager``).
        grammars = GrammarManager(Grammars(config.model_path, config.vocab_size, set(config.eos_token_ids)),
                                  in_background=args.tp_size == 1)
        scheduler = Scheduler(engine, args.max_running_requests, args.chunked_prefill_size, set(config.eos_token_ids),
                              args.cache_type, grammars, overlap=overlap_schedule(args, engine.device.type))
        inbox = to_detokenizer = None
        if rank == 0:
            context = zmq.Context()
            inbox = pull_socket(context, addresses.scheduler)
            to_detokenizer = push_socket(context, addresses.detokenizer)
    except Exception:
        ready.put((name, traceback.format_exc()))
        return
    ready.put((name, None))
    logger.info("ready on %s in %s: %d pages of %d tokens, %s cache%s", engine.device, engine.dtype, num_pages - 1,
                args.page_size, args.cache_type, ", overlap scheduling" if scheduler.forward_thread else "")
    try:
        with torch.inference_mode():
            serve_steps(scheduler, inbox, to_detokenizer, counts, args.tp_check_lockstep)
    except Exception as error:
        # A collective fails when another rank is gone; anything else is this rank's own fault. Either way
        # the server cannot go on: this process exits, and the launcher ends the whole tree at once.
        lost = lost_ranks() if args.tp_size > 1 else []
        if lost is None or lost:
            who = "rank 0 (the rendezvous it served is gone)" if lost is None else f"rank {', '.join(map(str, lost))}"
            first_line = (str(error).splitlines() or [type(error).__name__])[0]  # some errors have no message
            logger.error("rank %d of %d lost %s: %s; exiting", rank, args.tp_size, who, first_line)
        else:
            logger.exception("rank %d of %d: a step failed; exiting, the server goes down", rank, args.tp_size)
        raise SystemExit(3) from None
    finally:
        shutdown()
# --8<-- [end:run-scheduler]


# --8<-- [start:serve-steps]
def serve_steps(scheduler: Scheduler, inbox, to_detokenizer, counts, check_lockstep: bool) -> None:
    """The loop of every rank: take this step's messages (rank 0 relays them), step, and send (rank 0)."""
    tp = tp_info()
    messages = decoder(ToScheduler)
    if tp.rank == 0:
        publish_counts(scheduler, counts)
    while True:
        incoming = next_messages(inbox, messages, idle=not scheduler.has_work)
        try:
            output = scheduler.step(incoming)
        except Exception:
            # Not one request's fault (those end inside the step): a bug, or a device that failed, and the next
            # step would fail the same way. Answer every request in flight with an error, then go down.
            if tp.rank == 0:
                send_failures(scheduler, to_detokenizer)
            raise
        if check_lockstep and output is not None:
            check_same_tokens(output)
        if tp.rank == 0:
            publish_counts(scheduler, counts)  # before the tokens leave: whoever has seen them sees this state
            if output is not None:
                to_detokenizer.send(encode(output))
# --8<-- [end:serve-steps]


def send_failures(scheduler: Scheduler, to_detokenizer) -> None:
    """A step failed: end every request in flight with an error, so each client hears so before the server
    goes down (best effort: the scheduler's state may be what failed)."""
    try:
        if (output := scheduler.fail_all()) is not None:
            to_detokenizer.send(encode(output))
    except Exception:
        logger.exception("could not fail the requests in flight; the API server will")


def publish_counts(scheduler: Scheduler, counts) -> None:
    state = scheduler.state()
    counts[:] = [state[name] for name in COUNTS]


# --8<-- [start:next-messages]
def next_messages(inbox, messages, idle: bool) -> list:
    """This step's incoming messages, the same on every rank and in the same order.

    Rank 0 takes them from its socket, waiting for one only when there is nothing to run, and then at
    most IDLE_POLL_MS when there are other ranks (they wait for it in the broadcast meanwhile). It gives
    every request without a seed one, and hands the list to every rank. The others receive it. Each
    rank then admits the same requests and aborts the same ones, and so builds the same batch.
    """
    tp = tp_info()
    # --8<-- [start:ex-relay]
    incoming = None
    if tp.rank == 0:
        wait_ms = (None if tp.size == 1 else IDLE_POLL_MS) if idle else 0
        incoming = [with_seed(message) for message in receive_all(inbox, messages, timeout_ms=wait_ms)]
    return broadcast_messages(incoming)
    # --8<-- [end:ex-relay]
# --8<-- [end:next-messages]


# --8<-- [start:with-seed]
def with_seed(message):
    """A request without a seed gets one here, once, at rank 0: every rank then samples it from the
    same random stream. (Each rank drawing its own would make them pick different tokens.)"""
    if isinstance(message, UserRequest) and message.params.seed is None:
        params = dataclasses.replace(message.params, seed=random.getrandbits(63))
        return msgspec.structs.replace(message, params=params)
    return message
# --8<-- [end:with-seed]


# What every rank must agree on, or the ranks would step differently: the model, the KV cache's size,
# the scheduling limits, and the lockstep check itself (a collective that the other ranks must join).
SHARED_SETTINGS = ("context_length", "num_pages", "vocab_size", "eos_token_ids")
SHARED_ARGS = ("dtype", "quantization", "max_running_requests", "chunked_prefill_size", "page_size", "kv_cache_memory",
               "cache_type", "attention_backend", "disable_overlap_schedule", "enable_overlap_schedule",
               "tp_size", "nnodes", "tp_check_lockstep")


def check_same_settings(config: ServerConfig) -> None:
    """Refuse to start when another node was launched with settings that differ from rank 0's."""
    mine = {name: getattr(config, name) for name in SHARED_SETTINGS}
    mine |= {f"--{name.replace('_', '-')}": getattr(config.args, name) for name in SHARED_ARGS}
    rank0 = broadcast_messages([mine] if tp_info().rank == 0 else None)[0]
    differ = [f"{name} {mine[name]!r} (rank 0: {rank0[name]!r})" for name in mine if mine[name] != rank0[name]]
    if differ:
        raise ValueError(f"rank {tp_info().rank} was launched with other settings than rank 0: {', '.join(differ)}; "
                         "launch every node with the same options")


def check_same_tokens(output) -> None:
    """Debug (--tp-check-lockstep): every rank must have sampled exactly the tokens this one did.

    The tokens are Python ints on the CPU, so they travel on the control group (gloo on every backend), not
    the model's group: NCCL moves GPU tensors only, and would refuse them at the first step."""
    tokens = [out.token for out in output.outputs]
    differ = [r for r, theirs in enumerate(gather_objects(tokens)) if theirs != tokens]
    if differ:
        raise RuntimeError(f"ranks {differ} sampled other tokens than rank {tp_info().rank}: ranks left lockstep")


def rank_device(name: str, rank: int, ranks_per_node: int) -> torch.device:
    """The device of this rank: on GPUs, one per rank on this node (rank 3 of 4 per node: cuda:3)."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank % ranks_per_node)
    return device
