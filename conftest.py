"""Options shared by every chapter's tests (introduced in chapter 01).

- ``--learn`` runs a chapter's tests against the learner's workspace ``learn/NN`` (made by
  ``make learn CHAPTER=NN``) instead of the chapter's reference snapshot; ``--learn=PATH`` names
  another workspace folder (one that contains ``minisgl/``).
- ``@pytest.mark.exercise("rope")`` ties a test to an exercise, so that ``-k rope`` selects it.

Which ``minisgl`` a chapter's tests import is decided by that chapter's own ``conftest.py``.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--learn",
        nargs="?",
        const="workspace",
        default=None,
        help="test the learner workspace learn/NN (or the folder given) instead of the reference snapshot",
    )


def pytest_collection_modifyitems(items):
    for item in items:
        for mark in item.iter_markers("exercise"):
            item.extra_keyword_matches.update(mark.args)
