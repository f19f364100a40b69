"""The API server's side of the sockets, and the state of the server as the API sees it (introduced in chapter 03).

HTTP handlers run on the asyncio event loop. ``Frontend.generate`` sends a ``TokenizeRequest`` per
choice to the tokenizer workers and yields the outputs that the detokenizer sends back. One task,
``receive_loop``, reads the API server's socket and hands each output to the queue of the request it
belongs to. If the client goes away first, the handler sends an ``AbortRequest``, which frees the
request's KV cache pages in the scheduler.

The frontend also owns what the API reports about the server: whether a worker process died (then
every request fails, and new ones are refused with ``WorkersDown``), and the scheduler's counts. From
chapter 06 on it also refuses a request at once (``Overloaded``) when too many are in flight, and
records each request's timing and outcome for ``/metrics`` and the log (``metrics.py``). In the complete
server, a reply whose own constraint reached a dead end ends as a refusal (``dead_end``), not a failure, and
``decode`` asks a tokenizer worker for the text of token ids (this process holds no tokenizer).
"""

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ..ipc import Addresses, pull_socket, push_socket
from ..messages import (
    COUNTS,
    DEAD_END,
    AbortRequest,
    DecodedText,
    DecodeRequest,
    FlushCache,
    Refusal,
    ToAPIServer,
    TokenizeError,
    TokenizeRequest,
    TokenText,
    decoder,
    encode,
    pack_ids,
)
from .metrics import Metrics, RequestRecord

logger = logging.getLogger(__name__)


class WorkersDown(Exception):
    """A worker process died: the server cannot run requests any more."""


class Overloaded(Exception):
    """More requests are in flight than the server accepts (``--max-queued-requests``): come back later."""


class DecodeFailed(Exception):
    """A tokenizer could not turn token ids into text (``Frontend.decode``); ``error`` says why, for a 400."""

    def __init__(self, error: TokenizeError):
        super().__init__(error.message)
        self.error = error


@dataclass
class Output:
    text: str
    finish_reason: str | None  # None while running; then "stop", "length", "abort" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: TokenizeError | None = None  # the request was refused before it ran
    logprobs: list[TokenText] = field(default_factory=list)  # of the tokens this text came from, if asked for
    matched_stop: str | int | None = None  # the stop string, stop pattern, or EOS or stop token that ended it
    matched_text: str = ""  # the text of what ended it, left out of the reply (no_stop_trim puts it back)
    prompt_logprobs: list[TokenText] = field(default_factory=list)  # with its first output, if asked for


