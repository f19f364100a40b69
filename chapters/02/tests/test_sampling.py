"""Batched sampling: every row keeps its own parameters and its own random stream."""

import pytest
import torch

from minisgl.sampling import SamplingParams, make_generator, sample, top_k_top_p

# one distribution, already sorted from most to least likely
SORTED = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])


def kept(row: torch.Tensor) -> int:
    """How many of the most likely tokens survive (they are always a prefix of a sorted row)."""
    return int((row > 0).sum())


@pytest.mark.exercise("batched-top-p")
def test_each_row_is_cut_by_its_own_top_k_and_top_p():
    rows = SORTED.repeat(6, 1)
    top_k = torch.tensor([0, 0, 0, 2, 4, 1])
    top_p = torch.tensor([1.0, 0.65, 0.66, 1.0, 0.8, 0.9])
    out = top_k_top_p(rows, top_k, top_p)
    # row 1: 0.40 + 0.25 reach 0.65 exactly; row 2 needs a third token; row 4: the top 4 renormalized
    # (0.444, 0.278, 0.167, 0.111) reach 0.8 with three tokens
    assert [kept(r) for r in out] == [6, 2, 3, 2, 3, 1]
    for row in out:
        assert torch.all(row[: kept(row)] > 0) and torch.all(row[kept(row) :] == 0)
        torch.testing.assert_close(row[: kept(row)] / row[0], SORTED[: kept(row)] / SORTED[0])  # proportions kept


@pytest.mark.exercise("batched-top-p")
def test_rows_do_not_leak_into_each_other():
    rows = torch.stack([SORTED, torch.tensor([0.9, 0.05, 0.03, 0.01, 0.005, 0.005])])
    alone = [top_k_top_p(r[None], torch.tensor([0]), torch.tensor([0.8]))[0] for r in rows]
    together = top_k_top_p(rows, torch.tensor([0, 0]), torch.tensor([0.8, 0.8]))
    torch.testing.assert_close(together, torch.stack(alone))


@pytest.mark.exercise("batched-top-p")
def test_sampling_draws_only_from_the_survivors():
    logits = SORTED.log()[None].repeat(2, 1)
    params = [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_k=3)]
    generators = [make_generator(0), make_generator(1)]
    draws = [sample(logits, params, generators) for _ in range(300)]
    assert {d[0] for d in draws} == {0, 1} and {d[1] for d in draws} == {0, 1, 2}


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams()]
    tokens = sample(logits, params, [make_generator(None), make_generator(1), make_generator(None)])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    logits = torch.zeros(4, 1000)

    def draws(batch_params, row):
        generators = [make_generator(p.seed) for p in batch_params]
        return [sample(logits[: len(batch_params)], batch_params, generators)[row] for _ in range(10)]

    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = draws([seeded], 0)
    others = [SamplingParams(temperature=0.5, top_k=5, seed=3), SamplingParams(), seeded,
              SamplingParams(temperature=1.0)]
    crowded = draws(others, 2)
    assert alone == crowded
    assert alone != draws([SamplingParams(temperature=1.0, seed=8)], 0)
