"""The scheduler process (chapter 03): the model, the KV cache and the loop, behind two sockets."""

import logging
import traceback

import torch
import zmq
from transformers import AutoTokenizer

from ..args import ServerArgs
from ..engine import Engine
from ..ipc import Addresses, pull_socket, push_socket, receive_all
from ..messages import ToScheduler, decoder, encode
from ..process import become_child
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


# --8<-- [start:run-scheduler]
def run_scheduler(args: ServerArgs, addresses: Addresses, ready, counts) -> None:
    """``counts`` is a shared array the API server reads for /state: running, waiting, free slots, slots."""
    name = "minisgl-scheduler"
    become_child(name)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    try:
        engine = Engine(args.model_path, args.dtype, args.device, args.max_running_requests, args.context_length)
        eos_token_id = AutoTokenizer.from_pretrained(args.model_path).eos_token_id
        eos_ids = set(engine.config.eos_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        scheduler = Scheduler(engine, args.max_running_requests, args.max_prefill_length, eos_ids)
        context = zmq.Context()
        inbox = pull_socket(context, addresses.scheduler)
        to_detokenizer = push_socket(context, addresses.detokenizer)
        messages = decoder(ToScheduler)
    except Exception:
        ready.put((name, traceback.format_exc()))
        return
    ready.put((name, None))
    logger.info("ready on %s in %s: %d slots of %d tokens", engine.device, engine.dtype, args.max_running_requests, engine.context_length)
    with torch.inference_mode():
        while True:
            idle = not scheduler.waiting and not scheduler.running
            counts[:] = [len(scheduler.running), len(scheduler.waiting), len(engine.kv_cache.free_slots), engine.kv_cache.num_slots]
            for message in receive_all(inbox, messages, timeout_ms=None if idle else 0):
                scheduler.handle(message)
            try:
                output = scheduler.step()
            except Exception as error:
                scheduler.fail_all(error)
                output = scheduler.flush_outputs()
            if output is not None:
                to_detokenizer.send(encode(output))
# --8<-- [end:run-scheduler]