class Frontend:
    def __init__(self, addresses: Addresses, counts=None, max_in_flight: int = 0):
        """``counts``: the shared array the scheduler writes its ``COUNTS`` into (None in tests);
        ``max_in_flight``: requests (choices) accepted at once, running or waiting (0: no limit)."""
        self.context = zmq.asyncio.Context()
        self.to_tokenizers = push_socket(self.context, addresses.tokenizer, bind=True)
        self.inbox = pull_socket(self.context, addresses.api_server)
        # uid -> (the queue of the HTTP request it belongs to, its choice index there)
        self.routes: dict[str, tuple[asyncio.Queue, int]] = {}
        self.failure: str | None = None  # set when a worker process died: every request fails
        self.counts = counts
        self.max_in_flight = max_in_flight
        self.metrics = Metrics()  # create_app puts one labelled with the served model's name in its place

    def state(self) -> dict:
        if self.counts is None:
            return {}
        state = dict(zip(COUNTS, self.counts[:]))
        state["prefix_hit_rate"] = round(state["cached_tokens"] / max(state["prompt_tokens"], 1), 4)
        # pages requests hold, their own and the cached prefixes they lock: neither free nor evictable
        state["used_pages"] = state["total_pages"] - state["free_pages"] - state["evictable_pages"]
        state["api_in_flight"] = len(self.routes)  # requests the API server still routes outputs to
        return state

    # --8<-- [start:receive-loop]
    async def receive_loop(self) -> None:
        messages = decoder(ToAPIServer)
        while True:
            message = messages.decode(await self.inbox.recv())
            if isinstance(message, TokenizeError):
                self.deliver(message.uid, Output("", "error", error=message))
                continue
            if isinstance(message, DecodedText):  # the answer to ``decode``
                self.deliver(message.uid, Output(message.text, "stop"))
                continue
            if isinstance(message, Refusal):  # the scheduler's: its constraint does not compile (a 400)
                error = TokenizeError(message.uid, message.message, constraint_param(message.constraint))
                self.deliver(message.uid, Output("", "error", error=error))
                continue
            for i, uid in enumerate(message.uids):
                output = Output(message.texts[i], message.finish_reasons[i], message.prompt_tokens[i],
                                message.completion_tokens[i], message.cached_tokens[i],
                                logprobs=message.logprobs[i] if message.logprobs else [],
                                matched_stop=message.matched_stops[i] if message.matched_stops else None,
                                matched_text=message.matched_texts[i] if message.matched_texts else "",
                                prompt_logprobs=message.prompt_logprobs[i] if message.prompt_logprobs else [])
                self.deliver(uid, output)

    def deliver(self, uid: str, output: Output) -> None:
        route = self.routes.get(uid)
        if route is not None:  # else: the request was abandoned; drop its late outputs
            queue, index = route
            queue.put_nowait((index, output))
    # --8<-- [end:receive-loop]

    async def decode(self, ids: list[int]) -> str:
        """The text of token ids, from a tokenizer worker (this process holds no tokenizer): one round trip,
        answered before the request whose echo needs it is sent, so that nothing waits on the order in which
        the tokenizer's and the detokenizer's messages arrive. Raises ``WorkersDown``, or ``DecodeFailed``
        with the tokenizer's refusal (ids outside the vocabulary)."""
        if self.failure:
            raise WorkersDown(self.failure)
        uid, outputs = f"decode-{uuid.uuid4().hex}", asyncio.Queue()
        self.routes[uid] = (outputs, 0)
        try:
            await self.to_tokenizers.send(encode(DecodeRequest(uid, pack_ids(ids))))
            _, output = await outputs.get()
        finally:
            self.routes.pop(uid, None)
        if output.error is not None:
            raise DecodeFailed(output.error)
        if output.finish_reason == "error":
            raise WorkersDown(self.failure or "a worker process died")
        return output.text

    async def flush_cache(self) -> None:
        """Ask the scheduler to drop every cached prefix no request is using (it does so between steps)."""
        await self.to_tokenizers.send(encode(FlushCache()))

    def fail_all(self, reason: str) -> None:
        """A worker died: end every request in flight with an error, and refuse new ones."""
        self.failure = reason
        for queue, index in self.routes.values():
            queue.put_nowait((index, Output("", "error")))

    # --8<-- [start:generate]
    async def generate(self, requests: list[TokenizeRequest]):
        """Send one request per choice and yield ``(choice index, Output)`` as outputs arrive. When the
        consumer stops early (the client disconnected), every unfinished request is aborted."""
        if self.failure:
            raise WorkersDown(self.failure)
        if self.max_in_flight and len(self.routes) + len(requests) > self.max_in_flight:
            self.metrics.overloaded(len(requests))
            raise Overloaded(f"the server has {len(self.routes)} requests in flight, its limit is {self.max_in_flight}")
        outputs: asyncio.Queue = asyncio.Queue()
        for index, request in enumerate(requests):
            self.routes[request.uid] = (outputs, index)
        unfinished = {request.uid for request in requests}
        records = [RequestRecord(request.uid) for request in requests]
        tokens_seen = [0] * len(requests)
        try:
            for request in requests:
                await self.to_tokenizers.send(encode(request))
            while unfinished:
                index, output = await outputs.get()
                if output.finish_reason == DEAD_END:  # its own constraint led nowhere: a refusal, not a failure
                    output = dead_end(requests[index], output)
                if output.completion_tokens > tokens_seen[index]:
                    self.metrics.token_arrived(records[index], output.completion_tokens - tokens_seen[index])
                    tokens_seen[index] = output.completion_tokens
                if output.finish_reason is not None:
                    unfinished.discard(requests[index].uid)
                    outcome = "invalid" if output.error is not None else output.finish_reason
                    self.metrics.finished(records[index], outcome, output.prompt_tokens, output.completion_tokens,
                                          output.cached_tokens)
                yield index, output
        finally:
            for uid in unfinished:
                await self.to_tokenizers.send(encode(AbortRequest(uid)))
            for index, request in enumerate(requests):
                self.routes.pop(request.uid, None)
                if request.uid in unfinished:  # the client went away first
                    self.metrics.finished(records[index], "abort", completion_tokens=tokens_seen[index])
    # --8<-- [end:generate]


def dead_end(request: TokenizeRequest, output: Output) -> Output:
    """A reply the scheduler ended because its constraint allowed no next token: an error of the request's own
    (a 400 naming the constraint's field, whole or as a stream's last event), not of the server (a 500)."""
    kind = request.params.constraint[0] if request.params.constraint else "constraint"
    message = (f"the {kind} constraint allows no next token after {output.completion_tokens} generated tokens "
               "(no token of the vocabulary continues it); the reply so far does not satisfy it")
    error = TokenizeError(request.uid, message, constraint_param(kind), "constraint_dead_end")
    return dataclasses.replace(output, finish_reason="error", error=error)


def constraint_param(kind: str) -> str:
    """The request field a constraint of this kind came from, for the client's error message."""
    return {"json_object": "response_format", "json_schema": "response_format"}.get(kind, kind)
