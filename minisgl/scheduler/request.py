"""A request, as the scheduler sees it (chapter 02; chapter 03 moved text out to the detokenizer).

A request is data: its prompt, its sampling parameters, what it has generated so far, and where it
stands (waiting, running in a KV cache slot, finished). Since chapter 03 the scheduler deals in
token ids only; turning them into text, and watching for stop strings, is the detokenizer's job.
"""

from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams


@dataclass(eq=False)
class Request:
    uid: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # the KV cache slot, while running
    cached_len: int = 0  # how many of prompt + output have keys and values in the cache
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # the request's own random stream, made on admission
    announced: bool = False  # has the detokenizer been told about it (stop strings, prompt length)?

    def uncached_ids(self) -> list[int]:
        """The tokens the next forward pass must run: the whole prompt at first, then the last sampled token."""
        prompt_len = len(self.prompt_ids)
        if self.cached_len < prompt_len:
            return self.prompt_ids[self.cached_len :] + self.output_ids
        return self.output_ids[self.cached_len - prompt_len :]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
