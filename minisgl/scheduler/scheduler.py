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
``AbortRequest`` come in, and each step returns what it did as one ``BatchTokenOutput``: a
``TokenOutput`` for every request it touched (its new token, why it finished if it did), which the
worker sends as it is. Nothing of a step is kept for the next one. It deals in token ids only; text is
the detokenizer's job.

The complete server (the epilogue, after chapter 06) adds constrained requests, through one seam: a
``GrammarManager`` (``grammar.py``) takes each on arrival and hands it back when its grammar is compiled;
``accept`` advances its matcher with each token, and ``mask_for`` gives the engine the batch's mask. It
also reports log probabilities, and drops every unused cached prefix on ``FlushCache``.
"""

import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..core import Batch, Request, Sampled, future_token
from ..engine import Engine
from ..grammar import GrammarManager
from ..messages import (
    DEAD_END,
    AbortRequest,
    BatchTokenOutput,
    FlushCache,
    NewRequestInfo,
    Refusal,
    TokenOutput,
    UserRequest,
    unpack_ids,
)
from .pages import PageAllocator, pages_for
from .radix import CACHE_TYPES

logger = logging.getLogger(__name__)

# The most prompt tokens a step runs, all requests together, of the requests that want their prompt's log
# probabilities: each gives a row of logits of the whole vocabulary (512 x 49,152 float32 values: 100 MB), so
# the bound is the step's, not each request's (32 requests of 512 rows each would need 3 GB, and more to score).
PROMPT_LOGPROBS_ROWS = 512


# --8<-- [start:in-flight]
@dataclass
class StepInFlight:
    """A step launched and not yet processed: its batch, where each sampled request's token goes in its
    ``output_ids`` (None for a chunk in the middle of a prompt), and the engine's results to come."""

    batch: Batch
    token_index: list[int | None]
    results: Future  # of the engine's list[Sampled]
# --8<-- [end:in-flight]


def done(value) -> Future:
    """A future that already holds ``value`` (a step run without overlap)."""
    future = Future()
    future.set_result(value)
    return future


