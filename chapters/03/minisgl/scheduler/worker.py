"""The scheduler process (introduced in chapter 03): the model, the KV cache and the loop, behind two sockets."""

import logging
import traceback

import torch
import zmq

from ..config import ServerConfig
from ..engine import Engine
from ..ipc import Addresses, pull_socket, push_socket, receive_all
from ..messages import ToScheduler, decoder, encode
from ..process import become_child
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


# --8<-- [start:run-scheduler]
def run_scheduler(config: ServerConfig, addresses: Addresses, ready, counts) -> None:
    """``counts`` is a shared array the API server reads for /state: running, waiting, free slots, slots."""
    name, args = "minisgl-scheduler", config.args
    become_child(name)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    try:
        slots = args.max_running_requests
        engine = Engine(config.model_path, args.dtype, args.device, slots, config.context_length)
        scheduler = Scheduler(engine, slots, args.max_prefill_length, set(config.eos_token_ids))
        context = zmq.Context()
        inbox = pull_socket(context, addresses.scheduler)
        to_detokenizer = push_socket(context, addresses.detokenizer)
        messages = decoder(ToScheduler)
    except Exception:
        ready.put((name, traceback.format_exc()))
        return
    ready.put((name, None))
    logger.info("ready on %s in %s: %d slots of %d tokens", engine.device, engine.dtype, slots, config.context_length)
    counts[:] = [0, 0, scheduler.slots.num_free, slots]
    with torch.inference_mode():
        while True:
            idle = not scheduler.waiting and not scheduler.running
            for message in receive_all(inbox, messages, timeout_ms=None if idle else 0):
                scheduler.handle(message)
            try:
                output = scheduler.step()
            except Exception:
                # Not one request's fault: a bug, or a device that failed, and the next step would fail the same
                # way. Answer every request in flight with an error, then exit: the launcher ends the whole tree.
                send_failures(scheduler, to_detokenizer)
                logger.exception("a step failed; exiting, the server goes down")
                raise SystemExit(3) from None
            # Before the tokens leave: a client that has seen them must not read the state from before this step.
            counts[:] = [len(scheduler.running), len(scheduler.waiting), scheduler.slots.num_free, slots]
            if output is not None:
                to_detokenizer.send(encode(output))
# --8<-- [end:run-scheduler]


def send_failures(scheduler: Scheduler, to_detokenizer) -> None:
    """A step failed: end every request in flight with an error, so each client hears so before the server
    goes down (best effort: the scheduler's state may be what failed)."""
    try:
        scheduler.fail_all()
        if (output := scheduler.flush_outputs()) is not None:
            to_detokenizer.send(encode(output))
    except Exception:
        logger.exception("could not fail the requests in flight; the API server will")
