"""The OpenAI-compatible HTTP API (introduced in chapter 02).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models``, ``GET /health``, ``POST /generate`` (SGLang's native endpoint) and
``GET /state`` (the server's counts, for tests and dashboards); from chapter 06 on ``GET /metrics``
(Prometheus' text format, ``metrics.py``).

The handlers run on the asyncio event loop of the API server process, which holds neither the model
nor the tokenizer: a handler checks the body, turns it into one ``TokenizeRequest`` per choice
(``n``), and reads the outputs through the ``Frontend`` (``frontend.py``). If the client goes away
first, the frontend aborts its requests, which frees their KV cache pages in the scheduler.

Bad input gets an OpenAI-shaped error, ``{"error": {"message", "type", "param", "code"}}``, with status
400 (404 for an unknown model, 413 for a body over ``--max-request-bytes``, 401 without the
``--api-key``, 503 with ``Retry-After`` past ``--max-queued-requests``), and the server goes on
serving. Errors only the tokenizer can see (a prompt too long for the context) come back as the
request's first output, before any byte of the reply is sent, so they too become a plain 400.

The module reads top to bottom: errors; from a body to requests; one helper that answers a chat or
a completion, streamed or whole; the route handlers; ``create_app``.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..core import InvalidParam, SamplingParams
from ..messages import TokenizeRequest, pack_ids
from .api_key import APIKeyCheck
from .body_limit import BodySizeLimit
from .frontend import Frontend, Output, Overloaded, WorkersDown
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields

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
    return JSONResponse(error_body(message, 400, param), status_code=400)


async def http_error(_, error: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code)


# ------------------------------------------------------------------------------------------------
# From a body to requests
# ------------------------------------------------------------------------------------------------


# --8<-- [start:sampling-params-check]
def sampling_params(body: SamplingFields, model_name: str) -> list[SamplingParams]:
    """Check the body and make one SamplingParams per choice (the tokenizer checks the length)."""
    if body.model is not None and body.model != model_name:
        message = f"the model {body.model!r} does not exist; this server serves {model_name!r}"
        raise APIError(404, message, "model", "model_not_found")
    for stop in body.stop_list:
        check_encodable(stop, "stop")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        return [
            SamplingParams(
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + i,  # n choices from one seed must still differ
                max_tokens=max_tokens,
                stop=body.stop_list,
                ignore_eos=body.ignore_eos,
            )
            for i in range(body.n)
        ]
    except InvalidParam as error:
        raise APIError(400, str(error), error.param) from None


def check_encodable(text: str, param: str) -> str:
    """JSON may spell a lone surrogate (``"\\ud800"``), which no UTF-8 text can hold: refuse it here
    rather than fail later, when the message to the tokenizer is encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} holds a lone surrogate (such as \\ud800), which is not text", param) from None
    return text
# --8<-- [end:sampling-params-check]


# --8<-- [start:first-output]
async def submit(frontend: Frontend, params: list[SamplingParams], **prompt) -> AsyncIterator[tuple[int, Output]]:
    """Send one TokenizeRequest per choice, all with the same prompt, and wait for the first output, so
    that a refused request becomes an HTTP error before the reply starts. Returns an iterator over
    every ``(choice index, Output)``, the first included."""
    base = uuid.uuid4().hex[:16]
    outputs = frontend.generate([TokenizeRequest(f"{base}-{i}", p, **prompt) for i, p in enumerate(params)])
    try:
        first = await outputs.__anext__()
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


# ------------------------------------------------------------------------------------------------
# Answering: streamed as server-sent events, or whole
# ------------------------------------------------------------------------------------------------


@dataclass
class ReplyShape:
    """What differs between a chat reply and a completion reply; everything else is shared."""

    id_prefix: str  # "chatcmpl" or "cmpl"
    object: str  # of the whole reply
    chunk_object: str  # of each streamed chunk
    choice: Callable[[int, str, str | None], dict]  # (index, text, finish_reason) -> a whole reply's choice
    delta: Callable[[int, str, str | None], dict]  # the same, as a streamed chunk's choice
    opening: Callable[[int], dict] | None = None  # a streamed chunk's choice sent before any text


CHAT = ReplyShape(
    "chatcmpl", "chat.completion", "chat.completion.chunk",
    choice=lambda i, text, finish: {"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish, "logprobs": None},
    delta=lambda i, text, finish: {"index": i, "delta": {"content": text} if text else {},
                                   "finish_reason": finish, "logprobs": None},
    opening=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""},
                       "finish_reason": None, "logprobs": None},
)
COMPLETION = ReplyShape(
    "cmpl", "text_completion", "text_completion",
    choice=lambda i, text, finish: {"index": i, "text": text, "finish_reason": finish, "logprobs": None},
    delta=lambda i, text, finish: {"index": i, "text": text, "finish_reason": finish, "logprobs": None},
)


