"""Every message that crosses a process boundary (introduced in chapter 03).

The server is a tree of processes that talk over ZMQ sockets:

    API server --TokenizeRequest/AbortRequest/FlushCache--> tokenizer --UserRequest/AbortRequest/FlushCache--> scheduler
    scheduler --BatchTokenOutput--> detokenizer --BatchTextOutput--> API server
    tokenizer --TokenizeError--> API server          detokenizer --AbortRequest--> scheduler
    scheduler --BatchTokenOutput(refused)--> detokenizer --Refusal--> API server   (the complete server)
    API server --DecodeRequest--> tokenizer --DecodedText--> API server             (the complete server)

Messages are msgspec Structs, encoded as MessagePack: compact, fast, and typed on both ends (a
malformed message fails to decode instead of travelling on). A prompt's token ids travel as one packed
array of int32, 4 bytes a token, rather than as a list of MessagePack integers: a fixed width whatever the
vocabulary (MessagePack spends 3 bytes on an id below 65536 and 5 above, so for a small vocabulary
the list is a little smaller), copied as one block instead of integer by integer, and ready to turn
into a tensor without a Python loop when a later chapter wants that. (A step's output carries one
token per request, each in the ``TokenOutput`` that says what happened to it.)

Each socket carries one union of message types; ``tag=True`` puts the type's name in each message so
the receiver knows which one arrived. This module imports no torch (``SamplingParams`` comes from the
torch-free ``core.py``), so the API server and the tokenizers can encode and decode messages without it.
"""

from array import array

import msgspec

from .core import SamplingParams, TokenLogprobs


def pack_ids(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def unpack_ids(data: bytes) -> list[int]:
    ids = array("i")
    ids.frombytes(data)
    return ids.tolist()


class TokenizeRequest(msgspec.Struct, tag=True):
    """API server -> tokenizer: one choice of one HTTP request, not yet tokenized."""

    uid: str
    params: SamplingParams
    text: str | None = None  # a raw prompt
    messages: list[dict] | None = None  # a chat, to go through the chat template
    tools: list[dict] | None = None  # the chat's tools, for a chat template that takes them
    input_ids: bytes | None = None  # already token ids
    continue_final: bool = False  # the reply continues the chat's last (assistant) message: continue_final_message


class DecodeRequest(msgspec.Struct, tag=True):
    """API server -> tokenizer: the text of these token ids (completions' echo of a prompt sent as ids). The
    API server holds no tokenizer; a tokenizer worker answers with a ``DecodedText`` of the same uid."""

    uid: str
    input_ids: bytes


class DecodedText(msgspec.Struct, tag=True):
    """Tokenizer -> API server: the answer to a ``DecodeRequest`` (a ``TokenizeError`` if the ids are not text)."""

    uid: str
    text: str


class FlushCache(msgspec.Struct, tag=True):
    """API server -> tokenizer -> scheduler: drop every prefix in the cache that no request is using."""


class AbortRequest(msgspec.Struct, tag=True):
    """Stop a request and free its KV cache pages: the client went away, or a stop string was seen."""

    uid: str


class UserRequest(msgspec.Struct, tag=True):
    """Tokenizer -> scheduler: a request ready to run."""

    uid: str
    prompt_ids: bytes
    params: SamplingParams


class TokenizeError(msgspec.Struct, tag=True):
    """Tokenizer -> API server: the request cannot run (say, it does not fit in the context)."""

    uid: str
    message: str
    param: str | None = None
    code: str | None = None


class NewRequestInfo(msgspec.Struct):
    """What the detokenizer must know about a request before its first token."""

    uid: str
    prompt_tokens: int
    stop: list[str]
    cached_tokens: int = 0  # prompt tokens whose keys and values the prefix cache already held
    # When asked for (completions' echo with logprobs): the first prompt token, and each later one's
    # (token, log probabilities)
    first_prompt_id: int | None = None
    prompt_logprobs: list[tuple[int, TokenLogprobs]] = []
    stop_regex: list[str] = []  # regular expressions that end the reply as its stop strings do


class TokenOutput(msgspec.Struct, array_like=True):
    """What one step did to one request: its new token, and why it finished, if it did."""

    uid: str
    token: int = -1  # -1: it finished without a new token (EOS, abort, error)
    finish: str | None = None  # None: it goes on; "stop", "length", "abort", "error" or DEAD_END
    logprobs: TokenLogprobs | None = None  # the token's, if the request asked for them
    matched_eos: int | None = None  # the end-of-sequence or stop token that stopped it (not part of the reply)
    new: NewRequestInfo | None = None  # with its first output: what the detokenizer must know first


# A finish reason of the scheduler's: the request's constraint allowed no next token (a dead end of its grammar,
# which no token of the vocabulary continues). Its own fault, not the server's: the API server answers it with a
# 400 that names the constraint's field, as for a constraint that does not compile (``Refusal``).
DEAD_END = "dead_end"


class Refusal(msgspec.Struct, tag=True):
    """Scheduler -> detokenizer -> API server: a request the scheduler would not run, because its constraint
    does not compile (``constraint`` is its kind; the API server names the request field it came from)."""

    uid: str
    message: str
    constraint: str


class BatchTokenOutput(msgspec.Struct, tag=True):
    """Scheduler -> detokenizer: what one step did, one ``TokenOutput`` per request it touched (a step's
    result, sent as the scheduler returned it), and the requests it refused."""

    outputs: list[TokenOutput]
    refused: list[Refusal] = []


class TokenText(msgspec.Struct, array_like=True):
    """One generated token for the client's log probabilities: its id, its text and its log probability,
    and the likeliest alternatives as (id, text, log probability)."""

    id: int
    text: str
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: list[tuple[int, str, float]]


class BatchTextOutput(msgspec.Struct, tag=True):
    """Detokenizer -> API server: new text of every request that has some."""

    uids: list[str]
    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    logprobs: list[list[TokenText]] = []  # empty, or per request the tokens its new text came from
    matched_stops: list[str | int | None] = []  # empty, or per request: the stop string or token that ended it
    # empty, or per request: the text of what ended it, cut from the reply (SGLang's no_stop_trim puts it back): a
    # stop string, what a stop_regex pattern matched, a stop token's own text ("" for a special token, such as EOS)
    matched_texts: list[str] = []
    prompt_logprobs: list[list[TokenText]] = []  # empty, or per request: its prompt's tokens, if it asked


# Not a message: the numbers rank 0's scheduler publishes for ``GET /state`` in a shared array of 64-bit
# integers (the token counts only grow), in this order (keys of ``Scheduler.state()``): requests, KV cache
# pages, and prompt tokens seen and found cached; then the cached pages no request uses.
COUNTS = ("running", "waiting", "free_pages", "cached_pages", "in_use_pages", "total_pages", "prompt_tokens",
          "cached_tokens", "evictable_pages")

ToTokenizer = TokenizeRequest | AbortRequest | FlushCache | DecodeRequest
ToScheduler = UserRequest | AbortRequest | FlushCache
ToDetokenizer = BatchTokenOutput
ToAPIServer = BatchTextOutput | TokenizeError | Refusal | DecodedText

_encoder = msgspec.msgpack.Encoder()


def encode(message) -> bytes:
    return _encoder.encode(message)


def decoder(union) -> msgspec.msgpack.Decoder:
    """A decoder for the messages one socket may carry."""
    return msgspec.msgpack.Decoder(union)
