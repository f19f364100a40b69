"""``python -m minisgl --shell``, driven through pipes as a terminal would drive it.

A conversation (the second turn must see the first: the model is asked to repeat a word from it),
``/reset`` (afterwards it must not), Ctrl-C in the middle of a long reply (that reply stops, the shell
stays and answers the next turn), and ``/exit``.
"""

import os
import signal
import subprocess
import sys
import threading
import time

from server_process import TEST_SERVER_ARGS


class Shell:
    def __init__(self, root):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minisgl", "--shell", *TEST_SERVER_ARGS], cwd=root, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.output = ""
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        while char := self.process.stdout.read(1):
            self.output += char

    def wait_for(self, text: str, after: int = 0, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, after)) < 0:
            assert self.process.poll() is None or text in self.output[after:], f"the shell ended:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output}"
            time.sleep(0.05)
        return found + len(text)

    def say(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()


def test_the_shell_keeps_a_conversation_resets_and_survives_ctrl_c(request):
    shell = Shell(request.config.minisgl_root)
    try:
        at = shell.wait_for("> ")
        shell.say("My name is Zorblat. Reply with one short sentence.")
        at = shell.wait_for("\n> ", at)
        shell.say("What is my name?")
        at_answer = at
        at = shell.wait_for("\n> ", at)
        assert "Zorblat" in shell.output[at_answer:at], f"the second turn did not see the first:\n{shell.output}"
        shell.say("/reset")
        at = shell.wait_for("(a new conversation)\n> ", at)
        shell.say("What is my name?")
        before = at
        at = shell.wait_for("\n> ", at)
        assert "Zorblat" not in shell.output[before:at], "after /reset the history should be gone"
        shell.say("Write a very long story about the sea, with many chapters.")
        shell.wait_for(" ", at + 1)  # the reply has begun
        shell.process.send_signal(signal.SIGINT)
        at = shell.wait_for("[stopped]\n> ", at)
        shell.say("Say hello.")
        at = shell.wait_for("\n> ", at)
        shell.say("/exit")
        assert shell.process.wait(timeout=30) == 0
    finally:
        if shell.process.poll() is None:
            shell.process.kill()
