"""The ``cuda`` and ``ranks`` markers: which tests are skipped where, and that the reason says why."""

import pytest

from gpu_markers import skip_reason


def marks(*decorators):
    return [decorator.mark for decorator in decorators]


def no_count():
    raise AssertionError("counted GPUs for a test that needs none (that imports torch for nothing)")


def test_unmarked_and_gloo_tests_run_anywhere_without_asking_for_gpus():
    assert skip_reason(marks(pytest.mark.parametrize("x", [1]), pytest.mark.exercise("rope")), no_count) is None
    assert skip_reason(marks(pytest.mark.ranks(4)), no_count) is None
    assert skip_reason(marks(pytest.mark.ranks(2, backend="gloo")), no_count) is None


def test_cuda_needs_one_gpu():
    assert skip_reason(marks(pytest.mark.cuda), lambda: 0).startswith("needs a CUDA GPU")
    assert skip_reason(marks(pytest.mark.cuda), lambda: 1) is None


NCCL_TWO = [((2, "nccl"), {}), ((2,), {"backend": "nccl"}), ((), {"n": 2, "backend": "nccl"})]


@pytest.mark.parametrize("args, kwargs", NCCL_TWO, ids=["by-position", "backend-by-name", "both-by-name"])
def test_nccl_ranks_need_a_gpu_each(args, kwargs):
    mark = marks(pytest.mark.ranks(*args, **kwargs))
    assert skip_reason(mark, lambda: 1) == "needs 2 CUDA GPUs for 2 NCCL ranks (found 1)"
    assert skip_reason(mark, lambda: 2) is None


def test_the_largest_need_wins():
    reason = skip_reason(marks(pytest.mark.cuda, pytest.mark.ranks(4, backend="nccl")), lambda: 2)
    assert reason == "needs 4 CUDA GPUs for 4 NCCL ranks (found 2)"


def test_the_root_conftest_registers_both_markers(request):
    registered = [line.split(":")[0] for line in request.config.getini("markers")]
    assert "cuda" in registered and 'ranks(n, backend="gloo")' in registered
