"""A server as a real process tree, and the /proc helpers that watch its processes (Linux)."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVER_ARGS = ["--dtype", "float32", "--max-running-requests", "4", "--context-length", "512"]


class ServerProcess:
    """``python -m minisgl`` as a real process tree, on a free port. Its log is read on a thread, so
    that the pipe never fills up; ``url`` is known once the server logs that it is serving."""

    def __init__(self, root: Path, *args: str, ready_timeout: float = 300):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minisgl", "--port", "0", *SERVER_ARGS, *args],
            cwd=root, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.serving = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self.serving.wait(ready_timeout) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-30:]))

    def _read_log(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if " at http://" in line and self.url is None:
                self.url = line.rsplit(" at ", 1)[1].strip()
                self.serving.set()
        self.serving.set()  # the log ended: the server is gone

    def descendants(self) -> list[int]:
        return descendants(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until_gone(pids: list[int], timeout: float = 20) -> list[int]:
    """The pids still alive after a bounded wait for them to exit."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if is_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
