"""CUDA graphs of decode steps: the padding and buffers on any machine, capture and replay on a GPU.

A graph replays fixed shapes, so a batch is padded up to the next captured size with dummy requests that
touch only the spare page. The padding is plain Python: tested here on the CPU. Whether a replayed graph
says what the eager engine says needs a GPU (marked ``cuda``, skipped elsewhere with the reason).
"""

import pytest
import torch

from minisgl.attention.paged import SPARE_PAGE
from minisgl.core import Batch, Request, SamplingParams
from minisgl.engine import Engine
from minisgl.engine.graphs import graph_batch_sizes, padded_decode_inputs


def test_graph_batch_sizes_cover_every_batch_with_few_graphs():
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]
    sizes = graph_batch_sizes(100)
    for batch in range(1, 101):  # every batch has a graph, and at most 7 dummies above 8
        size = next(s for s in sizes if s >= batch)
        assert size - batch <= max(7, batch - 1)


def decode_request(uid: str, pages: list[int], length: int) -> Request:
    """A running request whose next token is at position ``length - 1`` (its cached_len is one less)."""
    request = Request(uid, list(range(1, length)), SamplingParams(), output_ids=[42], pages=pages)
    request.cached_len = length - 1
    return request


def test_padding_adds_dummies_that_touch_only_the_spare_page():
    page_size, max_pages = 4, 6
    requests = [decode_request("a", [3, 7], 6), decode_request("b", [5], 1), decode_request("c", [2, 9, 4], 12)]
    batch = Batch(requests, [1, 1, 1])
    inputs = padded_decode_inputs(batch, 8, max_pages, page_size)
    assert inputs.input_ids[:3] == batch.input_ids and inputs.input_ids[3:] == [0] * 5
    assert inputs.positions == [5, 0, 11] + [0] * 5
    assert inputs.seq_lens == [6, 1, 12] + [1] * 5
    assert inputs.page_table[0] == [3, 7, 0, 0, 0, 0] and inputs.page_table[2] == [2, 9, 4, 0, 0, 0]
    assert all(row == [SPARE_PAGE] * max_pages for row in inputs.page_table[3:])
    # position 5 of "a" is page 7, slot 1; position 0 of "b" is page 5, slot 0; position 11 of "c" page 4, slot 3
    assert inputs.new_locations == [7 * 4 + 1, 5 * 4, 4 * 4 + 3] + [SPARE_PAGE * page_size] * 5
    with pytest.raises(ValueError, match="do not fit"):
        padded_decode_inputs(batch, 2, max_pages, page_size)


@pytest.mark.cuda
def test_graphs_say_what_the_eager_engine_says(tiny_llama):
    """Greedy decode of a batch of 3 (the graph of 4, one dummy) with and without graphs: the same tokens."""
    from minisgl.messages import UserRequest, pack_ids, unpack_ids
    from minisgl.scheduler import Scheduler

    def tokens(graph_max_bs: int) -> dict[str, list[int]]:
        engine = Engine(tiny_llama, "float32", "cuda", 41, 4, 128, attention_backend="triton",
                        cuda_graph_max_bs=graph_max_bs)
        assert (engine.graphs is not None) == bool(graph_max_bs)
        scheduler = Scheduler(engine, 4, 64, {255}, "radix")
        for uid, prompt in {"a": [5, 6, 7], "b": list(range(10, 30)), "c": [9] * 13}.items():
            params = SamplingParams(max_tokens=12, ignore_eos=True)
            scheduler.handle(UserRequest(uid, pack_ids(prompt), params))
        out: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        while scheduler.has_work:
            if (output := scheduler.step()) is not None:
                for uid, token in zip(output.uids, unpack_ids(output.token_ids)):
                    if token >= 0:
                        out[uid].append(token)
        return out

    assert torch.cuda.is_available()
    assert tokens(8) == tokens(0)
