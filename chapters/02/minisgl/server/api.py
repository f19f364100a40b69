"""The OpenAI-compatible HTTP API (introduced in chapter 02).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models``, ``GET /health``, ``POST /generate`` (SGLang's native endpoint) and
``GET /state`` (the scheduler's counts, for tests and dashboards).

The handlers run on the asyncio event loop; the scheduler runs on its own thread. A handler turns the
HTTP body into token ids and ``SamplingParams``, submits one ``Request`` per choice (``n``), and reads
their outputs from an ``asyncio.Queue`` that the scheduler fills with ``call_soon_threadsafe``. If the
client goes away first, the handler aborts its requests, which frees their KV cache slots.

Bad input never reaches the scheduler: it gets an OpenAI-shaped error, ``{"error": {"message", "type",
"param", "code"}}``, with status 400 (404 for an unknown model, 413 for a body over
``--max-request-bytes``), and the server goes on serving.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..sampling import SamplingParams
from ..scheduler import Request, RequestOutput, Scheduler
from .body_limit import BodySizeLimit
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def utf8_text(text: str, param: str) -> str:
    """``text``, if it can be encoded as UTF-8; else a 400 naming the field it came from.

    JSON may escape a lone surrogate (``"\\ud800"``). Python decodes it into a ``str`` that no UTF-8
    encoder, the tokenizer's included, accepts: refused here, it cannot fail deeper down as a 500.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} holds text that is not valid Unicode (an unpaired surrogate)", param) from None
    return text


def sse(payload) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --8<-- [start:run-requests]
async def run_requests(scheduler: Scheduler, prompt_ids: list[int], params: list[SamplingParams]):
    """Submit one request per entry of ``params`` and yield ``(choice index, output)`` as they come.

    If the consumer stops early (the client disconnected, or the handler was cancelled), every
    request still in flight is aborted, so that its KV cache slot is freed.
    """
    loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
    rids = [f"req-{uuid.uuid4().hex[:12]}" for _ in params]
    for index, (rid, p) in enumerate(zip(rids, params)):
        # Called on the scheduler's thread: hand the output over to the event loop's thread.
        def deliver(output: RequestOutput, index=index):
            loop.call_soon_threadsafe(outputs.put_nowait, (index, output))

        scheduler.submit(Request(rid, prompt_ids, p, deliver))
    unfinished = set(range(len(params)))
    try:
        while unfinished:
            index, output = await outputs.get()
            if output.finish_reason is not None:
                unfinished.discard(index)
            yield index, output
    finally:
        for index in unfinished:
            scheduler.abort(rids[index])
# --8<-- [end:run-requests]


