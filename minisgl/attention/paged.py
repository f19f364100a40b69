"""Attention over a paged KV cache, in plain PyTorch: the oracle for chapter 06's kernels (introduced in chapter 05).

A cache of slots gives every request room for the longest sequence we accept. A paged cache cuts the
memory into pages of ``page_size`` tokens and gives a request only the pages it needs (its prompt and its
``max_tokens``, ``scheduler/pages.py``); its **page table row** lists them in order, wherever they lie
in the pool:

    position i of a request lives in page row[i // page_size], at offset i % page_size,
    that is at flat location  row[i // page_size] * page_size + i % page_size.

Each layer's keys (and values) are one tensor of every page's tokens, **token-major**:
``[num_pages * page_size, kv_heads, head_dim]``, so that a token's location is a row number. The other
candidate was heads-major, ``[kv_heads, num_pages * page_size, head_dim]``, whose rows per head are
what attention reads. ``benchmarks/kv_layout.py`` measures both for one layer's decode attention; its
numbers are in ``benchmarks/results/kv_layout.md`` and the book's chapter 05 ("Measured"). For the
whole attention the two layouts are close, and on a shared machine their ratio moves from run to run on
both sides of 1. The gather alone is where they differ, in token-major's favour: token-major copies a
token's heads as one contiguous row of kv_heads * head_dim values, where heads-major copies kv_heads
short rows from places far apart. SDPA then reads heads-major's rectangle, contiguous per head, a little
faster, which narrows the gap. Storing favours token-major too: a new token's k and v come out of the
projection as [tokens, kv_heads, head_dim], one row per token.

Page 0 is the **spare page**: the pool never hands it out. Padding locations point into it, so a padded
gather reads real (finite) memory, which the mask then hides.

The functions here take tensors on any device and work on one layer's cache; the backend works out the
locations once per batch and calls them for every layer:

- ``padded_locations`` / ``token_locations``: page table rows and lengths -> flat locations
  (``new_token_locations``: a batch's new tokens', for both backends and the CUDA graphs);
- ``store_kv``: new tokens' keys and values into their locations;
- ``paged_decode_attention``: one new token per request, every request at once (padded, masked);
- ``paged_extend_attention``: several new tokens of one request after ``cached_len`` cached ones
  (a prompt, a chunk of one, or a prompt whose prefix the radix cache already holds).

Both attentions gather with ``index_select``, faster than indexing with a tensor (``cache[locations]``),
and hand the arithmetic to ``scaled_dot_product_attention``, faster than attention written out (matmul,
mask, softmax, matmul); the same benchmark measures both choices. SDPA gets an explicit boolean mask:
never ``is_causal=True``, which aligns the causal mask top-left, so that with a cached prefix new token i
would see keys 0..i instead of 0..cached_len + i.
"""

import torch
import torch.nn.functional as F

from ..core import SPARE_PAGE, Batch  # SPARE_PAGE: never handed out; padding points here


