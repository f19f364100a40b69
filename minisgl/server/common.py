"""What the two HTTP dialects share: errors, checks of a body's values, and talking to the frontend (the
helpers came with chapters 02 and 03 in ``api.py``; the complete server moved them here when SGLang's
native endpoints, ``native.py``, began to use them too, so that neither dialect imports the other).

- **Errors**: every endpoint refuses with ``APIError``, which ``app.py`` turns into OpenAI's shape,
  ``{"error": {"message", "type", "param", "code"}}``; pydantic's complaints about a body and
  Starlette's own errors (404, 405) get the same shape.
- **Checks** of values the pydantic models cannot see through: text that UTF-8 cannot hold, the model's
  name, fields known but not implemented, ``logit_bias`` keys, token ids of a prompt, the number and
  length of stop strings (at most 4, as OpenAI allows, of at most 256 characters each), and of SGLang's
  stop patterns (the same bounds; each must compile, and match no empty text), stop token ids and
  ``cache_salt``.
- **The frontend**: ``submit`` sends a request's choices and waits for the first output (so a refusal
  becomes a 400 before the reply starts), ``collect`` gathers a whole reply (aborting it when the client
  goes away), ``keeping_stop_strings`` puts back what a stop cut (SGLang's ``no_stop_trim``),
  ``sse`` frames one server-sent event of a streamed reply.
"""

import asyncio
import json
from collections.abc import AsyncIterator

import regex
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..core import InvalidParam
from ..messages import TokenizeRequest, pack_ids
from .frontend import Output, Overloaded, WorkersDown
from .protocol import refuse_unsupported

# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def api_error(_, error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.status, error.param, error.code), status_code=error.status,
                        headers=error.headers)


async def invalid_body(_, error: RequestValidationError) -> JSONResponse:
    """pydantic's complaint about the body, as an OpenAI error that names the field."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
        return JSONResponse(error_body("the request body must be a JSON object", 400), status_code=400)
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    message = f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":  # nothing is ignored silently
        message = f"{param} is not supported by this server"
    return JSONResponse(error_body(message, 400, param), status_code=400)


async def http_error(_, error: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code)


# ------------------------------------------------------------------------------------------------
# Checks of a body's values
# ------------------------------------------------------------------------------------------------


def check_encodable(text: str, param: str) -> str:
    """JSON may spell a lone surrogate (``"\\ud800"``), which no UTF-8 text can hold: refuse it here
    rather than fail later, when the message to the tokenizer is encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} holds a lone surrogate (such as \\ud800), which is not text", param) from None
    return text


# --8<-- [start:stop-limits]
# OpenAI's limit on the number of stop strings, and ours on their length. A stop string is a marker
# ("\n\n", "</answer>", "Observation:"), rarely over a few dozen characters; 256 leaves plenty of room
# and bounds what the one detokenizer, which serves every request, holds back and checks per token.
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters


def check_stop(stop: list[str], param: str = "stop") -> list[str]:
    """The stop strings, if there are few and short enough, and each is text."""
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"{param} holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param)
    for s in stop:
        if len(s) > MAX_STOP_LENGTH:
            raise APIError(400, f"{param} holds a string of {len(s)} characters; each may be at most "
                           f"{MAX_STOP_LENGTH}", param)
        check_encodable(s, param)
    return stop
# --8<-- [end:stop-limits]


# --8<-- [start:stop-patterns]
# SGLang's other stops. Its regular expressions are searched by the same detokenizer, for each token, so they are
# bounded as stop strings are, and a pattern's search is bounded in time there (``text_stream.REGEX_TIMEOUT``).
# Stop token ids: more than any model has end tokens. A salt names a tenant (vLLM suggests 43 random characters).
MAX_STOP_TOKEN_IDS = 64
MAX_SALT_LENGTH = 256  # characters


def check_stop_regex(patterns: list[str], param: str = "stop_regex") -> list[str]:
    """The stop patterns, if there are few and short enough, each compiles, and none matches the empty text
    (which would end every reply before its first character)."""
    check_stop(patterns, param)
    for pattern in patterns:
        try:
            compiled = regex.compile(pattern)  # the engine the detokenizer searches with
        except Exception as error:  # regex.error, and the odd RecursionError or OverflowError
            raise APIError(400, f"{param}: {pattern!r} is not a regular expression: {error}", param) from None
        if compiled.search("") is not None:
            raise APIError(400, f"{param}: {pattern!r} matches the empty text, so it would end every reply "
                           "before its first character", param)
    return patterns


def check_stop_token_ids(ids: list[int] | None, param: str = "stop_token_ids") -> list[int]:
    """The stop token ids, if there are few enough (the tokenizer checks them against the vocabulary)."""
    ids = list(dict.fromkeys(ids or []))  # each once, in order
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise APIError(400, f"{param} holds {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed", param)
    if any(not 0 <= token < 2**31 for token in ids):
        raise APIError(400, f"{param} must be token ids of the vocabulary", param)
    return ids


