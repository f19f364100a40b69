"""CUDA graphs for decode steps (introduced in chapter 06).

A decode step of a small model on a GPU is mostly waiting for Python: hundreds of kernel launches,
each a few microseconds of CPU for a few microseconds of GPU work. A CUDA graph records the launches of
one step once and replays them with a single call. The price: a graph replays exactly what it recorded,
the same kernels on the same memory with the same shapes. So

- the inputs live in **static buffers** on the device, allocated once; each step copies its values
  into them. The token ids and positions are the model's, here (``DecodeBuffers``); the page table,
  lengths and new tokens' locations are the attention backend's, in its own buffers, filled through its
  graph hooks (``AttentionBackend.init_graph_buffers``, ``prepare_for_capture``, ``prepare_for_replay``);
- a graph is captured for each of a few **batch sizes** (``graph_batch_sizes``); a batch of 5 runs the
  graph of 8, **padded** with 3 dummy requests that read and write only the spare page (page 0, which
  no request owns), and their logits are ignored;
- the decode kernel's grid must not depend on the batch's lengths: it is sized for the whole context.

Prefill and mixed steps (shapes that change every time) run eagerly, as before. The padding and the
buffers are tested on the CPU; capturing and replaying need a GPU.
"""

from dataclasses import dataclass

import torch

from ..attention import AttentionBackend
from ..attention.paged import new_token_locations
from ..core import SPARE_PAGE, Batch, pages_for
from ..models.decoder import CausalLM
from .future import resolve_future_tokens


