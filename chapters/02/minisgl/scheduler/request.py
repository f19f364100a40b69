"""A request and what the scheduler tells its caller about it (introduced in chapter 02).

A request is data: its prompt, its sampling parameters, what it has generated so far, and where it
stands (waiting, running in a KV cache slot, finished). The scheduler owns every request it was given
and reports progress through ``on_output``, called on the scheduler's thread once per new token
(and once more if the request ends without one).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from .text_stream import TextStream


@dataclass
class RequestOutput:
    rid: str
    text: str  # new text since the last output
    token_ids: list[int]  # new tokens since the last output
    finish_reason: str | None  # None while running; then "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # the KV cache slot, while running
    cached_len: int = 0  # how many of prompt + output have keys and values in the cache
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # the request's own random stream, made on admission
    text: TextStream | None = None

    def uncached_ids(self) -> list[int]:
        """The tokens the next forward pass must run: the whole prompt at first, then the last sampled token."""
        prompt_len = len(self.prompt_ids)
        if self.cached_len < prompt_len:
            return self.prompt_ids[self.cached_len :] + self.output_ids
        return self.output_ids[self.cached_len - prompt_len :]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def emit(self, text: str, token_ids: list[int], finish_reason: str | None = None, error: str | None = None):
        self.on_output(
            RequestOutput(self.rid, text, token_ids, finish_reason, len(self.prompt_ids), len(self.output_ids), error)
        )
