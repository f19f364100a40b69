"""Sampling on hand-made distributions, where the right answer is known exactly."""

import pytest
import torch

from minisgl.sampling import SamplingParams, make_generator, sample, top_k_filter, top_p_filter

# probabilities by token id; sorted: 3 (0.4), 0 (0.25), 4 (0.15), 1 (0.1), 5 (0.06), 2 (0.04)
PROBS = torch.tensor([0.25, 0.10, 0.04, 0.40, 0.15, 0.06])


def kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs).flatten().tolist())


@pytest.mark.exercise("top-p")
@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, {3}),  # the top token alone already covers 0.3
        (0.4, {3}),  # exactly 0.4: still just the top token
        (0.41, {3, 0}),
        (0.65, {3, 0}),
        (0.8, {3, 0, 4}),
        (0.9, {3, 0, 4, 1}),
        (0.95, {3, 0, 4, 1, 5}),
        (1.0, {0, 1, 2, 3, 4, 5}),
    ],
)
def test_top_p_keeps_exactly_the_nucleus(p, expected):
    filtered = top_p_filter(PROBS.clone(), p)
    assert kept(filtered) == expected
    torch.testing.assert_close(filtered[list(expected)], PROBS[list(expected)])  # kept values unchanged


@pytest.mark.exercise("top-p")
def test_top_p_always_keeps_the_most_likely_token():
    probs = torch.tensor([0.1, 0.7, 0.2])
    assert kept(top_p_filter(probs, 0.01)) == {1}


@pytest.mark.parametrize("k, expected", [(1, {3}), (2, {3, 0}), (4, {3, 0, 4, 1}), (0, {0, 1, 2, 3, 4, 5})])
def test_top_k_keeps_the_k_most_likely(k, expected):
    assert kept(top_k_filter(PROBS.clone(), k)) == expected


@pytest.mark.exercise("top-p")
def test_sampling_with_top_k_and_top_p_only_draws_from_the_survivors():
    logits = PROBS.log()
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)  # top 4 renormalized: 3, 0, 4 reach 0.8
    rng = make_generator(0)
    assert {sample(logits, params, rng) for _ in range(300)} == {3, 0, 4}


def test_temperature_zero_is_greedy():
    logits = torch.tensor([0.1, 2.0, 1.99, -3.0])
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=1)
    assert all(sample(logits, params, make_generator(seed)) == 1 for seed in range(20))


def test_low_temperature_sharpens_toward_the_top_token():
    logits = PROBS.log()
    rng = make_generator(0)
    draws = [sample(logits, SamplingParams(temperature=0.05), rng) for _ in range(200)]
    assert draws.count(3) == 200


def test_one_seed_gives_one_output_and_different_seeds_differ():
    logits = torch.zeros(1000)  # uniform: any difference in the random stream shows

    def draws(seed):
        rng, params = make_generator(seed), SamplingParams(temperature=1.0)
        return [sample(logits, params, rng) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("max_tokens", 0, "max_tokens"),
    ],
)
def test_out_of_range_parameters_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
