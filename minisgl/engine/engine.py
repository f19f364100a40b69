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
from ..core import Batch, Sampled, pages_for
from ..distributed import tp_info
from ..kv_cache import KVCache, bytes_per_page
from ..layers import kv_head_shard
from ..layers.linear import prepack_for_cpu
from ..layers.quantize import quantize_model
from ..models import load_model
from ..sampling import (
    Penalties,
    SamplingBatch,
    count_tokens,
    make_generator,
    prompt_logprob_rows,
    sampler,
    score_prompt_rows,
)
from .future import resolve_future_tokens
from .graphs import DecodeGraphs, graph_batch_sizes


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
                 cuda_graph_max_bs: int = 0, max_running_requests: int = 256, quantization: str = "",
                 compile_attention: bool = False):
        """``num_pages`` pages of ``page_size`` tokens hold every request's keys and values (page 0 is the
        spare), or as many as fit in ``kv_cache_bytes`` if that is given; ``context_length``: the longest
        prompt + reply a request may have (``config.py`` clamps it); ``attention_backend``: torch, triton or
        auto (``attention.make_backend``); ``cuda_graph_max_bs``: capture CUDA graphs of decode steps up to
        that batch size (a GPU and the triton backend; 0: none); ``max_running_requests``: the slots of the
        future-token map (overlap scheduling: a request's slot holds its last sampled token, on the device);
        ``quantization``: int8wo, w8a8_int8 or int4wo-32 quantized weights (``layers/quantize.py``), empty: none;
        ``compile_attention``: the torch backend's mixed-length decodes through ``torch.compile``."""
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(model_path, self.dtype, self.device)
        if quantization:
            quantize_model(self.model, quantization)  # each rank its own shard, from the checkpoint's weights
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
        self.attention = make_backend(attention_backend, self.kv_cache, compile_attention)
        # Overlap scheduling (chapter 06): each step writes its sampled tokens here, by request slot, and the
        # next step, built before they were known, reads its input tokens from here (``resolve_future_tokens``).
        self.future_tokens = torch.zeros(max_running_requests, dtype=torch.long, device=self.device)
        # Sampling penalties (the epilogue): how often each slot's request has generated each token, [slots,
        # vocab] int32 on the device, made when a penalized request first samples (until then it costs nothing).
        self.token_counts: torch.Tensor | None = None
        self.graphs = None  # the torch backend has no graph hooks: it runs every step eagerly
        if cuda_graph_max_bs and self.device.type == "cuda" and self.attention.supports_graphs:
            self.graphs = DecodeGraphs(self.model, self.attention, self.device, graph_batch_sizes(cuda_graph_max_bs),
                                       max_seq_len=context_length, page_size=page_size)

    def new_generator(self, seed: int | None) -> torch.Generator:
        """A request's own random stream, on the device that samples."""
        return make_generator(seed, self.device)

    # --8<-- [start:engine-step]
    @torch.inference_mode()
    def forward(self, batch: Batch, more_rows: tuple[int, ...] = ()) -> torch.Tensor:
        """Run the batch's new tokens; the logits of each request's last one, [requests, vocab] float32 (then
        those of the tokens at ``more_rows`` of the batch, for prompt log probabilities)."""
        if self.graphs is not None and self.graphs.fits(batch) and not more_rows:
            return self.graphs.forward(batch, self.future_tokens)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        positions = as_tensor(batch.positions)
        self.attention.prepare(batch, positions)  # once per batch; every layer reuses it
        input_ids = as_tensor(batch.input_ids)
        if min(batch.input_ids) < 0:  # tokens the step before sampled, unknown when this batch was built
            input_ids = resolve_future_tokens(input_ids, self.future_tokens)
        hidden = self.model(input_ids, positions, self.attention)
        last_tokens = [n - 1 for n in accumulate(batch.new_lens)]  # each request's last new token
        # Only the last ones are sampled; the others score prompt tokens (the epilogue's echo with logprobs).
        return self.model.logits(hidden[as_tensor(last_tokens + list(more_rows))])

    def sampling_batch(self, requests: list, mask=None) -> SamplingBatch:
        """The sampling tensors of a batch's sampled requests (the scheduler keeps them while they stay the same)."""
        if self.token_counts is None and any(request.params.penalized for request in requests):
            self.token_counts = torch.zeros(len(self.future_tokens), self.config.vocab_size, dtype=torch.int32,
                                            device=self.device)
        return SamplingBatch.build(requests, self.device, mask, self.token_counts)

    @torch.inference_mode()
    def step(self, batch: Batch, sampling: SamplingBatch) -> list[Sampled]:
        """Run the batch's new tokens, then sample the requests that ``batch.sample`` says to (``sampling``:
        their parameters, in the same order). One ``Sampled`` per request of the batch, the same on every rank."""
        prompt_rows = prompt_logprob_rows(batch)  # (the epilogue's echo with logprobs; usually none)
        logits = self.forward(batch, tuple(row for _, row, _ in prompt_rows))
        results = [Sampled() for _ in batch.requests]
        chosen = [b for b, wanted in enumerate(batch.sample) if wanted]
        if chosen:
            rows = logits[: len(batch.requests)]
            if sampling.penalties is not None:
                self.start_counts(batch, chosen, sampling.penalties)
            token_ids, logprobs = sampler(rows if len(chosen) == len(rows) else rows[chosen], sampling)
            self.remember_tokens([batch.slots[b] for b in chosen], token_ids)
            if sampling.penalties is not None:
                count_tokens(token_ids, sampling.penalties)  # on the device: overlap's next step reads them
            tokens = token_ids.tolist()  # (the step's one wait for the device)
            for b, token, token_logprobs in zip(chosen, tokens, logprobs):
                results[b].token, results[b].logprobs = token, token_logprobs
        for b, scored in score_prompt_rows(logits[len(batch.requests):], prompt_rows, batch):
            results[b].prompt_logprobs.append(scored)
        return results
    # --8<-- [end:engine-step]

    def remember_tokens(self, slots: list[int], token_ids: torch.Tensor) -> None:
        """Write the sampled tokens into the future-token map, each at its request's slot, on the device (a
        request built by hand outside a scheduler has no slot, -1, and nothing to remember)."""
        rows = [row for row, slot in enumerate(slots) if slot >= 0]
        if rows:
            index = torch.tensor([slots[row] for row in rows], device=self.device)
            self.future_tokens[index] = token_ids if len(rows) == len(slots) else token_ids[rows]

    def start_counts(self, batch: Batch, chosen: list[int], penalties: Penalties) -> None:
        """Zero the counts of each penalized request that samples its first token in this step (its batch length
        is its prompt's): its slot's counts are still its last request's. Done here, in the step, and not when
        the scheduler hands the slot over: with overlap, a step of that last request may still be running then,
        and count its token after."""
        first = [slot for row, slot in penalties.placed
                 if batch.seq_lens[chosen[row]] == len(batch.requests[chosen[row]].prompt_ids)]
        if first:
            self.token_counts[first] = 0

    def use_this_thread(self) -> None:
        """Make the calling thread ready to run steps (the overlap scheduler's forward thread): CUDA's current
        device is the thread's own, cuda:0 in a new thread, and this rank's may be another."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

