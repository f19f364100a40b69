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
            except Exception as error:
                scheduler.fail_all(error)
                output = scheduler.flush_outputs()
            # Before the tokens leave: a client that has seen them must not read the state from before this step.
            counts[:] = [len(scheduler.running), len(scheduler.waiting), scheduler.slots.num_free, slots]
            if output is not None:
                to_detokenizer.send(encode(output))
# --8<-- [end:run-scheduler]
