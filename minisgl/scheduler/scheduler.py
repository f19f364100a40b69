"""The scheduler loop: continuous batching (introduced in chapter 02).

The scheduler keeps three collections (four in the complete server, below) and runs one step at a time:

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

The complete server (the epilogue, after chapter 06) adds constrained requests: each has a grammar,
compiled on arrival (``start_grammar``; on a thread of its own, with the request in a fourth collection,
``compiling``, until it is ready), whose matcher the engine's mask reads and ``append_token`` advances.
It also reports log probabilities, and drops every unused cached prefix on ``FlushCache``.
"""

import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ..core import Batch, Request, TokenLogprobs
from ..engine import Engine
from ..grammar import GrammarError, Grammars
from ..messages import (
    AbortRequest,
    BatchTokenOutput,
    FlushCache,
    NewRequestInfo,
    TokenizeError,
    UserRequest,
    pack_ids,
    unpack_ids,
)
from .pages import PageAllocator, pages_for
from .radix import CACHE_TYPES

logger = logging.getLogger(__name__)

# The most prompt tokens a step runs of a request that wants its prompt's log probabilities: each gives a row
# of logits of the whole vocabulary (512 x 49,152 float32 values: 100 MB).
PROMPT_LOGPROBS_CHUNK = 512


class Scheduler:
    def __init__(self, engine: Engine, max_running_requests: int, chunked_prefill_size: int, eos_ids: set[int],
                 cache_type: str = "radix", grammars: Grammars | None = None, compile_in_background: bool = False):
        """``grammars`` compiles the constraints of constrained requests (None: such requests are refused),
        on a thread of its own if ``compile_in_background`` (one rank only: see ``start_grammar``)."""
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
        self.grammars = grammars
        self.compile_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar") if compile_in_background else None
        self.compiling: list[tuple[Request, Future]] = []  # constrained requests whose grammar is not ready yet
        self.outputs: list[tuple[Request, int, str | None]] = []  # this step's (request, token, finish)
        self.logprobs: dict[str, TokenLogprobs] = {}  # uid -> this step's log probabilities, for those that asked
        self.matched_eos: dict[str, int] = {}  # uid -> the EOS token that stopped it, this step
        self.refused: list[TokenizeError] = []  # requests refused on arrival, this step
        self._last_log = time.monotonic()

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything: someone waits, is being prefilled or runs (or waits for its grammar)."""
        return bool(self.waiting or self.prefilling or self.running or self.compiling)

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
    def handle(self, message: UserRequest | AbortRequest | FlushCache) -> None:
        """Take one incoming message into the scheduler's state."""
        # --8<-- [start:ex-handle]
        if isinstance(message, UserRequest):
            if self.early_aborts.pop(message.uid, 1) is None:
                return  # aborted before it arrived
            request = Request(message.uid, unpack_ids(message.prompt_ids), message.params)
            if request.params.constraint is not None:
                self.start_grammar(request)  # it waits once its grammar is ready
            else:
                self.waiting.append(request)
        elif isinstance(message, FlushCache):
            self.flush_cache()
        elif not self.abort_now(message.uid):
            self.early_aborts[message.uid] = None
            while len(self.early_aborts) > 10_000:  # most are for requests that had already finished
                self.early_aborts.popitem(last=False)
        # --8<-- [end:ex-handle]
    # --8<-- [end:handle]

    # --8<-- [start:start-grammar]
    def start_grammar(self, request: Request) -> None:
        """Compile a constrained request's constraint (once per distinct constraint), then let it wait.

        A large JSON schema can take seconds to compile. On one rank that happens on a thread of its own,
        and the running requests go on stepping meanwhile; ``grammars_ready`` moves the request to the
        waiting queue when its grammar is done. Under tensor parallelism it happens here, at once: every
        rank must admit the same requests at the same step, and a thread finishes at a different moment
        on each rank.
        """
        if self.grammars is None:
            self.refuse(request, GrammarError("this server runs no grammar engine"))
            return
        self.compiling.append((request, self.grammars.compile_later(request.params.constraint, self.compile_pool)))
        self.grammars_ready()

    def grammars_ready(self) -> None:
        """Move every constrained request whose grammar is compiled to the waiting queue (or refuse it)."""
        for request, compiled in [(r, c) for r, c in self.compiling if c.done()]:
            self.compiling.remove((request, compiled))
            self.grammars.pending.pop(tuple(request.params.constraint), None)
            try:
                request.grammar = self.grammars.matcher(request.params.constraint, compiled.result())
            except Exception as error:  # GrammarError, or anything else the grammar engine raised
                self.refuse(request, error)
            else:
                self.waiting.append(request)

    def refuse(self, request: Request, error: Exception) -> None:
        """Answer a constrained request with a 400 (through the detokenizer) instead of running it."""
        logger.info("request %s refused: %s", request.uid, error)
        message = str(error) if isinstance(error, GrammarError) else f"the constraint failed to compile: {error}"
        self.refused.append(TokenizeError(request.uid, message, constraint_param(request.params.constraint[0])))
    # --8<-- [end:start-grammar]

    def flush_cache(self) -> None:
        """Evict every cached prefix that no request holds (``POST /flush_cache``)."""
        freed = self.cache.evict(self.cache.evictable_pages)
        logger.info("cache flushed: %d pages freed, %d still in use", freed, self.cache.cached_pages)

    # --8<-- [start:step]
    def step(self) -> BatchTokenOutput | None:
        """One forward pass: a token for every running request and the next prompt chunks of the requests
        being prefilled. Returns what happened to every request it touched, as one message (None: idle)."""
        if self.compiling:
            self.wait_for_grammars()
        self.prefilling += self.admit()
        decoding = list(self.running)  # a copy: finishing a request removes it from running
        chunks = self.prefill_chunks()
        batch = decoding + [request for request, _ in chunks]
        if batch:
            new_lens = [1] * len(decoding) + [size for _, size in chunks]
            next_tokens, logprobs, prompt_logprobs = self.engine.step(Batch(batch, new_lens))
            self.steps["mixed" if decoding and chunks else "decode" if decoding else "prefill"] += 1
            for request, new, token, token_logprobs, read in zip(batch, new_lens, next_tokens, logprobs,
                                                                  prompt_logprobs):
                request.cached_len += new  # its new tokens' keys and values are in its pages now
                request.prompt_logprobs += read
                if request in self.prefilling:
                    self.prefill_done(request, finished=token is not None)
                if token_logprobs is not None:
                    self.logprobs[request.uid] = token_logprobs
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
            if request.params.prompt_logprobs:  # each of its tokens brings a row of logits: bound the step's
                left = min(left, PROMPT_LOGPROBS_CHUNK)
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
            # A request that wants its prompt's log probabilities runs its whole prompt, so it matches no cached
            # prefix (whose tokens would never run, so never be scored); the root it holds locks nothing.
            prefix, node = ([], self.cache.root) if request.params.prompt_logprobs else \
                self.cache.match_prefix(request.prompt_ids)
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
        if request.grammar is not None and not request.grammar.accept_token(token):
            # Only at a dead end of the grammar, where the mask left the row free: end this request alone.
            logger.warning("request %s: its grammar allows no next token; ending it", request.uid)
            self.finish(request, "error")
            return
        if token in self.eos_ids and (not params.ignore_eos or request.grammar is not None):
            self.matched_eos[request.uid] = token
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

    def wait_for_grammars(self) -> None:
        """Take the grammars that are ready; with nothing else to run, first wait a little for one (rather
        than spin, with the compiling thread, on the same cores)."""
        if not (self.waiting or self.prefilling or self.running):
            wait([compiled for _, compiled in self.compiling], timeout=0.01, return_when=FIRST_COMPLETED)
        self.grammars_ready()

    def abort_now(self, uid: str) -> bool:
        for request, compiled in self.compiling:
            if request.uid == uid:
                self.compiling.remove((request, compiled))
                if not any(other is compiled for _, other in self.compiling):  # nobody else waits for it
                    compiled.cancel()  # (a compile already running finishes; its grammar is then dropped)
                    self.grammars.pending.pop(tuple(request.params.constraint), None)
                self.finish(request, "abort")
                return True
        for request in [*self.running, *self.prefilling, *self.waiting]:
            if request.uid == uid:
                logger.info("request %s aborted after %d tokens", uid, len(request.output_ids))
                self.finish(request, "abort")
                return True
        return False

    def fail_all(self, error: Exception) -> None:
        """After a failed step (a bug, a device error): end every request with an error, keep serving."""
        in_flight = [*self.running, *self.prefilling, *self.waiting, *(r for r, _ in self.compiling)]
        self.compiling = []
        logger.exception("step failed; failing %d requests", len(in_flight))
        for request in in_flight:
            self.finish(request, "error")

    # --8<-- [start:flush-outputs]
    def flush_outputs(self) -> BatchTokenOutput | None:
        """Everything this step did, as one message; each request's stop strings and prompt length go
        along the first time it appears, so the detokenizer knows them before its first token."""
        # --8<-- [start:ex-step-message]
        if not self.outputs and not self.refused:
            return None
        new = list({id(r): r for r, _, _ in self.outputs if not r.announced}.values())  # once each
        for request in new:
            request.announced = True
        message = BatchTokenOutput(
            uids=[r.uid for r, _, _ in self.outputs],
            token_ids=pack_ids([token for _, token, _ in self.outputs]),
            finish_reasons=[finish for _, _, finish in self.outputs],
            new_requests=[NewRequestInfo(r.uid, len(r.prompt_ids), r.params.stop, r.prefix_len,
                                         r.prompt_ids[0] if r.params.prompt_logprobs else None, r.prompt_logprobs)
                          for r in new],
            # a token's log probabilities go with it (an EOS token is not part of the reply: the detokenizer drops them)
            logprobs=[self.logprobs.get(r.uid) for r, _, _ in self.outputs] if self.logprobs else [],
            matched_eos=self.matched_eos,
            refused=self.refused,
        )
        self.outputs, self.logprobs, self.matched_eos, self.refused = [], {}, {}, []
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


def constraint_param(kind: str) -> str:
    """The request field a constraint of this kind came from, for the client's error message."""
    return {"json_object": "response_format", "json_schema": "response_format"}.get(kind, kind)
