"""The types the server's processes share: sampling parameters, a request, a batch (introduced in chapter 03).

This is the contract between the scheduler, which decides *what* runs, and the engine, which runs it:

- ``SamplingParams``: how a request wants its tokens chosen; it travels in messages from the API
  server to the scheduler;
- ``Request``: one request as the scheduler tracks it (its tokens, its page table, its state);
- ``Batch``: what one forward pass runs, in plain Python lists; the engine turns it into tensors;
- ``Sampled``: what the engine's step gives back for each request of the batch.

The module imports no torch, on purpose: the API server and the tokenizer processes use these types
too, and a process that never runs the model should not pay for loading torch (hundreds of MB).
"""

from dataclasses import dataclass, field
from typing import Any

# The KV cache's pages (chapter 05), named here because the scheduler, the engine and the start-up config
# all count them, and this module is the one they share without importing torch.
SPARE_PAGE = 0  # never handed out: padding points here (``scheduler/pages.py``)


def pages_for(num_tokens: int, page_size: int) -> int:
    """How many pages hold ``num_tokens`` tokens (the last one may be partly empty)."""
    return -(-num_tokens // page_size)


# --8<-- [start:future-token]
def future_token(slot: int) -> int:
    """The stand-in for a token that a step still running will sample (chapter 06's overlap scheduling): a
    negative id, -1 - the request's slot. The scheduler puts it in the request's output at once; the engine
    replaces it, on the device, with what its future-token map holds at that slot when the next step runs."""
    return -1 - slot
# --8<-- [end:future-token]


class InvalidParam(ValueError):
    """A request's value is out of range; ``param`` names the field, for the client's error message."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


MAX_TOP_LOGPROBS = 20  # as OpenAI allows
# One sampled token's log probability, and the (id, log probability) of the likeliest tokens, best first.
TokenLogprobs = tuple[float, list[tuple[int, float]]]


# --8<-- [start:sampling-params]
@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit
    seed: int | None = None
    max_tokens: int | None = 256  # None: whatever the context leaves room for (the tokenizer decides)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # The complete server's OpenAI surface (the epilogue, after chapter 06):
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log probability and the k likeliest
    prompt_logprobs: bool = False  # the same for every prompt token but the first (completions' echo)
    # With prompt_logprobs: the first prompt position reported (SGLang's logprob_start_len; echo: 0). Its own log
    # probability is None, as the first token's: positions before it never run for a score. -1: the last prompt
    # token (the tokenizer resolves it, once it knows the prompt's length).
    logprob_start_len: int = 0
    # A constraint on the reply's text, compiled into a grammar by the scheduler (``grammar.py``):
    # ("json_object", ""), ("json_schema", schema as JSON text), ("regex", pattern) or ("ebnf", grammar).
    constraint: tuple[str, str] | None = None
    # Penalties on the tokens the request has generated so far, as SGLang defines them (``sampling.py``):
    frequency_penalty: float = 0.0  # in [-2, 2]: minus penalty x the token's count from its logit
    presence_penalty: float = 0.0  # in [-2, 2]: minus penalty from the logit of every token seen at least once
    repetition_penalty: float = 1.0  # in (0, 2]: a seen token's logit / it if positive, x it if negative
    min_p: float = 0.0  # in [0, 1]: a drawn token is at least min_p times as likely as the likeliest
    # More ways to end a reply, as SGLang defines them: token ids that end it as EOS does (ignore_eos ignores them
    # too; the scheduler checks them), and regular expressions searched in its text as stop strings are (the
    # detokenizer matches them; SGLang's stop_regex).
    stop_token_ids: list[int] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    cache_salt: str | None = None  # the prefix cache's tenant: no page is shared with another salt, or none

    @property
    def penalized(self) -> bool:
        """Whether the request's sampling needs the counts of its generated tokens (the engine keeps them)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1

    def __post_init__(self):
        # Each error names the field of this class. An HTTP API that calls a field something else (chat's
        # top_logprobs, /generate's max_new_tokens) bounds it in its own schema (``server/protocol.py``), so
        # that a client's error names the field it sent.
        if not 0 <= self.temperature < float("inf"):  # NaN fails too
            raise InvalidParam("temperature", f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidParam("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidParam("top_k", f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidParam("max_tokens", f"max_tokens must be > 0, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParam("logprobs", f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.logprob_start_len < -1:
            message = f"logprob_start_len must be -1 or >= 0, got {self.logprob_start_len}"
            raise InvalidParam("logprob_start_len", message)
        for token, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                raise InvalidParam("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for {token}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidParam(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise InvalidParam("repetition_penalty", "repetition_penalty must be in (0, 2] (1: no penalty), "
                                                     f"got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise InvalidParam("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if any(token < 0 for token in self.stop_token_ids):  # the tokenizer checks them against the vocabulary
            raise InvalidParam("stop_token_ids", f"stop_token_ids must be token ids (>= 0), got {self.stop_token_ids}")
# --8<-- [end:sampling-params]


# --8<-- [start:request]
@dataclass(eq=False)
class Request:
    """A request is data: its prompt, its sampling parameters, what it has generated so far, and where
    it stands (waiting, prefilling, running, finished) and where its keys and values are (its pages)."""

    uid: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # its page table: position p lives in page pages[p // page_size]
    cached_len: int = 0  # how many of prompt + output have keys and values in the cache
    prefix_len: int = 0  # how many prompt tokens it found in the prefix cache (reported as cached_tokens)
    node: Any = None  # the prefix cache's node it holds locked, while admitted
    finish_reason: str | None = None
    generator: Any = None  # its own random stream (a torch.Generator), made by the engine on admission
    announced: bool = False  # has the detokenizer been told about it (stop strings, prompt length)?
    grammar: Any = None  # its grammar's matcher, when its params carry a constraint (``grammar.py``)
    prompt_logprobs: list = field(default_factory=list)  # (token, TokenLogprobs) of its prompt, if asked for
    slot: int = -1  # its row in the engine's future-token map while admitted (chapter 06's overlap), else -1

    def uncached_ids(self) -> list[int]:
        """The tokens the next forward pass must run: the whole prompt at first, then the last sampled token."""
        prompt_len = len(self.prompt_ids)
        if self.cached_len < prompt_len:
            return self.prompt_ids[self.cached_len :] + self.output_ids
        return self.output_ids[self.cached_len - prompt_len :]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
# --8<-- [end:request]


# --8<-- [start:batch]
@dataclass
class Batch:
    """What one forward pass runs, as the scheduler decided it.

    Requests have different lengths. Rather than padding them to a rectangle, a batch lays every new
    token of every request end to end ("ragged" or "packed"): the linear layers, which treat each
    token on its own, then run on one [tokens, hidden] matrix with no wasted rows. Only attention
    needs to know which tokens belong together, and it reads that from ``new_lens`` and ``seq_lens``.

    One batch may mix both phases: a running request brings one new token (its last sampled one), a
    request being prefilled brings the next chunk of its prompt (``new_lens`` says how many tokens each
    runs). A request is sampled only when its chunk reaches the end of its tokens (``sample``): a chunk
    in the middle of a prompt gives no token, since what follows it is already known.
    """

    requests: list[Request]
    new_lens: list[int]  # how many new tokens each request runs in this pass
    input_ids: list[int] = field(init=False)  # the new tokens of every request, end to end
    positions: list[int] = field(init=False)  # each new token's position in its own sequence
    seq_lens: list[int] = field(init=False)  # each request's length in the cache once this batch has run
    sample: list[bool] = field(init=False)  # whether this pass gives the request its next token
    # Chapter 06: each request's page table and slot as they were when the batch was built. With overlap the
    # batch runs while the scheduler goes on changing its requests (a request that ends gives its pages back),
    # so the engine reads the batch, never the requests' live state.
    page_tables: list[list[int]] = field(init=False)
    slots: list[int] = field(init=False)

    def __post_init__(self):
        self.input_ids, self.positions, self.seq_lens, self.sample = [], [], [], []
        self.page_tables = [request.pages for request in self.requests]  # never changed in place, only replaced
        self.slots = [request.slot for request in self.requests]
        for request, new in zip(self.requests, self.new_lens, strict=True):
            self.input_ids += request.uncached_ids()[:new]
            self.positions += range(request.cached_len, request.cached_len + new)
            self.seq_lens.append(request.cached_len + new)
            self.sample.append(request.cached_len + new == request.seq_len)
# --8<-- [end:batch]


# --8<-- [start:sampled]
@dataclass
class Sampled:
    """What the engine's step gives one request of a batch (chapter 06): its next token (None for a chunk in
    the middle of a prompt), and the log probabilities it asked for, of that token and of the prompt tokens
    this step read (the epilogue's ``logprobs`` and ``echo``)."""

    token: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
# --8<-- [end:sampled]