def create_app(
    scheduler: Scheduler, tokenizer, model_name: str, is_alive=lambda: True, max_request_bytes: int = 1 << 20
) -> FastAPI:
    app = FastAPI(title="minisgl", description="An OpenAI-compatible LLM server")
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    context_length = scheduler.engine.context_length

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return JSONResponse(error_body(error.message, error.status, error.param, error.code), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
            return JSONResponse(error_body("the request body must be a JSON object", 400), status_code=400)
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, 400, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code)

    # --8<-- [start:sampling-params-check]
    def sampling_params(body: SamplingFields, prompt_len: int, prompt_field: str) -> list[SamplingParams]:
        """Check the body against the model and the context, and make one SamplingParams per choice."""
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(context_length - prompt_len, 1)  # as much as fits; too long a prompt fails below
        try:
            params = [
                SamplingParams(
                    temperature=body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p,
                    # n choices from one seed must still differ from each other
                    seed=None if body.seed is None else body.seed + i,
                    max_tokens=max_tokens,
                    stop=body.stop_list,
                    ignore_eos=body.ignore_eos,
                )
                for i in range(body.n)
            ]
        except ValueError as error:
            raise APIError(400, str(error), str(error).split()[0]) from None
        try:
            scheduler.check(prompt_len, max_tokens)
        except ValueError as error:
            code = "context_length_exceeded" if "context length" in str(error) else None
            raise APIError(400, str(error), prompt_field, code) from None
        return params
    # --8<-- [end:sampling-params-check]

    # --8<-- [start:collect]
    async def collect(http: HTTPRequest, stream: AsyncIterator) -> list:
        """Gather every output of a non-streamed reply, aborting it if the client disconnects meanwhile."""
        task = asyncio.ensure_future(_gather(stream))
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await http.is_disconnected():
                task.cancel()  # run_requests' cleanup aborts the requests
                raise APIError(499, "client disconnected")
        return task.result()
    # --8<-- [end:collect]

    def usage(prompt_tokens: int, finals: dict[int, RequestOutput]) -> dict:
        completion = sum(out.completion_tokens for out in finals.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def raise_if_failed(output: RequestOutput) -> None:
        if output.finish_reason == "error":
            raise APIError(500, output.error or "internal error")

    # --8<-- [start:chat]
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template itself refused these messages
            raise APIError(400, f"the chat template rejected the messages: {error}", "messages") from None
        # The template has added the special tokens.
        prompt_ids = tokenizer.encode(utf8_text(text, "messages"), add_special_tokens=False)
        params = sampling_params(body, len(prompt_ids), "messages")
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = run_requests(scheduler, prompt_ids, params)

        def chunk(index: int, delta: dict, finish_reason=None) -> dict:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": [choice]}

        if body.stream:
            async def events():
                finals = {}
                for index in range(len(params)):
                    yield sse(chunk(index, {"role": "assistant", "content": ""}))
                async for index, out in outputs:
                    if out.finish_reason == "error":
                        yield sse(error_body(out.error or "internal error", 500))
                        return
                    if out.finish_reason:
                        finals[index] = out
                    if out.text or out.finish_reason:
                        yield sse(chunk(index, {"content": out.text} if out.text else {}, out.finish_reason))
                if body.include_usage:
                    yield sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                               "model": model_name, "choices": [], "usage": usage(len(prompt_ids), finals)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        texts, finals = [""] * len(params), {}
        for index, out in await collect(http, outputs):
            raise_if_failed(out)
            texts[index] += out.text
            if out.finish_reason:
                finals[index] = out
        choices = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": finals[i].finish_reason, "logprobs": None}
            for i in range(len(params))
        ]
        return {"id": reply_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(len(prompt_ids), finals)}
    # --8<-- [end:chat]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if any(not 0 <= t < scheduler.engine.config.vocab_size for t in prompt):
                raise APIError(400, "prompt token ids must be in the vocabulary", "prompt")
            prompt_ids = prompt
        else:
            prompt_ids = tokenizer.encode(utf8_text(prompt, "prompt"))
        params = sampling_params(body, len(prompt_ids), "prompt")
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = run_requests(scheduler, prompt_ids, params)

        def choice(index, text, finish_reason) -> dict:
            return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

        if body.stream:
            async def events():
                finals = {}
                async for index, out in outputs:
                    if out.finish_reason == "error":
                        yield sse(error_body(out.error or "internal error", 500))
                        return
                    if out.finish_reason:
                        finals[index] = out
                    if out.text or out.finish_reason:
                        yield sse({"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                                   "choices": [choice(index, out.text, out.finish_reason)]})
                if body.include_usage:
                    yield sse({"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(len(prompt_ids), finals)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        texts, finals = [""] * len(params), {}
        for index, out in await collect(http, outputs):
            raise_if_failed(out)
            texts[index] += out.text
            if out.finish_reason:
                finals[index] = out
        return {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice(i, texts[i], finals[i].finish_reason) for i in range(len(params))],
                "usage": usage(len(prompt_ids), finals)}

    @app.post("/generate")
    async def generate(body: GenerateRequest, http: HTTPRequest):
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids", "text")
        prompt_ids = body.input_ids if body.input_ids is not None else tokenizer.encode(utf8_text(body.text, "text"))
        sp = dict(body.sampling_params)
        if "max_new_tokens" in sp:  # SGLang's name
            sp["max_tokens"] = sp.pop("max_new_tokens")
        try:
            fields = SamplingFields(**sp, stream=body.stream)
        except Exception as error:
            raise APIError(400, f"bad sampling_params: {error}", "sampling_params") from None
        params = sampling_params(fields, len(prompt_ids), "text")[:1]
        outputs = run_requests(scheduler, prompt_ids, params)

        def meta(out: RequestOutput) -> dict:
            return {"finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}

        if body.stream:
            async def events():
                async for _, out in outputs:
                    yield sse({"text": out.text, "output_ids": out.token_ids, "meta_info": meta(out)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        text, ids = "", []
        for _, out in await collect(http, outputs):
            raise_if_failed(out)
            text, ids = text + out.text, ids + out.token_ids
        return {"text": text, "output_ids": ids, "meta_info": meta(out)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minisgl", "max_model_len": context_length}]}

    @app.get("/health")
    async def health():
        if not is_alive():
            return JSONResponse(error_body("the scheduler has stopped", 503), status_code=503)
        return {"status": "ok"}

    @app.get("/state")
    async def state():
        return scheduler.state()

    return app


async def _gather(stream: AsyncIterator) -> list:
    return [item async for item in stream]
