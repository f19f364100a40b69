"""The scheduler loop: continuous batching (introduced in chapter 02).

The scheduler keeps three collections and runs one step at a time:

- ``waiting``: requests that were submitted but have no pages yet (first come, first served);
- ``prefilling``: admitted requests whose prompt is not yet all in the cache (a long prompt is
  prefilled in chunks, one per step);
- ``running``: requests whose prompt is in the cache, each one token further along after every step.

Each step runs one forward pass that may mix both phases: one new token for every running request,
and the next chunk of prompt tokens (at most ``--chunked-prefill-size`` in all) of the requests being
prefilled, so that running requests keep streaming while a long prompt goes in. A chunk in the middle
of a prompt is never sampled. A request that finishes frees its pages at once, except those the prefix
cache keeps for later requests with the same beginning.

Memory is pages (``pages.py``) and the radix prefix cache (``radix.py``). A waiting request is admitted
when free pages, plus the cache's pages that nobody uses (which can be evicted), cover its prompt
(minus the prefix the cache already holds) and its ``max_tokens``; otherwise it waits, and so does
everyone behind it.

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
from .pages import PageAllocator, pages_for
from .radix import CACHE_TYPES

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: Engine, max_running_requests: int, chunked_prefill_size: int, eos_ids: set[int],
                 cache_type: str = "radix"):
        self.engine = engine
        self.page_size = engine.kv_cache.page_size
        self.pages = PageAllocator(engine.kv_cache.num_pages)  # which page is whose: ours to decide
        self.cache = CACHE_TYPES[cache_type](self.page_size, self.pages)
        self.max_running_requests = max_running_requests
        self.chunked_prefill_size = chunked_prefill_size
        self.eos_ids = eos_ids
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.steps = {"prefill": 0, "decode": 0, "mixed": 0}
        self.prompt_tokens = self.prefix_hits = 0  # for the hit rate: prompt tokens seen, found in the cache
        # An abort can overtake its request (they may travel through different tokenizer workers);
        # remember recent ones so that the request is dropped when it arrives.
        self.early_aborts: OrderedDict[str, None] = OrderedDict()
        self.outputs: list[tuple[Request, int, str | None]] = []  # this step's (request, token, finish)
        self._last_log = time.monotonic()

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything: someone waits, is being prefilled or runs."""
        return bool(self.waiting or self.prefilling or self.running)

    def state(self) -> dict:
        in_use = self.pages.num_total - self.pages.num_free - self.cache.cached_pages
        return {
            "running": len(self.running) + len(self.prefilling),
            "waiting": len(self.waiting),
            "free_pages": self.pages.num_free,
            "cached_pages": self.cache.cached_pages,
            "evictable_pages": self.cache.evictable_pages,
            "in_use_pages": in_use,
            "total_pages": self.pages.num_total,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.prefix_hits,
            "prefix_hit_rate": round(self.prefix_hits / self.prompt_tokens, 4) if self.prompt_tokens else 0.0,
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
        """One forward pass: a token for every running request and the next prompt chunks of the requests
        being prefilled. Returns what happened to every request it touched, as one message (None: idle)."""
        self.prefilling += self.admit()
        decoding = list(self.running)  # a copy: finishing a request removes it from running
        chunks = self.prefill_chunks()
        batch = decoding + [request for request, _ in chunks]
        if batch:
            new_lens = [1] * len(decoding) + [size for _, size in chunks]
            next_tokens = self.engine.step(Batch(batch, new_lens))
            self.steps["mixed" if decoding and chunks else "decode" if decoding else "prefill"] += 1
            for request, new, token in zip(batch, new_lens, next_tokens):
                request.cached_len += new  # its new tokens' keys and values are in its pages now
                if request in self.prefilling:
                    self.prefill_done(request, finished=token is not None)
                if token is not None:  # a chunk in the middle of a prompt gives no token
                    self.append_token(request, token)
            self.log_progress()
        return self.flush_outputs()
    # --8<-- [end:step]

    # --8<-- [start:prefill-chunks]
    def prefill_chunks(self) -> list[tuple[Request, int]]:
        """How many prompt tokens each prefilling request runs this step: oldest first, at most
        ``chunked_prefill_size`` in all (0: whole prompts, one request at least)."""
        chunks, budget = [], self.chunked_prefill_size or sum(len(r.prompt_ids) for r in self.prefilling)
        for request in self.prefilling:
            left = len(request.prompt_ids) - request.cached_len
            size = min(left, budget)
            if size <= 0:
                break
            chunks.append((request, size))
            budget -= size
        return chunks
    # --8<-- [end:prefill-chunks]

    def prefill_done(self, request: Request, finished: bool) -> None:
        """A chunk of the prompt ran: share its whole pages with the prefix cache; once the whole prompt is
        in, the request runs."""
        computed = request.prompt_ids[: request.cached_len]
        request.pages, request.node = self.cache.cache_unfinished(computed, request.pages, request.node)
        if finished:
            self.prefilling.remove(request)
            self.running.append(request)

    # --8<-- [start:admit]
    def admit(self) -> list[Request]:
        """Take waiting requests, oldest first, while the running set has room and the pages they need
        (their prompt minus its cached prefix, plus max_tokens) are free or can be evicted."""
        admitted = []
        while self.waiting and len(self.running) + len(self.prefilling) + len(admitted) < self.max_running_requests:
            request = self.waiting[0]
            prefix, node = self.cache.match_prefix(request.prompt_ids)
            self.cache.lock(node)  # before counting: its pages must not be counted as evictable
            needed = pages_for(len(request.prompt_ids) + request.params.max_tokens, self.page_size) - len(prefix)
            if needed > self.pages.num_free + self.cache.evictable_pages:
                self.cache.unlock(node)
                break  # it goes first when pages free up; never skip ahead of it
            if needed > self.pages.num_free:
                self.cache.evict(needed - self.pages.num_free)
            self.waiting.popleft()
            request.pages, request.node = prefix + self.pages.allocate(needed), node
            request.cached_len = request.prefix_len = len(prefix) * self.page_size
            request.generator = self.engine.new_generator(request.params.seed)
            self.prompt_tokens += len(request.prompt_ids)
            self.prefix_hits += request.prefix_len
            admitted.append(request)
        return admitted
    # --8<-- [end:admit]

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
        """End a request: leave whichever collection holds it, give the prefix cache what it computed,
        free the rest of its pages at once (exactly once, however it ends)."""
        request.finish_reason = reason
        for collection in (self.running, self.prefilling, self.waiting):
            if request in collection:
                collection.remove(request)
        if request.node is not None:
            computed = (request.prompt_ids + request.output_ids)[: request.cached_len]
            self.cache.cache_finished(computed, request.pages, request.node)
            request.pages, request.node = [], None
        self.outputs.append((request, token, reason))

    def abort_now(self, uid: str) -> bool:
        for request in [*self.running, *self.prefilling, *self.waiting]:
            if request.uid == uid:
                logger.info("request %s aborted after %d tokens", uid, len(request.output_ids))
                self.finish(request, "abort")
                return True
        return False

    def fail_all(self) -> None:
        """End every request in flight with an error (a step failed: the server is going down)."""
        for request in [*self.running, *self.prefilling, *self.waiting]:
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
            new_requests=[NewRequestInfo(r.uid, len(r.prompt_ids), r.params.stop, r.prefix_len) for r in new],
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
                "running %d, waiting %d, pages free %d, cached %d of %d, prefix hit rate %.2f; steps %s",
                state["running"], state["waiting"], state["free_pages"], state["cached_pages"], state["total_pages"],
                state["prefix_hit_rate"], state["steps"],
            )
