"""Execute the chapters' notebooks, top to bottom, the way a learner would run them.

    python tools/run_notebooks.py            # every chapter; fails if a cell raises
    python tools/run_notebooks.py 01 --write # also store the fresh outputs in the notebook (for the book)

Each notebook runs with its chapter folder as the working directory, so that it imports that
chapter's snapshot. Without ``--write`` the stored notebook is left untouched. With ``--write`` it
runs in a clean checkout (a temporary clone of HEAD, with this working tree's notebooks), so the
outputs the book shows come from the committed code and not from whatever else this folder holds.
The notebooks print paths relative to the repository; a test rejects stored outputs that contain
an absolute path of the machine that ran them.

Stored outputs go stale when the code they ran moves: freezing chapter NN (``tools/chapters.py freeze``)
turns the tip's ``minisgl/`` into ``chapters/NN/minisgl/``, and a notebook run before that still says it
imported ``minisgl/__init__.py``. Re-run the frozen chapter's notebook with ``--write`` then; a test
(tests/test_repository.py) checks that each notebook's recorded copy of the package is its own chapter's.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellControlSignal, DeadKernelError

from course import CHAPTERS_DIR, REPO_ROOT, chapters

TIMEOUT_PER_CELL = 600


def run(chapter: str, write: bool, checkout: Path = REPO_ROOT) -> float:
    """Execute chapter's notebook in ``checkout``; with ``write``, store the outputs in this working tree's copy."""
    path = checkout / "chapters" / chapter / "notebook.ipynb"
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(
        notebook, timeout=TIMEOUT_PER_CELL, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    if write:
        nbformat.write(notebook, CHAPTERS_DIR / chapter / "notebook.ipynb")
    return time.perf_counter() - started


def clean_checkout(into: Path) -> Path:
    """A clone of HEAD with this working tree's notebooks copied in: where ``--write`` executes them."""
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(into)], check=True)
    for chapter in chapters():
        shutil.copy(CHAPTERS_DIR / chapter / "notebook.ipynb", into / "chapters" / chapter / "notebook.ipynb")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description="Execute the chapters' notebooks.")
    parser.add_argument("chapters", nargs="*", help="chapter numbers (default: all)")
    parser.add_argument("--write", action="store_true", help="store the new outputs in the notebooks")
    args = parser.parse_args()
    failed = []
    with tempfile.TemporaryDirectory(prefix="minisgl-notebooks-") as tmp:
        checkout = clean_checkout(Path(tmp) / "checkout") if args.write else REPO_ROOT
        for chapter in args.chapters or chapters():
            try:
                seconds = run(chapter, args.write, checkout)
                print(f"chapter {chapter} notebook: ran in {seconds:.0f}s", flush=True)
            except (CellControlSignal, DeadKernelError) as error:
                # A cell failed, timed out or killed its kernel: report it, go on with the other notebooks.
                print(f"chapter {chapter} notebook: FAILED\n{error}", flush=True)
                failed.append(chapter)
    if failed:
        sys.exit(f"notebooks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
