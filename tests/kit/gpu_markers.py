"""When a test marked ``cuda`` or ``ranks(n, backend=...)`` cannot run on this machine, and why.

The root ``conftest.py`` registers the two markers and skips a marked test with the reason this module
gives. The decision is a plain function of the test's marks and of a way to count CUDA GPUs, so that
it can be tested without a GPU; the count is asked for only when a test carries one of the marks,
because it imports torch, which a chapter's torch-free tests should not pay for.
"""

from collections.abc import Callable, Iterable

MARKERS = [
    "cuda: the test needs a CUDA GPU (skipped where torch sees none)",
    'ranks(n, backend="gloo"): the test starts n ranks; with backend "nccl" it needs n CUDA GPUs (skipped otherwise)',
]


def cuda_device_count() -> int:
    import torch  # here, not at the top: only a marked test pays for importing torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def skip_reason(marks: Iterable, count_gpus: Callable[[], int] = cuda_device_count) -> str | None:
    """Why a test with these marks cannot run here, or None if it can."""
    needed, why = 0, ""
    for mark in marks:
        if mark.name == "cuda" and needed < 1:
            needed, why = 1, "needs a CUDA GPU"
        elif mark.name == "ranks":
            n, backend = ranks_args(*mark.args, **mark.kwargs)
            if backend == "nccl" and n > needed:
                needed, why = n, f"needs {n} CUDA GPUs for {n} NCCL ranks"
    if not needed:
        return None
    found = count_gpus()
    return None if found >= needed else f"{why} (found {found})"


def ranks_args(n: int, backend: str = "gloo") -> tuple[int, str]:
    """The arguments of ``@pytest.mark.ranks(n, backend="gloo")``, by position or by name."""
    return n, backend
