"""A chapter's server as a real process, and the /proc helpers that watch its processes (Linux).

``ServerProcess(root, *args)`` runs ``python -m minisgl --port 0 *args`` with its working directory
set to ``root``, the folder that holds a chapter's ``minisgl/`` (``chapters/02``, the repository root,
a learner's workspace): ``python -m`` puts the working directory first on ``sys.path``, so that folder
decides which copy of the package runs. Every chapter's server logs ``serving NAME at http://HOST:PORT``
once its socket listens; the URL is read from that line, so the port can be 0 (any free one) and no one
has to poll for readiness: a request sent after that line waits in the socket's backlog if need be.

Used by every chapter's tests (the root ``conftest.py`` puts this folder on ``sys.path``) and by
``benchmarks/serve_workload.py``. It never imports ``minisgl``: each chapter imports its own.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# Small and exact: float32 (the oracle compares in float32), 4 KV cache slots, short contexts.
TEST_SERVER_ARGS = ("--dtype", "float32", "--max-running-requests", "4", "--context-length", "512")


class ServerProcess:
    """``python -m minisgl`` on a free port, started from ``root``; a context manager that always stops it.

    Its log (stdout and stderr together) is read on a thread, so that the pipe never fills up and blocks
    the server; ``lines`` holds it, and ``log_path``, if given, gets a copy as it comes (for ``tail -f``).
    ``own_session`` starts it in a new process group, so that ``stop`` can end the whole tree even if the
    server does not stop its children itself (a benchmark wants that; a test of clean shutdown does not).
    """

    def __init__(self, root: Path, *args: str, env: dict | None = None, log_path: Path | None = None,
                 ready_timeout: float = 300, own_session: bool = False):
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # only the working directory decides which minisgl is imported
        self.command = [sys.executable, "-m", "minisgl", "--port", "0", *args]
        self.own_session = own_session
        self.log_path = log_path
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            self.command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=own_session,
        )
        threading.Thread(target=self._read_log, name="minisgl-server-log", daemon=True).start()
        if not self._ready.wait(ready_timeout):
            self.stop()
            raise RuntimeError(f"the server did not serve within {ready_timeout:.0f} s:\n{self.log_tail()}")
        if self.url is None:  # the log ended first
            code = self.process.wait(30)
            raise RuntimeError(f"the server exited with code {code} before serving:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_log(self) -> None:
        log = open(self.log_path, "w", buffering=1) if self.log_path else None
        try:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                if log:
                    log.write(line)
                if self.url is None and " at http://" in line:
                    self.url = line.rsplit(" at ", 1)[1].strip()
                    self._ready.set()
        finally:
            if log:
                log.close()
            self._ready.set()  # the log ended: the server is gone, whether or not it ever served

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.lines[-lines:])

    def descendants(self) -> list[int]:
        return descendants(self.process.pid)

    def stop(self, timeout: float = 30) -> None:
        """Ctrl-C (SIGINT), the way a person stops it; SIGKILL if it has not exited after ``timeout`` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.own_session:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever of its group is still there
            except ProcessLookupError:
                pass  # the group is gone: the server stopped every child itself

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