def check_cache_salt(salt: str | None, param: str = "cache_salt") -> str | None:
    """A tenant's salt for the prefix cache: some text, not too long (None: no salt)."""
    if salt is None:
        return None
    if not salt or len(salt) > MAX_SALT_LENGTH:
        raise APIError(400, f"{param} must be a non-empty string of at most {MAX_SALT_LENGTH} characters", param)
    return check_encodable(salt, param)
# --8<-- [end:stop-patterns]


def check_model(model: str | None, served: str) -> None:
    """A request may name the model it wants: the one served here (or none: this server has one)."""
    if model is not None and model != served:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")


def refuse(fields: dict) -> None:
    try:
        refuse_unsupported(fields)
    except InvalidParam as error:
        raise APIError(400, str(error), error.param) from None


def token_biases(logit_bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys, so as strings."""
    try:
        biases = {int(token): float(bias) for token, bias in (logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers)", "logit_bias") from None
    if any(not 0 <= token < 2**31 for token in biases):  # the tokenizer checks them against the vocabulary
        raise APIError(400, "logit_bias keys must be token ids of the vocabulary", "logit_bias")
    return biases


def prompt_of(prompt: str | list[int], param: str) -> dict:
    """A prompt as TokenizeRequest fields: text, or token ids."""
    if isinstance(prompt, str):
        return {"text": check_encodable(prompt, param)}
    if any(not 0 <= token < 2**31 for token in prompt):  # the tokenizer checks them against the vocabulary
        raise APIError(400, f"{param} token ids must be in the vocabulary", param)
    return {"input_ids": pack_ids(prompt)}


# ------------------------------------------------------------------------------------------------
# Talking to the frontend
# ------------------------------------------------------------------------------------------------

# What a client is told when its request ended with an error of the server's own (the scheduler's step
# or the detokenizer failed on it); the log names the cause.
REQUEST_FAILED = "internal error while running this request (the server's log has the details)"


# --8<-- [start:first-output]
async def submit(http: HTTPRequest, requests: list[TokenizeRequest]) -> AsyncIterator[tuple[int, Output]]:
    """Send one TokenizeRequest per choice and wait for the first output, so that a refused request
    becomes an HTTP error before the reply starts. Returns an iterator over every ``(choice index,
    Output)``, the first included.

    The first output may be long in coming (a request waits for room, or its text is held back for a
    possible stop string), and no reply is under way to notice meanwhile that the client left: so we
    watch for that here, and abort the request at once if it does."""
    outputs = http.app.state.frontend.generate(requests)
    first_output, left = asyncio.ensure_future(outputs.__anext__()), asyncio.ensure_future(client_left(http))
    await asyncio.wait({first_output, left}, return_when=asyncio.FIRST_COMPLETED)
    left.cancel()
    if not first_output.done():
        first_output.cancel()  # the frontend's cleanup aborts the requests
        await asyncio.wait({first_output})
        raise APIError(499, "client disconnected")
    try:
        first = first_output.result()
    except WorkersDown as error:
        raise APIError(503, str(error)) from None
    except Overloaded as error:  # refused at once: a client should retry, not wait in an unbounded queue
        raise APIError(503, f"{error}; retry later", code="server_overloaded", headers={"Retry-After": "1"}) from None
    refusal = first[1].error
    if refusal is not None:
        await outputs.aclose()
        raise APIError(400, refusal.message, refusal.param, refusal.code)

    async def chained():
        yield first
        async for item in outputs:
            yield item

    return chained()
# --8<-- [end:first-output]


# --8<-- [start:collect]
async def collect(http: HTTPRequest, outputs: AsyncIterator) -> list[tuple[int, Output]]:
    """Gather every output of a whole (unstreamed) reply, aborting it if the client disconnects
    meanwhile, and turning a failed request into a 500 (a refused one into a 400)."""
    task = asyncio.ensure_future(gather(outputs))
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await http.is_disconnected():
            task.cancel()  # the frontend's cleanup aborts the requests
            raise APIError(499, "client disconnected")
    gathered = task.result()
    refusal = next((out.error for _, out in gathered if out.error is not None), None)
    if refusal is not None:  # one prompt of a batch was refused after another's first output
        raise APIError(400, refusal.message, refusal.param, refusal.code)
    if any(out.finish_reason == "error" for _, out in gathered):
        raise APIError(500, http.app.state.frontend.failure or REQUEST_FAILED)
    return gathered


async def gather(outputs: AsyncIterator) -> list:
    return [item async for item in outputs]


async def client_left(http: HTTPRequest) -> None:
    """Return once the client has gone away. The body was read already, so the next ASGI message is
    ``http.disconnect``, whenever the connection closes."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
# --8<-- [end:collect]


async def keeping_stop_strings(outputs: AsyncIterator) -> AsyncIterator[tuple[int, Output]]:
    """SGLang's ``no_stop_trim``: the text ends with what ended it, not before it. The detokenizer sends the
    text up to the stop and what it cut (``matched_text``: the stop string, the text a stop pattern matched, a
    stop token's own text), so putting it back is all there is to do. A special token, such as EOS, has no
    text: it stays out, as it does in SGLang, which decodes the reply without special tokens."""
    async for index, out in outputs:
        if out.finish_reason == "stop" and out.matched_text:
            out.text += out.matched_text
        yield index, out


def sse(payload) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