# --8<-- [start:graph-sizes]
def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_batch_size`` (which is always the last): few
    graphs, and never more than 7 dummy requests in a batch above 8."""
    sizes = [size for size in (1, 2, 4, 8) if size <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes
# --8<-- [end:graph-sizes]


@dataclass
class DecodeInputs:
    """One decode step's inputs as Python lists, padded to a graph's batch size."""

    input_ids: list[int]
    positions: list[int]
    page_table: list[list[int]]  # [size, max_pages], padded with the spare page
    seq_lens: list[int]
    new_locations: list[int]  # where each new token's key and value go


# --8<-- [start:pad-decode]
def padded_decode_inputs(batch: Batch, size: int, max_pages: int, page_size: int) -> DecodeInputs:
    """The decode batch's inputs, then ``size - len(batch.requests)`` dummy requests: token 0 at position 0,
    length 1, a page table of spare pages only, writing its key and value into the spare page's first row.
    Every page table is padded with the spare page to ``max_pages`` pages, and each new token's location is
    where ``attention.paged.new_token_locations`` puts it."""
    requests = batch.requests
    if any(new != 1 for new in batch.new_lens):
        raise ValueError("a CUDA graph runs decode steps only: one new token per request")
    # --8<-- [start:ex-pad-decode]
    if len(requests) > size:
        raise ValueError(f"{len(requests)} requests do not fit in a graph of {size}")
    dummies = size - len(requests)
    rows = [pages + [SPARE_PAGE] * (max_pages - len(pages)) for pages in batch.page_tables]
    return DecodeInputs(
        input_ids=batch.input_ids + [0] * dummies,
        positions=batch.positions + [0] * dummies,
        page_table=rows + [[SPARE_PAGE] * max_pages] * dummies,
        seq_lens=batch.seq_lens + [1] * dummies,
        new_locations=new_token_locations(batch, page_size) + [SPARE_PAGE * page_size] * dummies,
    )
    # --8<-- [end:ex-pad-decode]
# --8<-- [end:pad-decode]


# --8<-- [start:buffers]
class DecodeBuffers:
    """A replayed decode step's inputs on the device, sent from one pinned host buffer in one copy.

    The layout, int64: input_ids, positions, seq_lens and new_locations, ``max_batch_size`` each, then the
    page table, packed [size, width], ``width`` the widest page table of this step's batch (on most steps
    far fewer pages than the context's). Numpy writes the Python lists into the host buffer, and one
    asynchronous copy sends it. The graph reads input_ids and positions from here; the backend copies the
    rest into its own buffers, on the device (``prepare_for_replay``).

    The page table still travels from Python every step. Where it should live is on the device for good,
    one row per request slot, updated only where a request gains a page; that needs request slots, which
    overlap scheduling, not written yet, brings.
    """

    def __init__(self, max_batch_size: int, max_pages: int, device: torch.device):
        on_gpu = device.type == "cuda"
        self.max_batch_size, self.max_pages = max_batch_size, max_pages
        self.host = torch.zeros((4 + max_pages) * max_batch_size, dtype=torch.long, pin_memory=on_gpu)
        self.host_array = self.host.numpy()  # the same memory, as numpy: it takes a Python list fast
        self.on_device = torch.zeros(self.host.shape, dtype=torch.long, device=device)
        self.copied = torch.cuda.Event() if on_gpu else None  # recorded after each copy
        n = max_batch_size
        self.input_ids, self.positions = self.on_device[:n], self.on_device[n : 2 * n]

    def send(self, inputs: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy one step's padded inputs to the device; return the page table [size, width], seq_lens [size]
        and new_locations [size] there (input_ids and positions are in ``self.input_ids[:size]`` and
        ``self.positions[:size]``)."""
        n, size, width = self.max_batch_size, len(inputs.seq_lens), len(inputs.page_table[0])
        if size > n or width > self.max_pages:
            raise ValueError(f"{size} requests of {width} pages in buffers for {n} of {self.max_pages}")
        if self.copied is not None:
            self.copied.synchronize()  # the last step's copy may still be reading the host buffer
        host, end = self.host_array, 4 * n + size * width
        for i, values in enumerate((inputs.input_ids, inputs.positions, inputs.seq_lens, inputs.new_locations)):
            host[i * n : i * n + size] = values
        host[4 * n : end].reshape(size, width)[:] = inputs.page_table
        self.on_device[:end].copy_(self.host[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        device = self.on_device
        return device[4 * n : end].view(size, width), device[2 * n : 2 * n + size], device[3 * n : 3 * n + size]
# --8<-- [end:buffers]


class DecodeGraphs:
    """One captured decode step per batch size (a CUDA device, and a backend with graph hooks)."""

    # --8<-- [start:capture]
    def __init__(self, model: CausalLM, backend: AttentionBackend, device: torch.device, sizes: list[int],
                 max_seq_len: int, page_size: int):
        """``sizes``: the batch sizes to capture (``graph_batch_sizes``); ``max_seq_len``: the longest
        sequence a request may reach (the context length): the decode kernel's grid covers it."""
        if not backend.supports_graphs:
            raise ValueError(f"CUDA graphs need an attention backend with graph hooks (triton), not "
                             f"{type(backend).__name__}")
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.backend, self.sizes, self.page_size = model, backend, sizes, page_size
        backend.init_graph_buffers(sizes[-1], max_seq_len)
        self.buffers = DecodeBuffers(sizes[-1], pages_for(max_seq_len, page_size), device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # the largest first: the smaller ones reuse its memory pool
                graph = torch.cuda.CUDAGraph()
                backend.prepare_for_capture(size)  # the buffers hold dummies: only the spare page is touched
                self.run_model(size)  # a warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self.run_model(size)
                pool = graph.pool()
                self.graphs[size] = graph

    def run_model(self, size: int) -> torch.Tensor:
        hidden = self.model(self.buffers.input_ids[:size], self.buffers.positions[:size], self.backend)
        return self.model.logits(hidden)
    # --8<-- [end:capture]

    def fits(self, batch: Batch) -> bool:
        """A decode step of at most the largest size, whose page tables fit the buffers (else: eager)."""
        return (all(new == 1 for new in batch.new_lens) and len(batch.requests) <= self.sizes[-1]
                and max(len(pages) for pages in batch.page_tables) <= self.buffers.max_pages)

    # --8<-- [start:replay]
    def forward(self, batch: Batch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step's logits [requests, vocab], by replaying the graph of the next size up (with
        ``future_tokens``, the engine's future-token map: an overlapped step's stand-ins resolved first)."""
        size = next(s for s in self.sizes if s >= len(batch.requests))
        width = max(len(pages) for pages in batch.page_tables)  # the page table's columns to send
        inputs = padded_decode_inputs(batch, size, width, self.page_size)
        self.backend.prepare_for_replay(*self.buffers.send(inputs))  # device to device: no wait
        if future_tokens is not None and min(batch.input_ids) < 0:
            input_ids = self.buffers.input_ids[:size]
            input_ids.copy_(resolve_future_tokens(input_ids, future_tokens))
        self.graphs[size].replay()  # the kernels recorded at capture, reading the buffers just filled
        # A view of the graph's own logits, which the next replay overwrites: the engine samples from it at
        # once, in the same step (with overlap too: the forward thread runs one whole step at a time).
        return self.logits[size][: len(batch.requests)]
    # --8<-- [end:replay]
