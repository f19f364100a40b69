"""``GET /metrics`` for Prometheus, and one log line per finished request (introduced in chapter 06).

An operator's questions are "how much, how fast, how full": requests and how they ended, tokens in and
out, time to first token, between tokens and to the end, requests running and waiting, KV cache pages
(free, in the prefix cache, held by requests outside it; used by requests, and evictable), and how much of
the prompts the prefix cache held. The API server sees every request begin and end (``Frontend.generate``),
so it keeps the counters and histograms here; the scheduler's own counts (running, waiting, pages) come
from the shared array that ``/state`` reads too, and are copied into gauges when Prometheus scrapes.

The metrics are prometheus-client's, the library Python services use: counters, gauges and histograms in
a registry of this server's own (not the library's global one, so that two servers in one process, as in
the tests, count apart), written out in Prometheus' text format by ``generate_latest``. Where SGLang has
the same metric they carry its name and its ``model_name`` label (``sglang:prompt_tokens_total``,
``sglang:time_to_first_token_seconds``...), so that dashboards made for SGLang read this server too. The
rest are this server's own, in the same style under its own prefix: requests by how they ended
(``minisgl:num_requests_by_outcome_total``) and the page gauges (``minisgl:kv_pages_*``).
"""

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

logger = logging.getLogger("minisgl.requests")

# Each counter and histogram would also get a `_created` series, the time it was made: no dashboard reads it,
# and it doubles the page. The switch is the library's, for the whole process.
disable_created_metrics()

# Seconds: SGLang's default bounds, so that the quantiles a dashboard estimates from them compare with an
# SGLang server's. A CPU serves a first token in tenths of a second to tens of seconds; a GPU in milliseconds.
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4,
               0.6, 0.8, 1, 2, 4, 6, 8)
E2E_BUCKETS = (*TTFT_BUCKETS, 600, 1200, 1800, 2400)

# /state's count -> its gauge. The pool is free + cached + uncached pages; the running requests use the uncached
# ones and some of the cached ones (their prefixes, locked), and the cache may evict the cached ones nobody uses.
STATE_GAUGES = {
    "running": ("sglang:num_running_reqs", "Requests in the running batch."),
    "waiting": ("sglang:num_queue_reqs", "Requests waiting to be admitted."),
    "prefix_hit_rate": ("sglang:cache_hit_rate", "Share of all prompt tokens since the start found in the prefix "
                        "cache."),
    "token_usage": ("sglang:token_usage", "Share of the KV cache requests hold (used / total pages)."),
    "free_pages": ("minisgl:kv_pages_free", "KV cache pages nobody holds."),
    "cached_pages": ("minisgl:kv_pages_cached", "KV cache pages in the prefix cache, those requests use included."),
    "evictable_pages": ("minisgl:kv_pages_evictable", "Of the cached pages, those no request uses: evicted on demand."),
    "in_use_pages": ("minisgl:kv_pages_uncached", "KV cache pages requests hold outside the prefix cache (the tokens "
                     "of no whole cached page yet, and room for max_tokens)."),
    "used_pages": ("minisgl:kv_pages_used", "KV cache pages requests hold, the cached prefixes they use included "
                   "(total - free - evictable)."),
    "total_pages": ("minisgl:kv_pages_total", "KV cache pages in the pool (free + cached + uncached)."),
}


@dataclass
class RequestRecord:
    """One request (one choice) as the API server saw it, from sending to its last output."""

    uid: str
    sent: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None


class Metrics:
    OUTCOMES = ("stop", "length", "abort", "error", "invalid", "overloaded")
    CONTENT_TYPE = CONTENT_TYPE_LATEST  # of what render returns, for the /metrics response

    def __init__(self, model_name: str = ""):
        """``model_name``: the served model's name, the label SGLang's dashboards select a server's series by."""
        self.registry = CollectorRegistry()
        self.model_name = model_name

        def series(kind, name: str, text: str, **options):
            """A metric of this registry, labelled with the model's name; its one series, picked here once."""
            return kind(name, text, ["model_name"], registry=self.registry, **options).labels(model_name)

        self.requests = series(Counter, "sglang:num_requests_total",
                               "Requests (choices) sent to the workers, however they ended.")
        self.aborted = series(Counter, "sglang:num_aborted_requests_total",
                              "Of those, requests whose client went away first.")
        self.by_outcome = Counter(
            "minisgl:num_requests_by_outcome_total", "Requests (choices) by how they ended: stop, length, abort "
            "(the client went away), error, invalid (refused as the request's own fault), overloaded (refused "
            "past --max-queued-requests, never sent).", ["model_name", "outcome"], registry=self.registry)
        for outcome in self.OUTCOMES:  # a series of 0 for each from the start, so that a dashboard sees the first
            self.by_outcome.labels(model_name, outcome)
        self.prompt_tokens = series(Counter, "sglang:prompt_tokens_total", "Prompt tokens of finished requests.")
        self.cached_tokens = series(Counter, "sglang:cached_tokens_total",
                                    "Of those, tokens found in the prefix cache.")
        self.generation_tokens = series(Counter, "sglang:generation_tokens_total",
                                        "Tokens generated for finished requests.")
        self.ttft = series(Histogram, "sglang:time_to_first_token_seconds",
                           "From a request's arrival to its first token.", buckets=TTFT_BUCKETS)
        self.itl = series(Histogram, "sglang:inter_token_latency_seconds", "Between two tokens of one request "
                          "(an output of several tokens shares its wait among them).", buckets=ITL_BUCKETS)
        self.e2e = series(Histogram, "sglang:e2e_request_latency_seconds", "From a request's arrival to its end.",
                          buckets=E2E_BUCKETS)
        self.gauges = {key: series(Gauge, name, text) for key, (name, text) in STATE_GAUGES.items()}

    def token_arrived(self, record: RequestRecord, new_tokens: int) -> None:
        """An output with ``new_tokens`` more tokens: the first sets the time to first token; a later one counts
        ``new_tokens`` inter-token gaps, its wait shared among them (as SGLang counts them)."""
        now = time.perf_counter()
        if record.first_token is None:
            record.first_token = now
            self.ttft.observe(now - record.sent)
        else:
            gap = (now - record.last_token) / new_tokens
            for _ in range(new_tokens):
                self.itl.observe(gap)
        record.last_token = now

    def overloaded(self, requests: int) -> None:
        """Requests refused at the door (``Overloaded``): never sent, so neither finished nor timed."""
        self.by_outcome.labels(self.model_name, "overloaded").inc(requests)

    def finished(self, record: RequestRecord, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0,
                 cached_tokens: int = 0) -> None:
        """Count the request's end and write its log line."""
        total = time.perf_counter() - record.sent
        self.requests.inc()
        self.by_outcome.labels(self.model_name, outcome).inc()
        if outcome == "abort":
            self.aborted.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(total)
        ttft = "-" if record.first_token is None else f"{record.first_token - record.sent:.3f}s"
        logger.info("request %s finished: %s, prompt %d tokens (%d cached), output %d tokens, ttft %s, total %.3fs",
                    record.uid, outcome, prompt_tokens, cached_tokens, completion_tokens, ttft, total)

    def render(self, state: dict) -> str:
        """The text a Prometheus server scrapes; ``state``: the scheduler's counts (``Frontend.state``), empty
        without a scheduler (then the gauges stay at 0)."""
        if state:
            state = state | {"token_usage": round(state["used_pages"] / max(state["total_pages"], 1), 4)}
        for key, gauge in self.gauges.items():
            if key in state:
                gauge.set(state[key])
        return generate_latest(self.registry).decode()
