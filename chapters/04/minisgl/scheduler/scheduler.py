"""The scheduler loop: continuous batching (introduced in chapter 02).

The scheduler keeps two collections and runs one step at a time:

- ``waiting``: requests that were submitted but have no KV cache slot yet (first come, first served);
- ``running``: requests with a slot, each one token further along after every decode step.

Each step either **prefills** newly admitted requests (their whole prompts in one batch) or, when no
one is waiting for admission, **decodes** one token for every running request. A request that
finishes leaves the running set and frees its slot at once, so the next waiting request can join at
the very next step: the batch stays full. This is *continuous batching*.

The scheduler runs in a process of its own and speaks only in messages: ``UserRequest`` and
``AbortRequest`` come in (``handle``), and every step goes out as one ``BatchTokenOutput`` holding the
new token of every request it touched. It deals in token ids only; text is the detokenizer's job.
"""

import logging
import time
from collections import OrderedDict, deque

from ..core import Batch, Request
from ..engine import Engine
from ..messages import AbortRequest, BatchTokenOutput, NewRequestInfo, UserRequest, pack_ids, unpack_ids
from .slots import SlotAllocator

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: Engine, max_running_requests: int, max_prefill_length: int, eos_ids: set[int]):
        self.engine = engine
        if engine.kv_cache.num_slots < max_running_requests:
            raise ValueError(f"the KV cache has {engine.kv_cache.num_slots} slots, fewer than {max_running_requests}")
        self.slots = SlotAllocator(max_running_requests)  # which KV cache slot is whose: ours to decide
        self.max_running_requests = max_running_requests
        self.max_prefill_length = max_prefill_length
        self.eos_ids = eos_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.steps = {"prefill": 0, "decode": 0}
        # An abort can overtake its request (they may travel through different tokenizer workers);
        # remember recent ones so that the request is dropped when it arrives.
        self.early_aborts: OrderedDict[str, None] = OrderedDict()
        self.outputs: list[tuple[Request, int, str | None]] = []  # this step's (request, token, finish)
        self._last_log = time.monotonic()

    def state(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "free_slots": self.slots.num_free,
            "total_slots": self.slots.num_slots,
            "steps": dict(self.steps),
        }

    # --8<-- [start:handle]
    def handle(self, message: UserRequest | AbortRequest) -> None:
        """Take one incoming message into the scheduler's state."""
        # --8<-- [start:ex-handle]
        if isinstance(message, UserRequest):
            if self.early_aborts.pop(message.uid, 1) is None:
                return  # aborted before it arrived
            self.waiting.append(Request(message.uid, unpack_ids(message.prompt_ids), message.params))
        elif not self.abort_now(message.uid):
            self.early_aborts[message.uid] = None
            while len(self.early_aborts) > 10_000:  # most are for requests that had already finished
                self.early_aborts.popitem(last=False)
        # --8<-- [end:ex-handle]
    # --8<-- [end:handle]

    # --8<-- [start:step]
    def step(self) -> BatchTokenOutput | None:
        """One forward pass: prefill the newly admitted requests, or else decode every running one.
        Returns what happened to every request this step touched, as one message (None: idle)."""
        admitted = self.admit()
        self.running += admitted  # before the forward pass: if it fails, fail_all must find them
        batch = admitted or list(self.running)  # a copy: finishing a request removes it from running
        if batch:
            next_tokens = self.engine.step(Batch(batch, is_prefill=bool(admitted)))
            self.steps["prefill" if admitted else "decode"] += 1
            for request, token in zip(batch, next_tokens):
                request.cached_len = request.seq_len  # everything it had is in the cache now
                self.append_token(request, token)
            self.log_progress()
        return self.flush_outputs()
    # --8<-- [end:step]

    def admit(self) -> list[Request]:
        """Take waiting requests, oldest first, while a slot is free, the running set has room, and the
        prefill batch stays within ``max_prefill_length`` tokens (one request is always let in)."""
        admitted, budget = [], self.max_prefill_length
        while self.waiting and self.slots.num_free and len(self.running) + len(admitted) < self.max_running_requests:
            request = self.waiting[0]
            if admitted and len(request.prompt_ids) > budget:
                break  # it goes first in a later prefill; never skip ahead of it
            self.waiting.popleft()
            request.slot = self.slots.allocate()
            request.generator = self.engine.new_generator(request.params.seed)
            budget -= len(request.prompt_ids)
            admitted.append(request)
        return admitted

    def append_token(self, request: Request, token: int) -> None:
        """Record one sampled token and decide whether the request is done (stop strings are the
        detokenizer's call: it sends an abort when it sees one)."""
        params = request.params
        if token in self.eos_ids and not params.ignore_eos:
            self.finish(request, "stop")  # the EOS token is not part of the reply
            return
        request.output_ids.append(token)
        if len(request.output_ids) >= params.max_tokens:
            self.finish(request, "length", token)
        else:
            self.outputs.append((request, token, None))

    def finish(self, request: Request, reason: str, token: int = -1) -> None:
        """End a request: leave the running set (or the queue) and free the slot at once."""
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.slot is not None:
            self.slots.free(request.slot)
            request.slot = None
        self.outputs.append((request, token, reason))

    def abort_now(self, uid: str) -> bool:
        for request in [*self.running, *self.waiting]:
            if request.uid == uid:
                logger.info("request %s aborted after %d tokens", uid, len(request.output_ids))
                self.finish(request, "abort")
                return True
        return False

    def fail_all(self) -> None:
        """End every request in flight with an error (a step failed: the server is going down)."""
        for request in [*self.running, *self.waiting]:
            self.finish(request, "error")

    # --8<-- [start:flush-outputs]
    def flush_outputs(self) -> BatchTokenOutput | None:
        """Everything this step did, as one message; each request's stop strings and prompt length go
        along the first time it appears, so the detokenizer knows them before its first token."""
        # --8<-- [start:ex-step-message]
        if not self.outputs:
            return None
        new = list({id(r): r for r, _, _ in self.outputs if not r.announced}.values())  # once each
        for request in new:
            request.announced = True
        message = BatchTokenOutput(
            uids=[r.uid for r, _, _ in self.outputs],
            token_ids=pack_ids([token for _, token, _ in self.outputs]),
            finish_reasons=[finish for _, _, finish in self.outputs],
            new_requests=[NewRequestInfo(r.uid, len(r.prompt_ids), r.params.stop) for r in new],
        )
        self.outputs = []
        return message
        # --8<-- [end:ex-step-message]
    # --8<-- [end:flush-outputs]

    def log_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= 5.0:
            self._last_log = now
            state = self.state()
            logger.info(
                "running %d, waiting %d, free slots %d; %d prefill and %d decode steps so far",
                state["running"], state["waiting"], state["free_slots"], self.steps["prefill"], self.steps["decode"],
            )