# --8<-- [start:token-locations]
def padded_locations(page_table_rows: list[list[int]], lengths: list[int], page_size: int,
                     device=None) -> torch.Tensor:
    """Flat cache locations of positions 0 .. lengths[b] - 1 of each request b, as [requests, max(lengths)];
    positions past a request's length point at the spare page."""
    for b, (row, length) in enumerate(zip(page_table_rows, lengths, strict=True)):
        if len(row) * page_size < length:  # a missing page would silently read another request's tokens
            raise ValueError(f"request {b} has {length} tokens but {len(row)} pages of {page_size}")
    width = max(len(row) for row in page_table_rows)
    table = torch.tensor([row + [SPARE_PAGE] * (width - len(row)) for row in page_table_rows],
                         dtype=torch.long, device=device)  # [requests, pages]
    positions = torch.arange(max(lengths), device=device)  # [T]
    locations = table[:, positions // page_size] * page_size + positions % page_size  # [requests, T]
    padding = positions[None, :] >= torch.tensor(lengths, device=device)[:, None]
    return locations.masked_fill(padding, SPARE_PAGE * page_size)
# --8<-- [end:token-locations]


def token_locations(page_table_rows: list[list[int]], lengths: list[int], page_size: int,
                    starts: list[int] | None = None, device=None) -> torch.Tensor:
    """Flat cache locations of positions starts[b] .. lengths[b] - 1 of each request, end to end [tokens].

    With ``starts`` omitted (0): every position, which is what ``paged_extend_attention`` reads for one
    request. With ``starts`` the cached lengths: the new tokens, in batch order, which is where
    ``store_kv`` writes them.
    """
    return torch.tensor(token_location_list(page_table_rows, lengths, page_size, starts), dtype=torch.long,
                        device=device)


# --8<-- [start:new-locations]
def token_location_list(page_table_rows: list[list[int]], lengths: list[int], page_size: int,
                        starts: list[int] | None = None) -> list[int]:
    """``token_locations`` as Python ints: positions starts[b] .. lengths[b] - 1 of each request b."""
    locations = []
    for b, (row, end) in enumerate(zip(page_table_rows, lengths, strict=True)):
        if len(row) * page_size < end:  # a missing page would silently write into another request's tokens
            raise ValueError(f"request {b} has {end} tokens but {len(row)} pages of {page_size}")
        start = starts[b] if starts else 0
        locations += [row[p // page_size] * page_size + p % page_size for p in range(start, end)]
    return locations


def new_token_locations(batch: Batch, page_size: int) -> list[int]:
    """Where each new token of ``batch`` goes in the cache, in batch order: the rows ``store_kv`` writes its
    key and value to. Worked out here only: both backends' ``prepare`` call this, and so does the padding
    of a CUDA graph's decode step (``engine/graphs.py``)."""
    cached = [seq_len - new for seq_len, new in zip(batch.seq_lens, batch.new_lens)]
    return token_location_list(batch.page_tables, batch.seq_lens, page_size, cached)
# --8<-- [end:new-locations]


# --8<-- [start:store-kv]
def store_kv(k_cache, v_cache, locations: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v [tokens, kv_heads, d] into rows ``locations`` [tokens] of one layer's caches."""
    # index_copy_ rather than k_cache[locations] = k: the same rows written, with less of indexing's machinery
    # around it (measured: a few microseconds a layer, which one stream pays every layer of every token).
    k_cache.index_copy_(0, locations, k)
    v_cache.index_copy_(0, locations, v)
# --8<-- [end:store-kv]


# --8<-- [start:paged-decode]
def paged_decode_attention(q, k_cache, v_cache, locations, seq_lens, scale: float) -> torch.Tensor:
    """One new token per request, every request at once.

    q [requests, heads, d]; k_cache, v_cache [num_pages * page_size, kv_heads, d]; locations [requests, T]
    from ``padded_locations``; request b sees its first seq_lens[b] positions (its new token included), or
    every position where ``seq_lens`` is None (requests of one length, one stream always: no padding to hide,
    and SDPA without a mask is faster). Returns [requests, heads, d].
    """
    requests, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    # --8<-- [start:ex-page-gather]
    # Every request's keys and values in a padded rectangle [requests, kv_heads, T, d], and which of them
    # each request may see: its own positions, not the padding (which reads the spare page).
    flat = locations.flatten()
    keys = k_cache.index_select(0, flat).view(requests, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(requests, -1, num_kv_heads, head_dim).transpose(1, 2)
    visible = None if seq_lens is None else \
        torch.arange(locations.shape[1], device=q.device)[None, :] < seq_lens[:, None]  # [requests, T]
    # --8<-- [end:ex-page-gather]
    # Query head h reads KV head h // group: each KV head's group of query heads become its rows of queries.
    q = q.view(requests, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = None if visible is None else visible[:, None, None, :]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(requests, num_heads, head_dim)
# --8<-- [end:paged-decode]


# --8<-- [start:decode-formula]
def decode_attention_formula(q, k_cache, v_cache, locations, seq_lens, scale: float) -> torch.Tensor:
    """``paged_decode_attention`` written as one formula of products, sums and a softmax, for
    ``torch.compile`` to fuse (the torch backend's ``--enable-torch-compile``). Same arguments, same result;
    ``seq_lens`` is never None here.

    Eager it would be slow: ``q * keys`` makes a [requests, T, kv_heads, group, d] tensor before summing it.
    Compiled, nothing that size is ever made: inductor (torch.compile's compiler) turns each ``sum`` into a
    C++ loop that reads a key straight from its row of the cache (the gather fused into the load), so that
    every key and value is read once. On a CPU that beats SDPA for a batch of mixed lengths, whose kernel
    runs many tiny matrix products on a gathered, padded copy (``benchmarks/decode_attention.py``).
    """
    requests, width = locations.shape
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    queries = q.view(requests, 1, num_kv_heads, -1, head_dim).float()  # [requests, 1, kv_heads, group, d]
    keys = k_cache[locations].unsqueeze(3).float()  # [requests, T, kv_heads, 1, d]: a key for its group
    scores = (queries * keys).sum(-1) * scale  # [requests, T, kv_heads, group]
    padding = torch.arange(width, device=q.device)[None, :] >= seq_lens[:, None]  # [requests, T]
    weights = scores.masked_fill(padding[:, :, None, None], float("-inf")).softmax(dim=1)
    values = v_cache[locations].unsqueeze(3).float()  # [requests, T, kv_heads, 1, d]
    out = (weights.unsqueeze(-1) * values).sum(1)  # [requests, kv_heads, group, d]
    return out.reshape(requests, -1, head_dim).to(q.dtype)
# --8<-- [end:decode-formula]


# --8<-- [start:paged-extend]
def paged_extend_attention(q, k_cache, v_cache, locations, cached_len: int, scale: float) -> torch.Tensor:
    """The new tokens of one request attend to its whole sequence, causally.

    q [new, heads, d] holds positions cached_len .. seq_len - 1; locations [seq_len] are the request's
    positions 0 .. seq_len - 1 (``token_locations``), its new tokens' keys and values already stored.
    Returns [new, heads, d].
    """
    new, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = locations.shape[0], k_cache.shape[1]
    if new != seq_len - cached_len:
        raise ValueError(f"{new} new tokens after {cached_len} cached ones, but {seq_len} locations")
    group = num_heads // num_kv_heads
    # --8<-- [start:ex-extend-mask]
    # New token i sits at position cached_len + i and may see every key up to its own position. The mask
    # is aligned bottom-right: the last query sees all seq_len keys, the first sees cached_len + 1.
    query_positions = torch.arange(cached_len, seq_len, device=q.device)
    key_positions = torch.arange(seq_len, device=q.device)
    visible = key_positions[None, :] <= query_positions[:, None]  # [new, seq_len]
    # --8<-- [end:ex-extend-mask]
    # [kv_heads, group, seq_len, d]: each KV head read by its group of query heads; expand is a view, no copy.
    keys = k_cache.index_select(0, locations).transpose(0, 1)[:, None].expand(-1, group, -1, -1)
    values = v_cache.index_select(0, locations).transpose(0, 1)[:, None].expand(-1, group, -1, -1)
    q = q.view(new, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kv_heads, group, new, d]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(new, num_heads, head_dim)
# --8<-- [end:paged-extend]
