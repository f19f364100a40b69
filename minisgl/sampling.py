"""Choosing the next token of every request in a batch (introduced in chapter 01).

Given the logits of each request's last position, sampling

1. divides them by the request's temperature (below 1 sharpens the distribution, above 1 flattens it;
   temperature 0 means "always take the most likely token", greedy decoding),
2. keeps only the request's ``top_k`` most likely tokens, and of those only the smallest set whose
   probability adds up to its ``top_p`` (the "nucleus"),
3. draws one token from what is left, with the request's own ``torch.Generator`` so that a seed
   replays the same draws whatever else is in the batch.

Every request brings its own parameters, and the filtering runs on the whole batch at once: sort each
row once, then cut by rank (top-k) and by running probability (top-p) with per-row thresholds.
(``SamplingParams`` itself lives in ``core.py``, which the processes that never sample import without
torch.)
"""

import torch

from .core import SamplingParams, TokenLogprobs


# --8<-- [start:top-k-top-p]
def top_k_top_p(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Filter a batch of distributions, each row sorted from most to least likely.

    sorted_probs [requests, vocab]; top_k [requests] (0: keep all); top_p [requests] in (0, 1].
    Returns the rows with every dropped probability set to 0. Top-k is applied first; the nucleus is
    then measured on the renormalized top k. The most likely token always stays.
    """
    # --8<-- [start:ex-batched-top-p]
    rank = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)
    k = torch.where(top_k > 0, top_k, sorted_probs.shape[-1])
    sorted_probs = sorted_probs.masked_fill(rank[None, :] >= k[:, None], 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    # A token stays if the tokens ranked above it hold less than p in total. (Shifting the running
    # sum, rather than subtracting each token from it, keeps the sums exact at the boundary.)
    cumulative = sorted_probs.cumsum(dim=-1)
    mass_above = torch.cat((torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]), dim=-1)
    return sorted_probs.masked_fill(mass_above >= top_p[:, None], 0.0)
    # --8<-- [end:ex-batched-top-p]
# --8<-- [end:top-k-top-p]


MIN_TEMPERATURE = 1e-5


# --8<-- [start:sample]
def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Pick the next token of each request from ``logits`` [requests, vocab] (float32)."""
    tokens = logits.argmax(dim=-1)
    # Below MIN_TEMPERATURE, dividing would overflow the logits to infinities (then NaN): that is greedy anyway.
    sampled = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if sampled:  # the greedy rows are done; filter and draw the others together
        rows = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        top_k = torch.tensor([params[i].top_k for i in sampled], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
        probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = top_k_top_p(sorted_probs, top_k, top_p)
        for row, i in enumerate(sampled):  # one draw per request, each from its own random stream
            choice = torch.multinomial(sorted_probs[row], 1, generator=generators[i])
            tokens[i] = order[row, choice]
    return tokens.tolist()
# --8<-- [end:sample]


# --8<-- [start:logit-bias]
def add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """OpenAI's ``logit_bias``: add each request's bias to its tokens' logits, in place, before sampling
    (-100 all but bans a token, +100 all but forces it)."""
    for row, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            biases = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row, ids] += biases
# --8<-- [end:logit-bias]


# --8<-- [start:logprobs]
def report_logprobs(logprobs: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprobs]:
    """For each row of ``logprobs`` [requests, vocab] (log-softmax of the model's logits, before
    temperature, top-k, top-p, bias or grammar), the chosen token's log probability and the top[i] best."""
    k = max(top)
    best_values, best_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    best_values, best_ids = best_values.tolist(), best_ids.tolist()
    return [(chosen[i], list(zip(best_ids[i][: top[i]], best_values[i][: top[i]]))) for i in range(len(tokens))]
# --8<-- [end:logprobs]


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