class Scheduler:
    def __init__(self, engine: Engine, max_running_requests: int, chunked_prefill_size: int, eos_ids: set[int],
                 cache_type: str = "radix", grammars: GrammarManager | None = None, overlap: bool = False):
        """``grammars`` compiles the constraints of constrained requests (None: such requests are refused);
        ``overlap``: run each step on a forward thread and build the next one meanwhile (overlap scheduling)."""
        if max_running_requests > len(engine.future_tokens):
            raise ValueError(f"max_running_requests {max_running_requests} is more than the engine's "
                             f"{len(engine.future_tokens)} slots")
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
        self.grammars = grammars or GrammarManager(None)
        self.sampling = None  # the engine's SamplingBatch of the last step, kept while the same requests sample
        self.free_slots = list(range(max_running_requests - 1, -1, -1))  # the future-token map's rows (popped)
        self.in_flight: StepInFlight | None = None  # with overlap: the step running while the next is built
        self.forward_thread = ThreadPoolExecutor(1, "forward", engine.use_this_thread) if overlap else None
        self._last_log = time.monotonic()

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything: someone waits, is being prefilled or runs (or waits for its
        grammar), or a step's results are still to come."""
        return bool(self.waiting or self.prefilling or self.running or self.grammars.compiling
                    or self.in_flight)

    def state(self) -> dict:
        """The counts ``/state`` and ``/metrics`` show. Pages: free + cached + in use = total, where cached are
        the prefix cache's (those the running requests' prefixes lock included; ``evictable`` are the rest),
        and in use are the requests' own pages outside the cache (a partial page, room for max_tokens)."""
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
    def handle(self, message: UserRequest | AbortRequest | FlushCache) -> list[TokenOutput]:
        """Take one incoming message into the scheduler's state; what it ended (an abort) comes back."""
        if isinstance(message, UserRequest):
            if self.early_aborts.pop(message.uid, 1) is None:
                return []  # aborted before it arrived
            request = Request(message.uid, unpack_ids(message.prompt_ids), message.params)
            if request.params.constraint is not None:
                self.grammars.add(request)  # it waits once its grammar is ready
            else:
                self.waiting.append(request)
        elif isinstance(message, FlushCache):
            self.flush_cache()
        elif (aborted := self.abort_now(message.uid)) is not None:
            return [aborted]
        else:
            self.early_aborts[message.uid] = None
            while len(self.early_aborts) > 10_000:  # most are for requests that had already finished
                self.early_aborts.popitem(last=False)
        return []
    # --8<-- [end:handle]

    def flush_cache(self) -> None:
        """Evict every cached prefix that no request holds (``POST /flush_cache``)."""
        freed = self.cache.evict(self.cache.evictable_pages)
        logger.info("cache flushed: %d pages freed, %d still in use", freed, self.cache.cached_pages)

    # --8<-- [start:step]
    def step(self, incoming: list = ()) -> BatchTokenOutput | None:
        """Take this step's incoming messages, then run one forward pass: a token for every running request
        and the next prompt chunks of the requests being prefilled. Returns what happened to every request
        it touched, as one message (None: nothing did).

        With overlap, the pass is launched on the forward thread and what comes back is the *previous*
        step's results, processed while this one runs."""
        outputs = [output for message in incoming for output in self.handle(message)]
        refused = self.grammars_ready()
        if self.in_flight is not None and any(request.grammar is not None for request in self.running):
            # A constrained request's mask needs the token the running step samples: no overlap this time.
            outputs += self.process(self.in_flight)
            self.in_flight = None
        launched = self.launch()
        if self.in_flight is not None:
            outputs += self.process(self.in_flight)  # step N's results, while step N + 1 runs
        self.in_flight = launched
        if launched is not None and self.forward_thread is None:
            outputs += self.process(launched)  # no overlap: this step's own results, at once
            self.in_flight = None
        return BatchTokenOutput(outputs, refused) if outputs or refused else None
    # --8<-- [end:step]

    # --8<-- [start:launch]
    def launch(self) -> StepInFlight | None:
        """Build the next batch and start it; everything known before it runs is recorded now: its new tokens
        will be in the cache, a prompt chunk's pages are shared, and each sampled request gets a stand-in for
        its token (``core.future_token``), so that the next batch can be built before the token is known."""
        self.prefilling += self.admit()
        # A request whose last token is already on its way is done with it (max_tokens): never run it again.
        decoding = [request for request in self.running if len(request.output_ids) < request.params.max_tokens]
        chunks = self.prefill_chunks()
        requests = decoding + [request for request, _ in chunks]
        if not requests:
            return None
        batch = Batch(requests, [1] * len(decoding) + [size for _, size in chunks])
        sampling = self.sampling_for(batch)
        if self.forward_thread is not None:
            results = self.forward_thread.submit(self.engine.step, batch, sampling)
        else:
            results = done(self.engine.step(batch, sampling))
        self.steps["mixed" if decoding and chunks else "decode" if decoding else "prefill"] += 1
        token_index = []
        for request, new, sampled in zip(batch.requests, batch.new_lens, batch.sample, strict=True):
            request.cached_len += new  # its new tokens' keys and values are in its pages once the step has run
            if request in self.prefilling:
                self.prefill_done(request, finished=sampled)
            token_index.append(len(request.output_ids) if sampled else None)
            if sampled:  # a chunk in the middle of a prompt gives no token
                request.output_ids.append(future_token(request.slot))
        return StepInFlight(batch, token_index, results)
    # --8<-- [end:launch]

    # --8<-- [start:process]
    def process(self, step: StepInFlight) -> list[TokenOutput]:
        """A step's results, once they are there: each sampled token takes its stand-in's place, and decides
        whether its request is done. A request that ended while the step ran (its end of sequence one step
        back, an abort) gets nothing: its token would be one too many."""
        outputs = []
        results = step.results.result()  # (with overlap: waits for the forward thread to finish the step)
        for request, index, result in zip(step.batch.requests, step.token_index, results, strict=True):
            if request.finish_reason is not None:
                continue
            request.prompt_logprobs += result.prompt_logprobs
            if index is not None:
                request.output_ids[index] = result.token
                outputs.append(self.append_token(request, result, index))
        self.log_progress()
        return outputs
    # --8<-- [end:process]

    def sampling_for(self, batch: Batch):
        """The engine's sampling tensors for the batch's sampled requests: the last step's, if the same
        requests sample again (every decode step but the ones where someone joins or leaves)."""
        sampled = [request for request, wanted in zip(batch.requests, batch.sample) if wanted]
        if self.sampling is None or self.sampling.uids != tuple(request.uid for request in sampled):
            self.sampling = self.engine.sampling_batch(sampled, self.grammars.mask_for(sampled))
        return self.sampling

    def grammars_ready(self) -> list[Refusal]:
        """Constrained requests whose grammar is compiled join the waiting queue; those whose constraint does
        not compile are refused (the API server answers 400, naming the field by the constraint's kind)."""
        if not self.grammars.compiling:
            return []
        ready, failed = self.grammars.ready(idle=not (self.waiting or self.prefilling or self.running))
        self.waiting += ready
        for request, why in failed:
            logger.info("request %s refused: %s", request.uid, why)
        return [Refusal(request.uid, why, request.params.constraint[0]) for request, why in failed]

    # --8<-- [start:prefill-chunks]
    def prefill_chunks(self) -> list[tuple[Request, int]]:
        """How many prompt tokens each prefilling request runs this step: oldest first, at most
        ``chunked_prefill_size`` in all (0: whole prompts, one request at least). The requests that want their
        prompt's log probabilities share ``PROMPT_LOGPROBS_ROWS`` tokens (rows of logits) a step, oldest first:
        one left without rows waits for the next step, where it is older than any that came after it."""
        chunks, budget = [], self.chunked_prefill_size or sum(len(r.prompt_ids) for r in self.prefilling)
        rows = PROMPT_LOGPROBS_ROWS
        for request in self.prefilling:
            size = min(len(request.prompt_ids) - request.cached_len, budget)
            if size <= 0:
                break
            if request.params.prompt_logprobs:  # each of its tokens from logprob_start_len on brings a row of logits
                before = max(request.params.logprob_start_len - request.cached_len, 0)  # tokens that bring none
                size = min(size, before + rows)
                if size == 0:
                    continue  # the step's rows are spent; the requests behind it that want none may still run
                rows -= max(size - before, 0)
            chunks.append((request, size))
            budget -= size
        return chunks
    # --8<-- [end:prefill-chunks]

    def prefill_done(self, request: Request, finished: bool) -> None:
        """A chunk of the prompt ran: share its whole pages with the prefix cache; once the whole prompt is
        in, the request runs."""
        computed = request.prompt_ids[: request.cached_len]
        request.pages, request.node = self.cache.cache_unfinished(computed, request.pages, request.node,
                                                                  request.params.cache_salt)
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
            # A request that wants its prompt's log probabilities runs its prompt from where they start on
            # (``logprob_start_len``; echo: the whole prompt): it matches a cached prefix only up to there, since
            # cached tokens never run, so are never scored (matching nothing, the root it holds locks nothing).
            params = request.params
            matched = request.prompt_ids[: params.logprob_start_len + 1] if params.prompt_logprobs else \
                request.prompt_ids
            prefix, node = self.cache.match_prefix(matched, params.cache_salt)
            self.cache.lock(node)  # before counting: its pages must not be counted as evictable
            needed = pages_for(len(request.prompt_ids) + request.params.max_tokens, self.page_size) - len(prefix)
            if needed > self.pages.num_free + self.cache.evictable_pages:
                self.cache.unlock(node)
                break  # it goes first when pages free up; never skip ahead of it
            if needed > self.pages.num_free:
                self.cache.evict(needed - self.pages.num_free)
            self.waiting.popleft()
            request.pages, request.node = prefix + self.pages.allocate(needed), node
            request.slot = self.free_slots.pop()  # there is one: admitted requests are fewer than the slots
            request.cached_len = request.prefix_len = len(prefix) * self.page_size
            request.generator = self.engine.new_generator(request.params.seed)
            self.prompt_tokens += len(request.prompt_ids)
            self.prefix_hits += request.prefix_len
            admitted.append(request)
        return admitted
    # --8<-- [end:admit]

    def append_token(self, request: Request, sampled: Sampled, index: int) -> TokenOutput:
        """One sampled token, at ``index`` of the request's output ids: decide whether the request is done (stop
        strings are the detokenizer's call: it sends an abort when it sees one)."""
        params, token = request.params, sampled.token
        try:
            accepted = self.grammars.accept(request, token)
        except Exception:  # the grammar engine failed (its bug, not the client's): this request alone ends
            logger.exception("request %s: its grammar's matcher failed", request.uid)
            del request.output_ids[index:]
            return self.finish(request, "error")
        if not accepted:
            # Only at a dead end of the grammar, where the mask left the row free: the request's own constraint
            # allows no next token. It ends alone, and the client is told why (a 400, not a server error).
            logger.info("request %s: its constraint allows no next token; ending it", request.uid)
            del request.output_ids[index:]
            return self.finish(request, DEAD_END)
        if token in self.eos_ids and (not params.ignore_eos or request.grammar is not None) or \
                token in params.stop_token_ids and not params.ignore_eos:
            # the EOS token (or a stop token: SGLang's stop_token_ids, which ignore_eos ignores too, as SGLang does)
            # is not part of the reply (its log probabilities go along: the detokenizer drops them)
            del request.output_ids[index:]
            return self.finish(request, "stop", logprobs=sampled.logprobs, matched_eos=token)
        if index + 1 >= params.max_tokens:
            return self.finish(request, "length", token, sampled.logprobs)
        return self.output(request, token, None, sampled.logprobs)

    def finish(self, request: Request, reason: str, token: int = -1, logprobs=None,
               matched_eos: int | None = None) -> TokenOutput:
        """End a request: leave whichever collection holds it, give the prefix cache what it computed,
        free the rest of its pages at once (exactly once, however it ends). Returns its last output."""
        request.finish_reason = reason
        for collection in (self.running, self.prefilling, self.waiting):
            if request in collection:
                collection.remove(request)
        while request.output_ids and request.output_ids[-1] < 0:
            request.output_ids.pop()  # stand-ins of tokens still on their way (overlap): they are not its reply
        if request.slot >= 0:
            self.free_slots.append(request.slot)
            request.slot = -1
        if request.node is not None:
            computed = (request.prompt_ids + request.output_ids)[: request.cached_len]
            self.cache.cache_finished(computed, request.pages, request.node, request.params.cache_salt)
            request.pages, request.node = [], None
        return self.output(request, token, reason, logprobs, matched_eos)

    # --8<-- [start:output]
    def output(self, request: Request, token: int, finish: str | None, logprobs=None,
               matched_eos: int | None = None) -> TokenOutput:
        """What this step did to one request. The first time a request appears, its stop strings and prompt
        length go along, so the detokenizer knows them before its first token."""
        new = None
        if not request.announced:
            request.announced = True
            new = NewRequestInfo(request.uid, len(request.prompt_ids), request.params.stop, request.prefix_len,
                                 request.prompt_ids[request.params.logprob_start_len]
                                 if request.params.prompt_logprobs else None,
                                 request.prompt_logprobs, stop_regex=request.params.stop_regex)
        return TokenOutput(request.uid, token, finish, logprobs, matched_eos, new)
    # --8<-- [end:output]

    def abort_now(self, uid: str) -> TokenOutput | None:
        """End the request ``uid`` if it is here (its last output), else None."""
        if (request := self.grammars.abort(uid)) is not None:
            return self.finish(request, "abort")
        for request in [*self.running, *self.prefilling, *self.waiting]:
            if request.uid == uid:
                logger.info("request %s aborted after %d tokens", uid, len(request.output_ids))
                return self.finish(request, "abort")
        return None

    def fail_all(self) -> BatchTokenOutput | None:
        """End every request in flight with an error (a step failed: the server is going down)."""
        self.in_flight = None  # its results, if they ever come, are for requests that end here
        in_flight = [*self.running, *self.prefilling, *self.waiting, *self.grammars.drop_all()]
        outputs = [self.finish(request, "error") for request in in_flight]
        return BatchTokenOutput(outputs) if outputs else None

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
