"""Options and markers shared by every chapter's tests (introduced in chapter 01).

- ``--learn`` runs a chapter's tests against the learner's workspace ``learn/NN`` (made by
  ``make learn CHAPTER=NN``) instead of the chapter's reference snapshot; ``--learn=PATH`` names
  another workspace folder (one that contains ``minisgl/``).
- ``@pytest.mark.exercise("rope")`` ties a test to an exercise, so that ``-k rope`` selects it.
  ``@pytest.mark.exercise("rope", focused=True)`` marks the exercise's one focused test: a small, direct
  check whose failure says what is wrong. Focused tests run first (otherwise the order stays as
  collected), so ``-k rope -x`` stops at it; each carries the junit property ``focused_exercise`` for
  ``tools/check_exercises.py``.
- ``@pytest.mark.cuda`` and ``@pytest.mark.ranks(n, backend="gloo")`` skip a test, with the reason,
  on a machine without the GPUs it needs (``tests/kit/gpu_markers.py`` decides).
- The shared test kit ``tests/kit/`` (the server as a process, the OpenAI contract tests) is importable
  from every chapter's tests: ``from server_process import ServerProcess``.

Which ``minisgl`` a chapter's tests import is decided by that chapter's own ``conftest.py``; nothing
here imports it.
"""

import sys
from pathlib import Path

import pytest

# pytest loads this file for every run from the repository root, before any chapter's test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests" / "kit"))
# The contract's tests run from a chapter's module but live in the kit: have pytest rewrite their asserts
# too, so that a failure shows the values compared, not a bare AssertionError.
pytest.register_assert_rewrite("openai_contract")

from gpu_markers import MARKERS, skip_reason  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--learn",
        nargs="?",
        const="workspace",
        default=None,
        help="test the learner workspace learn/NN (or the folder given) instead of the reference snapshot",
    )


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def is_focused(item) -> bool:
    return any(mark.kwargs.get("focused") for mark in item.iter_markers("exercise"))


def pytest_collection_modifyitems(items):
    for item in items:
        for mark in item.iter_markers("exercise"):
            item.extra_keyword_matches.update(mark.args)
            if mark.kwargs.get("focused"):
                item.user_properties.extend(("focused_exercise", name) for name in mark.args)
    # A stable sort: the focused tests move to the front, everything else keeps its order.
    items.sort(key=lambda item: not is_focused(item))


def pytest_runtest_setup(item):
    reason = skip_reason(item.iter_markers())
    if reason:
        pytest.skip(reason)
