"""``python -m minisgl --shell``: chat with the model in the terminal (introduced in chapter 06).

The reply streams as it is generated; the conversation so far goes with every turn, so the radix cache
finds it and only the new turn is prefilled. ``/reset`` starts a new conversation, ``/exit`` (or
Ctrl-D) leaves. Ctrl-C while a reply streams stops that reply and keeps the shell: the signal only
raises a flag, and the flag is read between two steps of the scheduler, so a step is never cut in the
middle, and the stopped request's pages go back to the pool.

No server and no processes: the shell drives an ``LLM`` (``llm.py``) in this process.
"""

import signal
import sys

from .core import SamplingParams

HELP = "Type a message. /reset starts over, /exit leaves (or Ctrl-D); Ctrl-C stops a reply."


def run_shell(llm, params: SamplingParams, read=input, write=sys.stdout.write) -> int:
    write(f"minisgl shell, {llm.config.model_name}. {HELP}\n")
    history: list[dict] = []
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a new prompt, as shells do
            write("\n")
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            write("(a new conversation)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply, stopped = stream_reply(llm, history, params, write)
        if reply is None:  # refused: forget the turn
            history.pop()
            continue
        write(" [stopped]\n" if stopped else "\n")
        history.append({"role": "assistant", "content": reply})


# --8<-- [start:stream-reply]
def stream_reply(llm, history: list[dict], params: SamplingParams, write) -> tuple[str | None, bool]:
    """Stream one reply (None: refused); Ctrl-C meanwhile only sets a flag that the generation loop reads
    between steps."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    reply = ""
    try:
        for piece in llm.stream_chat(history, params, should_stop=lambda: bool(interrupted)):
            reply += piece
            write(piece)
            sys.stdout.flush()
    except ValueError as error:  # say, the conversation no longer fits in the context
        write(f"error: {error}; /reset to start over\n")
        reply = None
    finally:
        signal.signal(signal.SIGINT, previous)
    return reply, bool(interrupted)
# --8<-- [end:stream-reply]
