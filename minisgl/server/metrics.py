"""``GET /metrics`` in Prometheus' text format, and one log line per finished request (introduced in chapter 06).

An operator's questions are "how much, how fast, how full": requests by how they ended, tokens in and
out, time to first token and between tokens, requests running and waiting, KV cache pages (free, in the
prefix cache, held by requests outside it; used by requests, and evictable), and how much of the prompts
the prefix cache held. The API server sees every request begin and end (``Frontend.generate``), so it
keeps the counters and histograms here; the scheduler's own counts (running, waiting, pages) come from the
shared array that ``/state`` reads too.

Prometheus' text format is a few lines per metric (``# HELP``, ``# TYPE``, then ``name{labels} value``);
a histogram is cumulative buckets ``_bucket{le="..."}`` plus ``_sum`` and ``_count``. Written by hand
here: it is short, and it shows what a scraper reads.
"""

import bisect
import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("minisgl.requests")

# Seconds. A CPU serves a first token in tenths of a second to tens of seconds; a GPU in milliseconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        cumulative, out = 0, []
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


@dataclass
class RequestRecord:
    """One request (one choice) as the API server saw it, from sending to its last output."""

    uid: str
    sent: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None


class Metrics:
    OUTCOMES = ("stop", "length", "abort", "error", "invalid", "overloaded")

    def __init__(self):
        self.requests = dict.fromkeys(self.OUTCOMES, 0)
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def token_arrived(self, record: RequestRecord) -> None:
        """An output with new tokens: the first sets TTFT, each later one an inter-token gap."""
        now = time.perf_counter()
        if record.first_token is None:
            record.first_token = now
            self.ttft.observe(now - record.sent)
        else:
            self.itl.observe(now - record.last_token)
        record.last_token = now

    def finished(self, record: RequestRecord, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0,
                 cached_tokens: int = 0) -> None:
        """Count the request's end and write its log line."""
        self.requests[outcome] = self.requests.get(outcome, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached_tokens
        ttft = "-" if record.first_token is None else f"{record.first_token - record.sent:.3f}s"
        logger.info("request %s finished: %s, prompt %d tokens (%d cached), output %d tokens, ttft %s, total %.3fs",
                    record.uid, outcome, prompt_tokens, cached_tokens, completion_tokens, ttft,
                    time.perf_counter() - record.sent)

    def render(self, state: dict) -> str:
        """The text a Prometheus server scrapes; ``state``: the scheduler's counts (``Frontend.state``)."""
        lines = ["# HELP minisgl_requests_total Requests (choices) by how they ended.",
                 "# TYPE minisgl_requests_total counter"]
        lines += [f'minisgl_requests_total{{outcome="{o}"}} {n}' for o, n in self.requests.items()]
        for name, value, text in (
            ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
            ("cached_prompt_tokens_total", self.cached_tokens, "Of those, tokens found in the prefix cache."),
            ("generation_tokens_total", self.completion_tokens, "Tokens generated for finished requests."),
        ):
            lines += [f"# HELP minisgl_{name} {text}", f"# TYPE minisgl_{name} counter", f"minisgl_{name} {value}"]
        for name, histogram, text in (
            ("time_to_first_token_seconds", self.ttft, "From a request's arrival to its first token."),
            ("inter_token_latency_seconds", self.itl, "Between two outputs of one streaming request."),
        ):
            lines += [f"# HELP minisgl_{name} {text}", f"# TYPE minisgl_{name} histogram",
                      *histogram.lines(f"minisgl_{name}")]
        gauges = {
            "running_requests": ("running", "Requests in the running batch."),
            "waiting_requests": ("waiting", "Requests waiting to be admitted."),
            # The pool is free + cached + uncached pages; the running requests use the uncached ones and some of the
            # cached ones (their prefixes, locked), and the cache may evict the cached ones nobody uses.
            "kv_pages_free": ("free_pages", "KV cache pages nobody holds."),
            "kv_pages_cached": ("cached_pages", "KV cache pages in the prefix cache, those requests use included."),
            "kv_pages_evictable": ("evictable_pages", "Of the cached pages, those no request uses: evicted on demand."),
            "kv_pages_uncached": ("in_use_pages", "KV cache pages requests hold outside the prefix cache (the tokens "
                                  "of no whole cached page yet, and room for max_tokens)."),
            "kv_pages_used": ("used_pages", "KV cache pages requests hold, the cached prefixes they use included "
                              "(total - free - evictable)."),
            "kv_pages_total": ("total_pages", "KV cache pages in the pool (free + cached + uncached)."),
            "prefix_hit_rate": ("prefix_hit_rate", "Share of all prompt tokens found in the prefix cache."),
        }
        for name, (key, text) in gauges.items():
            if key in state:
                lines += [f"# HELP minisgl_{name} {text}", f"# TYPE minisgl_{name} gauge",
                          f"minisgl_{name} {state[key]}"]
        return "\n".join(lines) + "\n"
