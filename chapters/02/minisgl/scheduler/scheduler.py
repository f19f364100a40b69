"""The scheduler loop: continuous batching in one process (introduced in chapter 02).

``generate`` in chapter 01 ran one request from start to end. A server cannot: requests arrive while
others are halfway through, and each wants a different number of tokens. The scheduler keeps two
collections and runs one step at a time:

- ``waiting``: requests that were submitted but have no KV cache slot yet (first come, first served);
- ``running``: requests with a slot, each one token further along after every decode step.

Each step either **prefills** newly admitted requests (their whole prompts in one batch) or, when no
one is waiting for admission, **decodes** one token for every running request. A request that
finishes leaves the running set and frees its slot at once, so the next waiting request can join at
the very next step: the batch stays full. This is *continuous batching*; a static batch would instead
wait for its slowest member.

The loop runs on its own thread. Other threads talk to it only through ``submit`` and ``abort``,
which put a message in the inbox; the loop alone touches the queues, the slots and the requests.
"""

import logging
import queue
import threading
import time
from collections import deque

from ..engine import Engine
from ..sampling import make_generator
from .request import Request
from .text_stream import TextStream

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, max_running_requests: int, max_prefill_length: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_running_requests = max_running_requests
        self.max_prefill_length = max_prefill_length
        self.eos_ids = set(engine.config.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.steps = {"prefill": 0, "decode": 0}
        self._last_log = time.monotonic()

    # ---- called from other threads ----

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse, before it is queued, a request that could never fit in a KV cache slot."""
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len + max_tokens > self.engine.context_length:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                f"length of {self.engine.context_length} tokens"
            )

    def submit(self, request: Request) -> None:
        self.check(len(request.prompt_ids), request.params.max_tokens)
        self.inbox.put(("add", request))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def state(self) -> dict:
        """Counts for logs, tests and the /state endpoint (read without a lock: a snapshot, possibly stale)."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "free_slots": len(self.engine.kv_cache.free_slots),
            "total_slots": self.engine.kv_cache.num_slots,
            "steps": dict(self.steps),
        }

    # ---- the loop, on the scheduler's own thread ----

    # --8<-- [start:run-forever]
    def run_forever(self, stop: threading.Event) -> None:
        logger.info("scheduler running: %d slots of %d tokens", self.max_running_requests, self.engine.context_length)
        while not stop.is_set():
            idle = not self.waiting and not self.running
            self.receive(block=idle)
            try:
                self.step()
            except Exception as error:  # a bug or a device error: fail what is in flight, keep serving
                self.fail_all(error)

    def receive(self, block: bool) -> None:
        """Move everything in the inbox into the scheduler's state; wait a little for it if idle."""
        try:
            messages = [self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()]
        except queue.Empty:
            return
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for kind, payload in messages:
            if kind == "add":
                self.waiting.append(payload)
            else:
                self.abort_now(payload)
    # --8<-- [end:run-forever]

    # --8<-- [start:step]
    def step(self) -> None:
        """One forward pass: prefill the newly admitted requests, or else decode every running one."""
        admitted = self.admit()
        self.running += admitted  # before the forward pass: if it fails, fail_all must find them
        batch = admitted or list(self.running)  # a copy: finishing a request removes it from running
        if not batch:
            return
        next_tokens = self.engine.step(batch, is_prefill=bool(admitted))
        self.steps["prefill" if admitted else "decode"] += 1
        for request, token in zip(batch, next_tokens):
            request.cached_len = request.seq_len  # everything it had is in the cache now
            self.append_token(request, token)
        self.log_progress()
    # --8<-- [end:step]

    # --8<-- [start:admit]
    def admit(self) -> list[Request]:
        """Take waiting requests, oldest first, while a slot is free, the running set has room, and the
        prefill batch stays within ``max_prefill_length`` tokens (one request is always let in)."""
        admitted, budget = [], self.max_prefill_length
        # --8<-- [start:ex-admission]
        free_slots = self.engine.kv_cache.free_slots
        while self.waiting and free_slots and len(self.running) + len(admitted) < self.max_running_requests:
            request = self.waiting[0]
            if admitted and len(request.prompt_ids) > budget:
                break  # it goes first in a later prefill; never skip ahead of it
            self.waiting.popleft()
            request.slot = self.engine.kv_cache.allocate()
            request.generator = make_generator(request.params.seed, self.engine.device)
            request.text = TextStream(self.tokenizer, request.params.stop)
            budget -= len(request.prompt_ids)
            admitted.append(request)
        # --8<-- [end:ex-admission]
        return admitted
    # --8<-- [end:admit]

    # --8<-- [start:append-token]
    def append_token(self, request: Request, token: int) -> None:
        """Record one sampled token and decide whether the request is done."""
        params = request.params
        if token in self.eos_ids and not params.ignore_eos:
            self.finish(request, "stop", request.text.flush())  # the EOS token is not part of the reply
            return
        request.output_ids.append(token)
        piece, hit_stop = request.text.add(token)
        if hit_stop:
            self.finish(request, "stop", piece, [token])
        elif len(request.output_ids) >= params.max_tokens:
            self.finish(request, "length", piece + request.text.flush(), [token])
        else:
            request.emit(piece, [token])

    def finish(self, request: Request, reason: str, text: str = "", token_ids=(), error: str | None = None) -> None:
        """End a request: leave the running set (or the queue), free the slot at once, tell the caller."""
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.slot is not None:
            self.engine.kv_cache.free(request.slot)
            request.slot = None
        request.emit(text, list(token_ids), reason, error)
    # --8<-- [end:append-token]

    def fail_all(self, error: Exception) -> None:
        logger.exception("step failed; failing %d requests", len(self.running) + len(self.waiting))
        for request in [*self.running, *self.waiting]:
            self.finish(request, "error", error=f"internal error: {error}")

    # --8<-- [start:abort]
    def abort_now(self, rid: str) -> None:
        for request in [*self.running, *self.waiting]:
            if request.rid == rid:
                logger.info("request %s aborted after %d tokens", rid, len(request.output_ids))
                self.finish(request, "abort")
    # --8<-- [end:abort]

    def log_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= 5.0:
            self._last_log = now
            state = self.state()
            logger.info(
                "running %d, waiting %d, free slots %d; %d prefill and %d decode steps so far",
                state["running"], state["waiting"], state["free_slots"], self.steps["prefill"], self.steps["decode"],
            )
