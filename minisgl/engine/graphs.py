"""CUDA graphs for decode steps (introduced in chapter 06).

A decode step of a small model on a GPU is mostly waiting for Python: hundreds of kernel launches,
each a few microseconds of CPU for a few microseconds of GPU work. A CUDA graph records the launches of
one step once and replays them with a single call. The price: a graph replays exactly what it recorded,
the same kernels on the same memory with the same shapes. So

- the inputs live in **static buffers**, allocated once; each step copies its values into them;
- a graph is captured for each of a few **batch sizes** (``graph_batch_sizes``); a batch of 5 runs the
  graph of 8, **padded** with 3 dummy requests that read and write only the spare page (page 0, which
  no request owns), and their logits are ignored;
- the decode kernel's grid must not depend on the batch's lengths: it is sized for the whole context.

Prefill and mixed steps (shapes that change every time) run eagerly, as before. The padding is plain
Python and is tested on the CPU; capturing and replaying need a GPU.
"""

from dataclasses import dataclass

import torch

from ..core import SPARE_PAGE, Batch


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
    """The batch's decode inputs, then ``size - len(batch)`` dummy requests: token 0 at position 0, a
    page table of spare pages only, length 1, writing its key and value into the spare page."""
    requests = batch.requests
    # --8<-- [start:ex-pad-decode]
    if len(requests) > size:
        raise ValueError(f"{len(requests)} requests do not fit in a graph of {size}")
    dummies = size - len(requests)
    rows = [request.pages + [SPARE_PAGE] * (max_pages - len(request.pages)) for request in requests]
    new_locations = [
        request.pages[position // page_size] * page_size + position % page_size for request, position
        in zip(requests, batch.positions)
    ]
    return DecodeInputs(
        input_ids=batch.input_ids + [0] * dummies,
        positions=batch.positions + [0] * dummies,
        page_table=rows + [[SPARE_PAGE] * max_pages] * dummies,
        seq_lens=batch.seq_lens + [1] * dummies,
        new_locations=new_locations + [SPARE_PAGE * page_size] * dummies,
    )
    # --8<-- [end:ex-pad-decode]
# --8<-- [end:pad-decode]


class DecodeGraphs:
    """One captured decode step per batch size, over static input buffers (a CUDA device only)."""

    # --8<-- [start:capture]
    def __init__(self, engine, max_batch_size: int):
        if engine.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        backend, cache = engine.attention, engine.kv_cache
        if not hasattr(backend, "use_static"):
            raise ValueError("CUDA graphs need the triton attention backend")
        self.engine, self.sizes = engine, graph_batch_sizes(max_batch_size)
        self.max_pages = -(-engine.context_length // cache.page_size)
        device, largest = engine.device, self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.page_table = torch.zeros(largest, self.max_pages, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.new_locations = torch.zeros(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory pool
                graph = torch.cuda.CUDAGraph()
                self.bind(size)
                self.run_model(size)  # a warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self.run_model(size)
                pool = graph.pool()
                self.graphs[size] = graph

    def bind(self, size: int) -> None:
        self.engine.attention.use_static(self.page_table[:size], self.seq_lens[:size], self.new_locations[:size],
                                         max_seq_len=self.engine.context_length)

    def run_model(self, size: int) -> torch.Tensor:
        model = self.engine.model
        return model.logits(model(self.input_ids[:size], self.positions[:size], self.engine.attention))
    # --8<-- [end:capture]

    def fits(self, batch: Batch) -> bool:
        return all(new == 1 for new in batch.new_lens) and len(batch.requests) <= self.sizes[-1]

    # --8<-- [start:replay]
    def forward(self, batch: Batch) -> torch.Tensor:
        """The decode step's logits [requests, vocab], by replaying the graph of the next size up."""
        size = next(s for s in self.sizes if s >= len(batch.requests))
        inputs = padded_decode_inputs(batch, size, self.max_pages, self.engine.kv_cache.page_size)
        for buffer, values in ((self.input_ids, inputs.input_ids), (self.positions, inputs.positions),
                               (self.page_table, inputs.page_table), (self.seq_lens, inputs.seq_lens),
                               (self.new_locations, inputs.new_locations)):
            buffer[:size].copy_(torch.tensor(values, dtype=buffer.dtype))
        self.graphs[size].replay()  # the kernels recorded at capture, reading the buffers just filled
        return self.logits[size][: len(batch.requests)]
    # --8<-- [end:replay]