def sse(payload) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(finals: dict[int, Output]) -> dict:
    prompt_tokens = next(iter(finals.values())).prompt_tokens if finals else 0
    completion = sum(out.completion_tokens for out in finals.values())
    cached = next(iter(finals.values())).cached_tokens if finals else 0  # of the prompt counted above
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# --8<-- [start:respond]
async def respond(http: HTTPRequest, body: SamplingFields, outputs: AsyncIterator, choices: int, shape: ReplyShape):
    """The reply to a chat or completion request: a stream of chunks, or one JSON object."""
    frontend, model = http.app.state.frontend, http.app.state.model_name
    header = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if body.stream:
        async def events():
            finals = {}
            for index in range(choices if shape.opening else 0):
                yield sse(header | {"object": shape.chunk_object, "choices": [shape.opening(index)]})
            async for index, out in outputs:
                if out.finish_reason == "error":
                    yield sse(error_body(frontend.failure or "internal error in the scheduler", 500))
                    return
                if out.finish_reason:
                    finals[index] = out
                if out.text or out.finish_reason:
                    choice = shape.delta(index, out.text, out.finish_reason)
                    yield sse(header | {"object": shape.chunk_object, "choices": [choice]})
            if body.include_usage:
                yield sse(header | {"object": shape.chunk_object, "choices": [], "usage": usage(finals)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    texts, finals = [""] * choices, {}
    for index, out in await collect(http, outputs):
        texts[index] += out.text
        if out.finish_reason:
            finals[index] = out
    return header | {"object": shape.object, "usage": usage(finals),
                     "choices": [shape.choice(i, texts[i], finals[i].finish_reason) for i in range(choices)]}
# --8<-- [end:respond]


# --8<-- [start:collect]
async def collect(http: HTTPRequest, outputs: AsyncIterator) -> list[tuple[int, Output]]:
    """Gather every output of a whole (unstreamed) reply, aborting it if the client disconnects
    meanwhile, and turning a failed request into a 500."""
    task = asyncio.ensure_future(gather(outputs))
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await http.is_disconnected():
            task.cancel()  # the frontend's cleanup aborts the requests
            raise APIError(499, "client disconnected")
    gathered = task.result()
    if any(out.finish_reason == "error" for _, out in gathered):
        raise APIError(500, http.app.state.frontend.failure or "internal error in the scheduler")
    return gathered


async def gather(outputs: AsyncIterator) -> list:
    return [item async for item in outputs]
# --8<-- [end:collect]


# ------------------------------------------------------------------------------------------------
# The endpoints
# ------------------------------------------------------------------------------------------------

router = APIRouter()


# --8<-- [start:chat]
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    if not body.messages:
        raise APIError(400, "messages must not be empty", "messages")
    messages = [{"role": m.role, "content": check_encodable(m.text(), "messages")} for m in body.messages]
    params = sampling_params(body, http.app.state.model_name)
    outputs = await submit(http.app.state.frontend, params, messages=messages)
    return await respond(http, body, outputs, len(params), CHAT)
# --8<-- [end:chat]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: HTTPRequest):
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    params = sampling_params(body, http.app.state.model_name)
    frontend = http.app.state.frontend
    if isinstance(prompt, list):
        outputs = await submit(frontend, params, input_ids=pack_ids(prompt))
    else:
        outputs = await submit(frontend, params, text=check_encodable(prompt, "prompt"))
    return await respond(http, body, outputs, len(params), COMPLETION)


@router.post("/generate")
async def generate(body: GenerateRequest, http: HTTPRequest):
    """SGLang's native endpoint: ``{"text" or "input_ids", "sampling_params"}`` in, text and meta out."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", "text")
    fields = dict(body.sampling_params)
    if "max_new_tokens" in fields:  # SGLang's name
        fields["max_tokens"] = fields.pop("max_new_tokens")
    try:
        fields = SamplingFields(**fields, stream=body.stream)
    except Exception as error:
        raise APIError(400, f"bad sampling_params: {error}", "sampling_params") from None
    params = sampling_params(fields, http.app.state.model_name)[:1]
    frontend = http.app.state.frontend
    if body.input_ids is not None:
        outputs = await submit(frontend, params, input_ids=pack_ids(body.input_ids))
    else:
        outputs = await submit(frontend, params, text=check_encodable(body.text, "text"))

    def meta(out: Output) -> dict:
        return {"finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens}

    if body.stream:
        async def events():
            async for _, out in outputs:
                yield sse({"text": out.text, "meta_info": meta(out)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    gathered = await collect(http, outputs)
    return {"text": "".join(out.text for _, out in gathered), "meta_info": meta(gathered[-1][1])}


@router.get("/v1/models")
async def models(http: HTTPRequest):
    card = {"id": http.app.state.model_name, "object": "model", "created": 0, "owned_by": "minisgl",
            "max_model_len": http.app.state.context_length}
    return {"object": "list", "data": [card]}


@router.get("/health")
async def health(http: HTTPRequest):
    frontend = http.app.state.frontend
    if frontend.failure is not None:
        return JSONResponse(error_body(frontend.failure, 503), status_code=503)
    return {"status": "ok"}


@router.get("/state")
async def server_state(http: HTTPRequest):
    return http.app.state.frontend.state()


@router.get("/metrics")
async def metrics(http: HTTPRequest):
    frontend = http.app.state.frontend
    return PlainTextResponse(frontend.metrics.render(frontend.state()), media_type="text/plain; version=0.0.4")


# --8<-- [start:create-app]
def create_app(frontend: Frontend, model_name: str, context_length: int, max_request_bytes: int,
               lifespan=None, api_key: str = "") -> FastAPI:
    app = FastAPI(title="minisgl", description="An OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.frontend, app.state.model_name, app.state.context_length = frontend, model_name, context_length
    app.include_router(router)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    # The last added runs first: the key is checked, then the body's size, before anything reads the body.
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(APIKeyCheck, api_key=api_key)
    return app
# --8<-- [end:create-app]
