"""CUDA graphs of decode steps: the padding, the buffers and the backend's graph hooks on any machine, capture
and replay on a GPU.

A graph replays fixed shapes, so a batch is padded up to the next captured size with dummy requests that
touch only the spare page. The padding is plain Python, and the buffers a replay reads are filled by
ordinary tensor copies: both are tested here on the CPU, the triton backend's hooks with its kernels in
Triton's interpreter. Whether a replayed graph says what the eager engine says needs a GPU (marked
``cuda``, skipped elsewhere with the reason).
"""

import pytest
import torch

from minisgl.attention import make_backend
from minisgl.attention.paged import SPARE_PAGE, new_token_locations, padded_locations
from minisgl.core import Batch, Request, SamplingParams
from minisgl.engine import Engine
from minisgl.engine.graphs import DecodeBuffers, DecodeGraphs, graph_batch_sizes, padded_decode_inputs
from minisgl.kv_cache import KVCache


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


def test_new_locations_are_where_the_gather_reads_them():
    """The one function that places new tokens (both backends' prepare, and the padding above) agrees with the
    padded locations the torch backend gathers from: a prompt after cached pages, a decode token, a whole prompt."""
    page_size = 4
    after_cache = Request("a", list(range(1, 11)), SamplingParams(), pages=[6, 2, 9])
    after_cache.cached_len = 4  # its first page is cached: 6 new tokens, positions 4 .. 9
    batch = Batch([after_cache, decode_request("b", [3, 5], 7), Request("c", [1, 2, 3], SamplingParams(), pages=[8])],
                  [6, 1, 3])
    gathered = padded_locations([r.pages for r in batch.requests], batch.seq_lens, page_size)
    expected = [row for b, (seq_len, new) in enumerate(zip(batch.seq_lens, batch.new_lens))
                for row in gathered[b, seq_len - new : seq_len].tolist()]
    assert new_token_locations(batch, page_size) == expected == [2 * 4, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4,
                                                                 9 * 4 + 1, 5 * 4 + 2, 8 * 4, 8 * 4 + 1, 8 * 4 + 2]
    short = Request("d", list(range(1, 10)), SamplingParams(), pages=[4])  # 9 tokens, one page of 4
    with pytest.raises(ValueError, match="9 tokens but 1 pages"):
        new_token_locations(Batch([short], [9]), page_size)


def test_buffers_send_one_step_packed_and_only_the_pages_in_use():
    buffers = DecodeBuffers(max_batch_size=8, max_pages=6, device=torch.device("cpu"))
    requests = [decode_request("a", [3, 7], 6), decode_request("b", [5], 1), decode_request("c", [2, 9, 4], 12)]
    inputs = padded_decode_inputs(Batch(requests, [1, 1, 1]), 4, 3, 4)  # 3 columns: the widest request's
    page_table, seq_lens, new_locations = buffers.send(inputs)
    assert buffers.input_ids[:4].tolist() == inputs.input_ids
    assert buffers.positions[:4].tolist() == inputs.positions
    assert page_table.tolist() == inputs.page_table and page_table.shape == (4, 3)
    assert seq_lens.tolist() == inputs.seq_lens and new_locations.tolist() == inputs.new_locations
    with pytest.raises(ValueError, match="7 pages"):  # wider than the context allows
        buffers.send(padded_decode_inputs(Batch([decode_request("d", list(range(1, 8)), 25)], [1]), 1, 7, 4))


def test_the_torch_backend_has_no_graph_hooks():
    cache = KVCache(1, 4, 4, 2, 8, torch.float32, "cpu")
    backend = make_backend("torch", cache)
    assert backend.supports_graphs is False
    with pytest.raises(NotImplementedError, match="TorchBackend has no CUDA graphs"):
        backend.init_graph_buffers(8, 64)
    with pytest.raises(ValueError, match="graph hooks"):
        DecodeGraphs(None, backend, torch.device("cpu"), [1, 2], 64, 4)


def test_triton_graph_hooks_attend_as_the_eager_backend_does():
    """What a replay runs, without the graph: the backend prepared for capture (views of its buffers, the grid
    for the whole context), its buffers filled for a step, then one layer. Rows and cache as eager; the dummy
    writes the spare page only. Two steps, the second narrower: the columns it leaves hold the first's pages."""
    pytest.importorskip("triton", reason="Triton is available on Linux only: its kernels cannot run here")
    page_size, max_seq_len, kv_heads, heads, head_dim = 4, 32, 2, 4, 16
    torch.manual_seed(0)
    eager_cache = KVCache(1, 12, page_size, kv_heads, head_dim, torch.float32, "cpu")
    eager_cache.k.normal_(), eager_cache.v.normal_()
    eager_cache.k[:, :page_size] = eager_cache.v[:, :page_size] = 0  # the spare page, as the graph leaves it
    graph_cache = KVCache(1, 12, page_size, kv_heads, head_dim, torch.float32, "cpu")
    graph_cache.k.copy_(eager_cache.k), graph_cache.v.copy_(eager_cache.v)
    eager, graphed = make_backend("triton", eager_cache), make_backend("triton", graph_cache)
    graphed.init_graph_buffers(8, max_seq_len)
    graphed.prepare_for_capture(4)
    buffers = DecodeBuffers(8, max_seq_len // page_size, torch.device("cpu"))
    steps = [[decode_request("a", [3, 7, 10, 1], 14), decode_request("b", [5], 2), decode_request("c", [2, 9], 8)],
             [decode_request("d", [11], 3), decode_request("e", [4, 6], 5)]]
    for requests in steps:
        batch = Batch(requests, [1] * len(requests))
        q = torch.randn(4, heads, head_dim)
        k, v = torch.randn(4, kv_heads, head_dim), torch.randn(4, kv_heads, head_dim)
        eager.prepare(batch, torch.tensor(batch.positions))
        expected = eager.forward(q[: len(requests)], k[: len(requests)], v[: len(requests)], 0)
        width = max(len(r.pages) for r in requests)
        graphed.prepare_for_replay(*buffers.send(padded_decode_inputs(batch, 4, width, page_size)))
        out = graphed.forward(q, k, v, 0)
        torch.testing.assert_close(out[: len(requests)], expected)
        rows = slice(page_size, None)  # every page but the spare: the same keys and values in both caches
        assert torch.equal(graph_cache.k[:, rows], eager_cache.k[:, rows])
        assert torch.equal(graph_cache.v[:, rows], eager_cache.v[:, rows])
    # the second step wrote 2 columns ("d" padded with the spare page, "e"); past them, the first step's "a"
    assert graphed.graph_buffers.page_table[:2, :4].tolist() == [[11, SPARE_PAGE, 10, 1], [4, 6, 0, 0]]


@pytest.mark.cuda
def test_graphs_say_what_the_eager_engine_says(tiny_llama):
    """Greedy decode of a batch of 3 (the graph of 4, one dummy) with and without graphs: the same tokens."""
    from minisgl.messages import UserRequest, pack_ids
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
                for result in output.outputs:
                    if result.token >= 0:
                        out[result.uid].append(result.token)
        return out

    assert torch.cuda.is_available()
    assert tokens(8) == tokens(0)
