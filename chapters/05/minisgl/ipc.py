"""ZMQ sockets between the server's processes (introduced in chapter 03).

Every link is one-way PUSH -> PULL: a PUSH socket queues messages and sends them as the other side
can take them, a PULL socket receives them in order. The long-lived receiving side binds; senders
connect (ZMQ reconnects by itself, so start-up order does not matter).

Addresses are ``ipc://`` files in a temporary folder made for each server, so two servers on one
machine never collide; the folder is removed at shutdown.
"""

from dataclasses import dataclass
from pathlib import Path

import zmq


@dataclass(frozen=True)
class Addresses:
    tokenizer: str  # PULL side: the tokenizer workers (the API server binds here: see tokenizer_socket)
    scheduler: str
    detokenizer: str
    api_server: str

    @classmethod
    def in_folder(cls, folder: str | Path) -> "Addresses":
        return cls(*(f"ipc://{Path(folder) / name}.ipc" for name in ("tokenizer", "scheduler", "detokenizer", "api")))


def pull_socket(context: zmq.Context, address: str, bind: bool = True) -> zmq.Socket:
    socket = context.socket(zmq.PULL)
    socket.bind(address) if bind else socket.connect(address)
    return socket


def push_socket(context: zmq.Context, address: str, bind: bool = False) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)  # at shutdown, drop what is unsent rather than hang
    socket.bind(address) if bind else socket.connect(address)
    return socket


def receive_all(socket: zmq.Socket, decoder, timeout_ms: int | None) -> list:
    """Wait up to ``timeout_ms`` (None: forever, 0: not at all) for a message, then take every
    message already queued, so one loop iteration handles a whole burst."""
    messages = []
    if socket.poll(timeout_ms):
        while True:
            try:
                messages.append(decoder.decode(socket.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
    return messages
