"""Choosing the next token of every request in a batch (introduced in chapter 01).

Given the logits of each request's last position, sampling

1. divides them by the request's temperature (below 1 sharpens the distribution, above 1 flattens it;
   temperature 0 means "always take the most likely token", greedy decoding),
2. keeps only the request's ``top_k`` most likely tokens, and of those only the smallest set whose
   probability adds up to its ``top_p`` (the "nucleus"),
3. draws one token from what is left, with the request's own ``torch.Generator`` so that a seed
   replays the same draws whatever else is in the batch.

Every request brings its own parameters, and the filtering runs on the whole batch at once: sort each
row once, then cut by rank (top-k) and by running probability (top-p) with per-row thresholds. The
batch's parameters become tensors once, in a ``SamplingBatch``, when the batch's requests change
(chapter 06; SGLang's ``SamplingBatchInfo`` is the same idea), and ``sampler`` is the whole sampling
step the engine runs after the forward pass.
(``SamplingParams`` itself lives in ``core.py``, which the processes that never sample import without
torch.)

The complete server adds what clients ask of the logits before all that (the epilogue): penalties on the
tokens a request has already generated (``apply_penalties``, counted on the device by the engine), then
``logit_bias``, then a grammar's mask; and ``min_p``, a last filter after top-k and top-p.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .core import TokenLogprobs


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


# --8<-- [start:penalties]
@dataclass
class Penalties:
    """The penalized rows of a batch (SGLang's penalizers, ``python/sglang/srt/sampling/penaltylib/``).

    What a penalty needs is how often each request has generated each token. The engine keeps that on the
    device, one row of ``counts`` per request slot, and adds each step's sampled tokens to it there: with
    overlap scheduling the CPU learns a token only once the next step, whose penalties need it, is launched.
    """

    rows: torch.Tensor  # the penalized rows of the batch
    slots: torch.Tensor  # their requests' slots, their rows of ``counts``
    counts: torch.Tensor  # [slots, vocab] int32, the engine's: each slot's generated tokens, counted
    frequency: torch.Tensor  # [penalized rows, 1], as are the next two
    presence: torch.Tensor
    repetition: torch.Tensor
    placed: list[tuple[int, int]]  # (row, slot) of each, on the CPU

    @classmethod
    def build(cls, requests: list, rows: list[int], counts: torch.Tensor) -> "Penalties":
        """``requests``: the batch's sampled requests; ``rows``: the penalized ones (each has its slot)."""
        requests = [requests[row] for row in rows]
        as_tensor = lambda values: torch.tensor(values, device=counts.device)  # noqa: E731
        column = lambda name: as_tensor([[getattr(r.params, name)] for r in requests])  # noqa: E731
        return cls(as_tensor(rows), as_tensor([r.slot for r in requests]), counts,
                   column("frequency_penalty"), column("presence_penalty"), column("repetition_penalty"),
                   [(row, r.slot) for row, r in zip(rows, requests)])


def apply_penalties(logits: torch.Tensor, batch: "SamplingBatch") -> None:
    """Penalize, in place, each penalized row's logits [rows, vocab] for the tokens its request generated (not
    its prompt's), in SGLang's order: first the additive penalties, frequency (minus penalty x count) and
    presence (minus penalty once a token is seen), then repetition, which scales a seen token's logit toward
    0: divided by the penalty if positive, multiplied if negative (so > 1 makes it less likely either way)."""
    p = batch.penalties
    if p is None:  # no request of the batch has a penalty: no work
        return
    counts = p.counts[p.slots]
    seen = counts > 0
    rows = logits[p.rows] - p.frequency * counts - p.presence * seen
    scaled = torch.where(rows > 0, rows / p.repetition, rows * p.repetition)
    logits[p.rows] = torch.where(seen, scaled, rows).to(logits.dtype)


def count_tokens(tokens: torch.Tensor, penalties: Penalties) -> None:
    """Add one step's sampled ``tokens`` [rows] to the penalized requests' counts, on the device."""
    ones = torch.ones_like(penalties.slots, dtype=penalties.counts.dtype)
    penalties.counts.index_put_((penalties.slots, tokens[penalties.rows]), ones, accumulate=True)
# --8<-- [end:penalties]


# --8<-- [start:sampling-batch]
@dataclass
class SamplingBatch:
    """How the sampled rows of a batch choose their tokens, as tensors on the device (chapter 06).

    Built when the batch's sampled requests change, not every step: in a run of decode steps the same
    requests sample again and again, with the same temperatures, filters, biases and random streams.
    ``uids`` says which requests it was built for, in row order.
    """

    uids: tuple[str, ...]
    drawn: torch.Tensor | None  # the rows that draw at random (temperature >= MIN_TEMPERATURE); the rest are greedy
    temperature: torch.Tensor | None  # [drawn rows]
    top_k: torch.Tensor | None  # [drawn rows], 0: no limit
    top_p: torch.Tensor | None  # [drawn rows]
    generators: list  # each drawn row's own random stream
    # The complete server's OpenAI surface (the epilogue): logit_bias as (rows, token ids, biases), the rows
    # that want log probabilities with how many alternatives each, and the constraints' mask (``grammar.py``).
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    logprob_rows: list[int] = field(default_factory=list)
    logprob_top: list[int] = field(default_factory=list)
    mask: Callable[[torch.Tensor], None] | None = None
    # Sampling penalties and min_p (None where no row of the batch asks for them: no work then).
    penalties: Penalties | None = None
    min_p: torch.Tensor | None = None  # [drawn rows]

    @classmethod
    def build(cls, requests: list, device, mask: Callable | None = None,
              counts: torch.Tensor | None = None) -> "SamplingBatch":
        """``requests``: the sampled requests, in row order (each with its ``params`` and ``generator``, and its
        ``slot`` if it is penalized); ``counts``: the engine's token counts, needed if any of them is."""
        params = [request.params for request in requests]
        drawn = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
        penalized = [i for i, p in enumerate(params) if p.penalized]
        as_tensor = lambda values, dtype=None: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        bias = [(row, token, value) for row, p in enumerate(params) for token, value in p.logit_bias.items()]
        return cls(
            uids=tuple(request.uid for request in requests),
            drawn=as_tensor(drawn) if drawn else None,
            temperature=as_tensor([params[i].temperature for i in drawn]) if drawn else None,
            top_k=as_tensor([params[i].top_k for i in drawn]) if drawn else None,
            top_p=as_tensor([params[i].top_p for i in drawn]) if drawn else None,
            generators=[requests[i].generator for i in drawn],
            bias=(as_tensor([r for r, _, _ in bias], torch.long), as_tensor([t for _, t, _ in bias], torch.long),
                  as_tensor([v for _, _, v in bias], torch.float32)) if bias else None,
            logprob_rows=[i for i, p in enumerate(params) if p.logprobs is not None],
            logprob_top=[p.logprobs for p in params if p.logprobs is not None],
            mask=mask,
            penalties=Penalties.build(requests, penalized, counts) if penalized else None,
            min_p=as_tensor([params[i].min_p for i in drawn]) if any(params[i].min_p for i in drawn) else None,
        )
# --8<-- [end:sampling-batch]


# --8<-- [start:sample]
def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick the next token of each row of ``logits`` [rows, vocab] (float32): [rows] ids, on the device."""
    tokens = logits.argmax(dim=-1)
    # Below MIN_TEMPERATURE, dividing would overflow the logits to infinities (then NaN): that is greedy anyway.
    if batch.drawn is not None:  # the greedy rows are done; filter and draw the others together
        probs = torch.softmax(logits[batch.drawn] / batch.temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = top_k_top_p(sorted_probs, batch.top_k, batch.top_p)
        if batch.min_p is not None:  # drop what is less likely than min_p x the likeliest token (column 0)
            below = sorted_probs < batch.min_p[:, None] * sorted_probs[:, :1]
            sorted_probs = sorted_probs.masked_fill(below, 0.0)
        for row, generator in enumerate(batch.generators):  # one draw per request, each from its own stream
            choice = torch.multinomial(sorted_probs[row], 1, generator=generator)
            tokens[batch.drawn[row]] = order[row, choice]
    return tokens
# --8<-- [end:sample]


# --8<-- [start:sampler]
def sampler(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
    """The engine's sampling step: the token of each row of ``logits`` [rows, vocab] (a tensor on the
    device), and the log probabilities of each row that asked for them (None for the others). The order
    matters: first the model's own log probabilities (what ``logprobs`` reports, before anything changes
    them), then the penalties (``apply_penalties``, in place), then ``logit_bias`` (added to the logits, in
    place), then the constraints' mask (forbidden tokens' logits to -inf: the last word, which no bias of at
    most +100 undoes), then sampling."""
    # --8<-- [start:ex-logit-order]
    model_logprobs = torch.log_softmax(logits[batch.logprob_rows], dim=-1) if batch.logprob_rows else None
    apply_penalties(logits, batch)  # on the model's logits, before the client's bias moves them (as SGLang)
    if batch.bias is not None:  # OpenAI's logit_bias: -100 all but bans a token, +100 all but forces it
        rows, ids, biases = batch.bias
        logits.index_put_((rows, ids), biases.to(logits.dtype), accumulate=True)
    if batch.mask is not None:
        batch.mask(logits)
    tokens = sample(logits, batch)
    logprobs: list[TokenLogprobs | None] = [None] * len(tokens)
    if model_logprobs is not None:
        chosen = tokens[batch.logprob_rows].tolist()
        reports = report_logprobs(model_logprobs, chosen, batch.logprob_top)
        for row, reported in zip(batch.logprob_rows, reports):
            logprobs[row] = reported
    return tokens, logprobs
    # --8<-- [end:ex-logit-order]
# --8<-- [end:sampler]


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


# --8<-- [start:prompt-logprobs]
def prompt_logprob_rows(batch) -> list[tuple[int, int, int]]:
    """For the requests of a ``Batch`` that want their prompt's log probabilities (the epilogue's echo):
    (request, row of the batch, the prompt token that row predicts), for every token of its chunk that is
    followed by another prompt token, from the request's ``logprob_start_len`` on."""
    rows, start = [], 0
    for b, (request, new, seq_len) in enumerate(zip(batch.requests, batch.new_lens, batch.seq_lens)):
        if request.params.prompt_logprobs:
            cached = seq_len - new  # from the batch: the request's own count may have moved on (overlap)
            first = max(cached, request.params.logprob_start_len)
            for position in range(first, min(seq_len, len(request.prompt_ids) - 1)):
                rows.append((b, start + position - cached, request.prompt_ids[position + 1]))
        start += new
    return rows


def score_prompt_rows(logits: torch.Tensor, rows: list[tuple[int, int, int]], batch) -> list:
    """(request, (prompt token, its TokenLogprobs)) for each of ``rows``, from their ``logits``."""
    if not rows:
        return []
    top = [batch.requests[b].params.logprobs or 0 for b, _, _ in rows]
    reported = report_logprobs(torch.log_softmax(logits, dim=-1), [token for _, _, token in rows], top)
    return [(b, (token, token_logprobs)) for (b, _, token), token_logprobs in zip(rows, reported)]
# --8<-- [end:prompt-logprobs]


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
