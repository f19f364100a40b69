"""What every benchmark records about where and on what it ran: the CPU and the commit measured."""

import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(*paths: str) -> str:
    """The commit measured, marked if ``paths`` (the code the benchmark runs) have uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(  # no answer: no note of uncommitted changes
            ["git", "status", "--porcelain", *paths], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
