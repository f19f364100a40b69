"""Each parallel layer against its dense version, in real ranks joined by gloo (float32, tight tolerance).

Every rank makes the same dense weights from a seed, loads its own shard of them the way the weight
loader does (``layer.shard(...).load(full_tensor)``), runs the layer, and sends back what it computed;
the test compares that with the dense computation.
"""

import pytest
import torch
import torch.nn.functional as F

from minisgl.layers import kv_head_shard
from ranks import run_ranks

ATOL = 1e-5


def dense(seed: int, *shape: int) -> torch.Tensor:
    """The same random tensor in every process."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rounded(row: torch.Tensor) -> list[float]:
    return [round(v, 3) for v in row.tolist()]


def rank() -> int:
    from minisgl.distributed import tp_info

    return tp_info().rank


# ---- column-parallel: no communication, each rank its own output features


def column_in_a_rank(in_features: int, out_features: int):
    from minisgl.layers import ColumnParallelLinear

    layer = ColumnParallelLinear(in_features, out_features, bias=True)
    layer.shard("weight").load(dense(1, out_features, in_features))
    layer.shard("bias").load(dense(2, out_features))
    return layer(dense(3, 5, in_features))


@pytest.mark.ranks(3)
@pytest.mark.parametrize("n", [2, 3])
def test_column_parallel_gives_each_rank_its_output_features(n):
    outputs = run_ranks(n, column_in_a_rank, 8, 12)
    expected = F.linear(dense(3, 5, 8), dense(1, 12, 8), dense(2, 12))
    for r, out in enumerate(outputs):
        torch.testing.assert_close(out, expected[:, r * 12 // n : (r + 1) * 12 // n], atol=ATOL, rtol=0)


# ---- row-parallel: a partial product on each rank, summed by an all-reduce, the bias added once


def row_in_a_rank(in_features: int, out_features: int, bias: bool):
    from minisgl.distributed import tp_info
    from minisgl.layers import RowParallelLinear

    layer = RowParallelLinear(in_features, out_features, bias=bias)
    layer.shard("weight").load(dense(1, out_features, in_features))
    if bias:
        layer.shard("bias").load(dense(2, out_features))
    columns = in_features // tp_info().size
    x = dense(3, 5, in_features)[:, rank() * columns : (rank() + 1) * columns]  # what a column layer left it
    return layer(x)


@pytest.mark.ranks(3)
@pytest.mark.exercise("row-parallel", focused=True)
@pytest.mark.parametrize("n", [2, 3])
def test_row_parallel_sums_the_ranks_parts_and_adds_the_bias_once(n):
    x, weight, bias = dense(3, 5, 12), dense(1, 4, 12), dense(2, 4)
    expected = F.linear(x, weight, bias)
    outputs = run_ranks(n, row_in_a_rank, 12, 4, True)
    columns = 12 // n
    for r, out in enumerate(outputs):
        partial = F.linear(x[:, r * columns : (r + 1) * columns], weight[:, r * columns : (r + 1) * columns])
        hint = ""
        if torch.allclose(out, expected + (n - 1) * bias, atol=ATOL):
            hint = f": it is y plus the bias {n - 1} more time(s); every rank added it, so the all-reduce summed {n}"
        elif any(torch.allclose(out, partial + b, atol=ATOL) for b in (0, bias)):
            hint = ": it is this rank's partial product alone; the ranks' parts must be summed (all_reduce)"
        error = (out - expected).abs().max().item()
        assert error <= ATOL, (
            f"at TP {n}, rank {r}'s RowParallelLinear output differs from the dense layer's x W^T + b by up to "
            f"{error:.3g}{hint}"
        )


@pytest.mark.ranks(2)
@pytest.mark.exercise("row-parallel")
def test_row_parallel_without_bias_is_the_sum_of_the_parts():
    expected = F.linear(dense(3, 5, 12), dense(1, 4, 12))
    for out in run_ranks(2, row_in_a_rank, 12, 4, False):
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


# ---- q, k and v: split by query heads, and by KV heads (or one KV head shared by several ranks)


@pytest.mark.exercise("kv-heads", focused=True)
@pytest.mark.parametrize("heads, kv_heads, n", [(4, 2, 2), (4, 2, 4), (9, 3, 3), (9, 3, 9), (8, 8, 4), (8, 1, 2)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(heads, kv_heads, n):
    """Query head h reads KV head h // (heads / kv_heads); a rank holds heads / n query heads, in order."""
    for r in range(n):
        first, count = kv_head_shard(kv_heads, r, n)
        expected_count = max(1, kv_heads // n)
        assert count == expected_count, (
            f"{kv_heads} KV heads over {n} ranks: rank {r} holds {count} KV head(s), expected {expected_count} "
            + ("(the KV heads split evenly)" if kv_heads >= n else "(fewer KV heads than ranks: one, shared)")
        )
        q_per_rank, group = heads // n, heads // kv_heads
        needed = sorted({h // group for h in range(r * q_per_rank, (r + 1) * q_per_rank)})
        assert list(range(first, first + count)) == needed, (
            f"{heads} query heads and {kv_heads} KV heads over {n} ranks: rank {r} holds query heads "
            f"{list(range(r * q_per_rank, (r + 1) * q_per_rank))}, which read KV heads {needed}, but kv_head_shard "
            f"gives it KV heads {list(range(first, first + count))}"
        )


def qkv_in_a_rank(heads: int, kv_heads: int, head_dim: int, hidden: int):
    from minisgl.layers import QKVParallelLinear

    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True)
    for index, seed in enumerate((1, 2, 3)):
        rows = (heads if index == 0 else kv_heads) * head_dim
        layer.shard("weight", index).load(dense(seed, rows, hidden))
        layer.shard("bias", index).load(dense(seed + 10, rows))
    q, k, v = layer(dense(4, 5, hidden)).split(layer.split_sizes, dim=-1)
    return layer.num_heads, layer.num_kv_heads, q, k, v


@pytest.mark.ranks(4)
@pytest.mark.exercise("kv-heads")
@pytest.mark.parametrize("heads, kv_heads, n", [(4, 2, 2), (4, 2, 4), (6, 3, 3)], ids=["split", "shared", "split-3"])
def test_qkv_gives_each_rank_its_heads(heads, kv_heads, n):
    d, hidden = 4, 8
    x = dense(4, 5, hidden)
    q_full, k_full, v_full = (
        F.linear(x, dense(seed, h * d, hidden), dense(seed + 10, h * d)).view(5, h, d)
        for seed, h in ((1, heads), (2, kv_heads), (3, kv_heads))
    )
    for r, (num_heads, num_kv_heads, q, k, v) in enumerate(run_ranks(n, qkv_in_a_rank, heads, kv_heads, d, hidden)):
        first, count = kv_head_shard(kv_heads, r, n)
        assert (num_heads, num_kv_heads) == (heads // n, count)
        torch.testing.assert_close(q.view(5, -1, d), q_full[:, r * num_heads : (r + 1) * num_heads], atol=ATOL, rtol=0)
        torch.testing.assert_close(k.view(5, -1, d), k_full[:, first : first + count], atol=ATOL, rtol=0)
        torch.testing.assert_close(v.view(5, -1, d), v_full[:, first : first + count], atol=ATOL, rtol=0)


# ---- gate and up, fused: each rank its share of both; the whole SwiGLU block against the dense one


def swiglu_in_a_rank(hidden: int, intermediate: int):
    from minisgl.layers import SwiGLU

    mlp = SwiGLU(hidden, intermediate)
    mlp.gate_up.shard("weight", 0).load(dense(1, intermediate, hidden))
    mlp.gate_up.shard("weight", 1).load(dense(2, intermediate, hidden))
    mlp.down.shard("weight").load(dense(3, hidden, intermediate))
    x = dense(4, 5, hidden)
    return mlp.gate_up(x), mlp(x)


@pytest.mark.ranks(3)
@pytest.mark.parametrize("n", [2, 3])
def test_gate_up_holds_a_share_of_each_and_swiglu_matches_dense(n):
    x, gate, up, down = dense(4, 5, 8), dense(1, 12, 8), dense(2, 12, 8), dense(3, 8, 12)
    expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    rows = 12 // n
    for r, (gate_up, out) in enumerate(run_ranks(n, swiglu_in_a_rank, 8, 12)):
        mine = slice(r * rows, (r + 1) * rows)
        mine_of_each = torch.cat((F.linear(x, gate[mine]), F.linear(x, up[mine])), -1)  # [my gate; my up]
        torch.testing.assert_close(gate_up, mine_of_each, atol=ATOL, rtol=0)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


# ---- the vocabulary: embedding (masked lookups, all-reduce) and LM head (all-gather, padding cut)

VOCAB, HIDDEN = 11, 6  # 11 = a vocabulary neither 2 nor 3 ranks divide: the last block is padded
IDS = torch.tensor([0, 10, 5, 3, 4, 6, 7, 10, 0, 8, 9, 1, 2])  # every token, the first and last more than once


def embedding_in_a_rank(ids: torch.Tensor):
    from minisgl.layers import VocabParallelEmbedding

    embed = VocabParallelEmbedding(VOCAB, HIDDEN)
    embed.shard().load(dense(1, VOCAB, HIDDEN))
    return embed.start, embed(ids)


@pytest.mark.ranks(3)
@pytest.mark.exercise("vocab-embedding", focused=True)
@pytest.mark.parametrize("n", [2, 3])
def test_vocab_embedding_finds_every_token_on_every_rank(n):
    table = dense(1, VOCAB, HIDDEN)
    expected = F.embedding(IDS, table)
    for r, (start, out) in enumerate(run_ranks(n, embedding_in_a_rank, IDS)):
        rows = -(-VOCAB // n)
        wrong = [t for t, (got, want) in enumerate(zip(out, expected)) if not torch.allclose(got, want, atol=ATOL)]
        if not wrong:
            continue
        token = int(IDS[wrong[0]])
        owner = token // rows
        where = "its own block" if owner == r else f"rank {owner}'s block; rank {r} holds {start} .. {start + rows - 1}"
        if not out[wrong[0]].any():
            hint = ": it came out as zeros; the ranks' lookups must be summed (all_reduce), one of them found it"
        else:
            hint = (
                ": the ranks' lookups are summed, so a rank must contribute zeros for the tokens outside its block "
                "(shift the ids into the block, look the outsiders up at any valid row, then zero those rows)"
            )
        pytest.fail(
            f"at TP {n}, rank {r} embeds token {token} (from {where}) as {rounded(out[wrong[0]])}, expected "
            f"{rounded(expected[wrong[0]])}{hint}"
        )


def lm_head_in_a_rank(hidden: torch.Tensor):
    from minisgl.layers import ParallelLMHead

    head = ParallelLMHead(VOCAB, HIDDEN)
    head.weight.data.fill_(float("nan"))  # what to_empty may leave: loading must overwrite the padding too
    head.shard().load(dense(1, VOCAB, HIDDEN))
    return head.start, head.weight.data.clone(), head(hidden)


@pytest.mark.ranks(3)
@pytest.mark.parametrize("n", [2, 3])
def test_lm_head_gathers_the_whole_vocabulary_on_every_rank(n):
    table, hidden, rows = dense(1, VOCAB, HIDDEN), dense(2, 4, HIDDEN), -(-VOCAB // n)
    expected = F.linear(hidden, table)
    for r, (start, weight, logits) in enumerate(run_ranks(n, lm_head_in_a_rank, hidden)):
        # rank r holds the contiguous block of tokens r * rows .., the last one padded with zero rows
        assert start == r * rows and weight.shape == (rows, HIDDEN)
        real = max(0, min(rows, VOCAB - start))
        torch.testing.assert_close(weight[:real], table[start : start + real], atol=0, rtol=0)
        assert torch.equal(weight[real:], torch.zeros(rows - real, HIDDEN)), "the padding rows must be zeros"
        assert logits.shape == (4, VOCAB), "the LM head returns exactly vocab_size logits, the padding cut off"
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
