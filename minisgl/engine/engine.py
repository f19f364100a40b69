"""The engine runs one batch through the model and samples each request's next token (introduced in chapter 02).

It owns what lives on the device: the model's weights, the KV cache's tensors and the attention
backend that reads them. It knows nothing of queues, HTTP or text, nor of who holds which KV cache
page: the scheduler decides *which* requests run and where their keys and values go, in a ``Batch``
(``core.py``); the engine only runs it.

Under tensor parallelism every rank has an engine, and every rank's engine runs every batch: each with
its share of the weights and of the KV cache (``distributed.tp_info()`` says which), all meeting in
the model's collectives. Each ends with the logits of the whole vocabulary, so each samples the same
tokens, given the same seeds.
"""

import ctypes
from itertools import accumulate
from pathlib import Path

import torch

from ..attention import make_backend
from ..core import Batch, TokenLogprobs, pages_for
from ..distributed import tp_info
from ..grammar import apply_grammar_masks
from ..kv_cache import KVCache, bytes_per_page
from ..layers import kv_head_shard
from ..layers.linear import prepack_for_cpu
from ..models import load_model
from ..sampling import add_logit_bias, make_generator, report_logprobs, sample
from .graphs import DecodeGraphs


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` picks bfloat16 where the hardware computes it fast, else float32 (float16 on old GPUs)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


# --8<-- [start:keep-freed-memory]
def keep_freed_memory() -> None:
    """Let the CPU allocator keep freed memory for the next step instead of giving it back to the OS
    (introduced in chapter 05).

    Every layer of a decode step gathers its requests' keys and values into new tensors of several MiB
    and frees them a moment later. By default glibc's malloc returns blocks that large to the OS and the
    next layer's allocation page-faults them back in, one 4 KiB page at a time: measured on the serving
    workload, 120,000 page faults per decode step, close to half its time. On a GPU PyTorch's caching
    allocator keeps freed blocks for reuse; on the CPU, raising malloc's two thresholds does the same.
    Elsewhere than glibc (macOS, musl) this does nothing.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 64 << 20)  # blocks up to 64 MiB come from the heap, not their own mapping...
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # ...and up to 1 GiB of freed heap stays with the process
# --8<-- [end:keep-freed-memory]


def pages_in_budget(budget_bytes: int, page_size: int, context_length: int, page_bytes: int) -> int:
    """The pages (the spare included) that ``budget_bytes`` hold; refused if fewer than one request of the
    whole context length needs, for such a request would wait forever."""
    num_pages = budget_bytes // page_bytes
    needed = pages_for(context_length, page_size) + 1
    if num_pages < needed:
        raise ValueError(f"--kv-cache-memory {budget_bytes / 2**20:g} MiB holds {num_pages} pages of {page_bytes} "
                         f"bytes, fewer than one request of --context-length {context_length} needs ({needed}, "
                         f"the spare included): give at least {needed * page_bytes / 2**20:.1f} MiB")
    return num_pages


class Engine:
    def __init__(self, model_path: str | Path, dtype: str, device: str, num_pages: int, page_size: int,
                 context_length: int, kv_cache_bytes: int = 0, attention_backend: str = "auto",
                 cuda_graph_max_bs: int = 0):
        """``num_pages`` pages of ``page_size`` tokens hold every request's keys and values (page 0 is the
        spare), or as many as fit in ``kv_cache_bytes`` if that is given; ``context_length``: the longest
        prompt + reply a request may have (``config.py`` clamps it); ``attention_backend``: torch, triton or
        auto (``attention.make_backend``); ``cuda_graph_max_bs``: capture CUDA graphs of decode steps up to
        that batch size (a GPU and the triton backend; 0: none)."""
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(model_path, self.dtype, self.device)
        if self.device.type == "cpu":
            prepack_for_cpu(self.model)  # bfloat16 weights in oneDNN's layout: faster, the same numbers
        self.config = c = self.model.config
        if context_length > c.max_position_embeddings:
            raise ValueError(f"context_length {context_length} is more than the model's {c.max_position_embeddings}")
        self.context_length = context_length
        tp = tp_info()
        _, kv_heads = kv_head_shard(c.num_kv_heads, tp.rank, tp.size)  # this rank caches its own KV heads only
        if kv_cache_bytes:
            num_pages = pages_in_budget(kv_cache_bytes, page_size, context_length,
                                        bytes_per_page(c.num_layers, page_size, kv_heads, c.head_dim, self.dtype))
        self.kv_cache = KVCache(c.num_layers, num_pages, page_size, kv_heads, c.head_dim, self.dtype, self.device)
        self.attention = make_backend(attention_backend, self.kv_cache)
        self.graphs = None
        if cuda_graph_max_bs and self.device.type == "cuda" and hasattr(self.attention, "use_static"):
            self.graphs = DecodeGraphs(self, cuda_graph_max_bs)

    def new_generator(self, seed: int | None) -> torch.Generator:
        """A request's own random stream, on the device that samples."""
        return make_generator(seed, self.device)

    # --8<-- [start:engine-step]
    @torch.inference_mode()
    def forward(self, batch: Batch, more_rows: tuple[int, ...] = ()) -> torch.Tensor:
        """Run the batch's new tokens; the logits of each request's last one, [requests, vocab] float32 (then
        those of the tokens at ``more_rows`` of the batch, for prompt log probabilities)."""
        if self.graphs is not None and self.graphs.fits(batch) and not more_rows:
            return self.graphs.forward(batch)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        positions = as_tensor(batch.positions)
        self.attention.prepare(batch, positions)  # once per batch; every layer reuses it
        hidden = self.model(as_tensor(batch.input_ids), positions, self.attention)
        last_tokens = [n - 1 for n in accumulate(batch.new_lens)]  # each request's last new token
        # Only the last ones are sampled; the others score prompt tokens (the epilogue's echo with logprobs).
        return self.model.logits(hidden[as_tensor(last_tokens + list(more_rows))])

    @torch.inference_mode()
    def step(self, batch: Batch) -> tuple[list[int | None], list[TokenLogprobs | None], list[list]]:
        """Run the batch's new tokens and return the next token of each request that ``batch.sample`` says
        to sample, None for the others (a chunk in the middle of a prompt); the same on every rank. With
        them, the log probabilities of each sampled request that asked for them (None for the others), and
        of the prompt tokens this step read for each request that asked for those ([] for the others)."""
        prompt_rows = prompt_logprob_rows(batch)
        logits = self.forward(batch, tuple(row for _, row, _ in prompt_rows))
        logits, prompt_logits = logits[: len(batch.requests)], logits[len(batch.requests):]
        prompt_logprobs = [[] for _ in batch.requests]
        if prompt_rows:
            top = [batch.requests[b].params.logprobs or 0 for b, _, _ in prompt_rows]
            reported = report_logprobs(torch.log_softmax(prompt_logits, dim=-1), [t for _, _, t in prompt_rows], top)
            for (b, _, token), token_logprobs in zip(prompt_rows, reported):
                prompt_logprobs[b].append((token, token_logprobs))
        chosen = [b for b, wanted in enumerate(batch.sample) if wanted]
        if not chosen:
            return [None] * len(batch.requests), [None] * len(batch.requests), prompt_logprobs
        requests = [batch.requests[b] for b in chosen]
        rows = logits if len(chosen) == len(batch.requests) else logits[chosen]
        # The model's own distribution, before anything below changes it: that is what logprobs report.
        asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        model_logprobs = torch.log_softmax(rows[asked], dim=-1) if asked else None
        add_logit_bias(rows, [r.params for r in requests])
        if any(r.grammar is not None for r in requests):
            apply_grammar_masks(rows, [r.grammar for r in requests])
        tokens = sample(rows, [r.params for r in requests], [r.generator for r in requests])
        logprobs = [None] * len(requests)
        if asked:
            for i, token_logprobs in zip(asked, report_logprobs(model_logprobs, [tokens[i] for i in asked],
                                                                [requests[i].params.logprobs for i in asked])):
                logprobs[i] = token_logprobs
        by_row = iter(zip(tokens, logprobs))
        pairs = [next(by_row) if wanted else (None, None) for wanted in batch.sample]
        return [token for token, _ in pairs], [lp for _, lp in pairs], prompt_logprobs
    # --8<-- [end:engine-step]


def prompt_logprob_rows(batch: Batch) -> list[tuple[int, int, int]]:
    """For the requests that want their prompt's log probabilities: (request, row of the batch, the prompt
    token that row predicts), for every token of its chunk that is followed by another prompt token."""
    rows, start = [], 0
    for b, (request, new) in enumerate(zip(batch.requests, batch.new_lens)):
        if request.params.prompt_logprobs:
            for position in range(request.cached_len, min(request.cached_len + new, len(request.prompt_ids) - 1)):
                rows.append((b, start + position - request.cached_len, request.prompt_ids[position + 1]))
        start += new
    return rows
