"""What one forward pass runs: a batch of requests, flattened into one row of tokens (introduced in chapter 02).

A leaf module like ``kv_cache.py``: the model and its layers read it, the engine and scheduler build it.

Requests in a batch have different lengths. Rather than padding them to a rectangle, the batch lays
every new token of every request end to end ("ragged" or "packed"): the linear layers, which treat
each token on its own, then run on one [tokens, hidden] matrix with no wasted rows. Only attention
needs to know which tokens belong together, and it reads that from the ``Batch``.

- a **prefill** batch holds the whole prompt of each newly admitted request;
- a **decode** batch holds exactly one token per running request: the one sampled last step.
"""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    is_prefill: bool
    input_ids: torch.Tensor  # [tokens] the new tokens of every request, end to end
    positions: torch.Tensor  # [tokens] each token's position in its own sequence
    token_slots: torch.Tensor  # [tokens] the KV cache slot of each token's request
    slots: torch.Tensor  # [requests] each request's slot
    seq_lens: torch.Tensor  # [requests] each request's length once this batch is done
    max_seq_len: int  # the longest of seq_lens, kept as a Python int so attention need not ask the device
    new_lens: list[int]  # [requests] how many new tokens each request has in this batch
    last_token: torch.Tensor  # [requests] index of each request's last new token, whose logits we sample

    @classmethod
    def build(cls, is_prefill: bool, requests, device) -> "Batch":
        """``requests`` have a ``slot``, a ``cached_len`` (how many of their tokens already have keys
        and values in the cache) and ``uncached_ids()``, the tokens that do not yet."""
        ids, positions, token_slots, new_lens = [], [], [], []
        for req in requests:
            new = req.uncached_ids()
            ids += new
            positions += range(req.cached_len, req.cached_len + len(new))
            token_slots += [req.slot] * len(new)
            new_lens.append(len(new))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            is_prefill=is_prefill,
            input_ids=as_tensor(ids),
            positions=as_tensor(positions),
            token_slots=as_tensor(token_slots),
            slots=as_tensor([r.slot for r in requests]),
            seq_lens=as_tensor([r.cached_len + n for r, n in zip(requests, new_lens)]),
            max_seq_len=max(r.cached_len + n for r, n in zip(requests, new_lens)),
            new_lens=new_lens,
            last_token=as_tensor(new_lens).cumsum(0) - 1,
        )
