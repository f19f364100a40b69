"""Execute the chapters' notebooks, top to bottom, the way a learner would run them.

    python tools/run_notebooks.py            # every chapter; fails if a cell raises
    python tools/run_notebooks.py 01 --write # also store the fresh outputs in the notebook (for the book)

Each notebook runs with its chapter folder as the working directory, so that it imports that
chapter's snapshot. Without ``--write`` the stored notebook is left untouched.
"""

import argparse
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellControlSignal, DeadKernelError

from course import CHAPTERS_DIR, chapters

TIMEOUT_PER_CELL = 600


def run(chapter: str, write: bool) -> float:
    path = CHAPTERS_DIR / chapter / "notebook.ipynb"
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(
        notebook, timeout=TIMEOUT_PER_CELL, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    if write:
        nbformat.write(notebook, path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="Execute the chapters' notebooks.")
    parser.add_argument("chapters", nargs="*", help="chapter numbers (default: all)")
    parser.add_argument("--write", action="store_true", help="store the new outputs in the notebooks")
    args = parser.parse_args()
    failed = []
    for chapter in args.chapters or chapters():
        try:
            print(f"chapter {chapter} notebook: ran in {run(chapter, args.write):.0f}s", flush=True)
        except (CellControlSignal, DeadKernelError) as error:
            # A cell failed, timed out or killed its kernel: report it, go on with the other notebooks.
            print(f"chapter {chapter} notebook: FAILED\n{error}", flush=True)
            failed.append(chapter)
    if failed:
        sys.exit(f"notebooks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
