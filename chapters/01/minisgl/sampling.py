"""Choosing the next token from the model's scores (introduced in chapter 01).

Given the logits of the last position, sampling

1. divides them by the temperature (below 1 sharpens the distribution, above 1 flattens it;
   temperature 0 means "always take the most likely token", greedy decoding),
2. keeps only the ``top_k`` most likely tokens, and of those only the smallest set whose probability
   adds up to ``top_p`` (the "nucleus"),
3. draws one token from what is left, with a ``torch.Generator`` so that a seed replays the same draw.
"""

from dataclasses import dataclass, field

import torch


# --8<-- [start:sampling-params]
@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")


def top_k_filter(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Zero every probability in ``probs`` [vocab] but the k largest (k = 0 keeps them all)."""
    if k <= 0 or k >= probs.shape[-1]:
        return probs
    kept = torch.zeros_like(probs)
    top = probs.topk(k)
    return kept.scatter_(-1, top.indices, top.values)
# --8<-- [end:sampling-params]


# --8<-- [start:top-p]
def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Zero every probability outside the nucleus of ``probs`` [vocab]: the smallest set of the most
    likely tokens whose probabilities add up to at least p. The most likely token is always kept."""
    # --8<-- [start:ex-top-p]
    if p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    # A token stays if the tokens ranked above it hold less than p in total. (Shifting the running
    # sum, rather than subtracting each token from it, keeps the sums exact at the boundary.)
    mass_above = torch.cat((torch.zeros_like(sorted_probs[..., :1]), sorted_probs.cumsum(-1)[..., :-1]), dim=-1)
    sorted_probs = sorted_probs.masked_fill(mass_above >= p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # --8<-- [end:ex-top-p]
# --8<-- [end:top-p]


# --8<-- [start:sample]
def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token id from ``logits`` [vocab] (float32)."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    probs = top_k_filter(probs, params.top_k)
    probs = top_p_filter(probs / probs.sum(), params.top_p)  # the nucleus is measured among the top k
    # multinomial renormalizes, so the filtered probabilities need not add up to 1.
    return int(torch.multinomial(probs, 1, generator=generator))
# --8<-- [end:sample]


# --8<-- [start:make-generator]
def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A random stream for one request: seeded when asked for, otherwise fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
# --8<-- [end:make-generator]
