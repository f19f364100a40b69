"""Make this chapter's tests import this chapter's ``minisgl``.

Without ``--learn``: the reference snapshot, which is ``chapters/NN/minisgl/`` once a later chapter
has frozen it, and the top-level ``minisgl/`` while this is the newest chapter (the nearest folder
above that has a ``minisgl/``). With ``--learn``: the learner's workspace ``learn/NN/``.
"""

import sys
from pathlib import Path

import pytest

CHAPTER_DIR = Path(__file__).resolve().parent
REPO_ROOT = CHAPTER_DIR.parent.parent


def snapshot_root(start: Path) -> Path:
    return next(folder for folder in (start, *start.parents) if (folder / "minisgl").is_dir())


def pytest_configure(config):
    learn = config.getoption("--learn")
    if learn is None:
        root = snapshot_root(CHAPTER_DIR)
    else:
        root = REPO_ROOT / "learn" / CHAPTER_DIR.name if learn == "workspace" else Path(learn).resolve()
        if not (root / "minisgl").is_dir():
            raise pytest.UsageError(
                f"no learner workspace at {root}: create it with `make learn CHAPTER={CHAPTER_DIR.name}`"
            )
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "minisgl" or m.startswith("minisgl.")]:
        del sys.modules[name]  # never keep a minisgl imported from elsewhere
    config.minisgl_root = root
