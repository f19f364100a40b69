"""The OpenAI-compatible HTTP API (chapter 02; talking to worker processes since chapter 03).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models``, ``GET /health``, ``POST /generate`` (SGLang's native endpoint) and
``GET /state`` (the server's counts, for tests and dashboards).

The handlers run on the asyncio event loop of the API server process, which no longer holds the model
or even the tokenizer: a handler checks the body, turns it into one ``TokenizeRequest`` per choice
(``n``), and reads the outputs through the ``Frontend`` (``frontend.py``). If the client goes away
first, the frontend aborts its requests, which frees their KV cache slots in the scheduler.

Bad input gets an OpenAI-shaped error, ``{"error": {"message", "type", "param", "code"}}``, with status
400 (404 for an unknown model), and the server goes on serving. Errors only the tokenizer can see (a
prompt too long for the context) come back as the request's first output, before any byte of the
reply is sent, so they too become a plain 400.
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

from ..messages import TokenizeRequest, pack_ids
from ..sampling import SamplingParams
from .frontend import Frontend, Output
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(payload) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --8<-- [start:first-output]
async def after_first_output(outputs):
    """Wait for the first output, so that a refused request becomes an HTTP error before the reply
    starts; then give back an iterator over all of them, the first included."""
    try:
        first = await outputs.__anext__()
    except RuntimeError as error:  # the frontend refuses new work: a worker process died
        raise APIError(503, str(error)) from None
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


def create_app(frontend: Frontend, model_name: str, context_length: int, lifespan=None, is_alive=lambda: True, state=dict) -> FastAPI:
    app = FastAPI(title="minisgl", description="An OpenAI-compatible LLM server", lifespan=lifespan)

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
    def sampling_params(body: SamplingFields) -> list[SamplingParams]:
        """Check the body and make one SamplingParams per choice (the tokenizer checks the length)."""
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        try:
            return [
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

    async def submit(params: list[SamplingParams], **prompt):
        """One TokenizeRequest per choice, all with the same prompt; returns their outputs' iterator."""
        base = uuid.uuid4().hex[:16]
        requests = [TokenizeRequest(f"{base}-{i}", p, **prompt) for i, p in enumerate(params)]
        return await after_first_output(frontend.generate(requests))
    # --8<-- [end:sampling-params-check]

    # --8<-- [start:collect]
    async def collect(http: HTTPRequest, stream: AsyncIterator) -> list:
        """Gather every output of a non-streamed reply, aborting it if the client disconnects meanwhile."""
        task = asyncio.ensure_future(_gather(stream))
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await http.is_disconnected():
                task.cancel()  # the frontend's cleanup aborts the requests
                raise APIError(499, "client disconnected")
        return task.result()
    # --8<-- [end:collect]

    def usage(finals: dict[int, Output]) -> dict:
        prompt_tokens = next(iter(finals.values())).prompt_tokens if finals else 0
        completion = sum(out.completion_tokens for out in finals.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def raise_if_failed(output: Output) -> None:
        if output.finish_reason == "error":
            raise APIError(500, frontend.failure or "internal error in the scheduler")

    # --8<-- [start:chat]
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        params = sampling_params(body)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = await submit(params, messages=messages)

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
                        yield sse(error_body(frontend.failure or "internal error in the scheduler", 500))
                        return
                    if out.finish_reason:
                        finals[index] = out
                    if out.text or out.finish_reason:
                        yield sse(chunk(index, {"content": out.text} if out.text else {}, out.finish_reason))
                if body.include_usage:
                    yield sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                               "model": model_name, "choices": [], "usage": usage(finals)})
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
                "choices": choices, "usage": usage(finals)}
    # --8<-- [end:chat]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        params = sampling_params(body)
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if isinstance(prompt, list):
            outputs = await submit(params, input_ids=pack_ids(prompt))
        else:
            outputs = await submit(params, text=prompt)

        def choice(index, text, finish_reason) -> dict:
            return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

        if body.stream:
            async def events():
                finals = {}
                async for index, out in outputs:
                    if out.finish_reason == "error":
                        yield sse(error_body(frontend.failure or "internal error in the scheduler", 500))
                        return
                    if out.finish_reason:
                        finals[index] = out
                    if out.text or out.finish_reason:
                        yield sse({"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                                   "choices": [choice(index, out.text, out.finish_reason)]})
                if body.include_usage:
                    yield sse({"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(finals)})
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
                "usage": usage(finals)}

    @app.post("/generate")
    async def generate(body: GenerateRequest, http: HTTPRequest):
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids", "text")
        sp = dict(body.sampling_params)
        if "max_new_tokens" in sp:  # SGLang's name
            sp["max_tokens"] = sp.pop("max_new_tokens")
        try:
            fields = SamplingFields(**sp, stream=body.stream)
        except Exception as error:
            raise APIError(400, f"bad sampling_params: {error}", "sampling_params") from None
        params = sampling_params(fields)[:1]
        if body.input_ids is not None:
            outputs = await submit(params, input_ids=pack_ids(body.input_ids))
        else:
            outputs = await submit(params, text=body.text)

        def meta(out: Output) -> dict:
            return {"finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}

        if body.stream:
            async def events():
                async for _, out in outputs:
                    yield sse({"text": out.text, "meta_info": meta(out)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        text = ""
        for _, out in await collect(http, outputs):
            raise_if_failed(out)
            text += out.text
        return {"text": text, "meta_info": meta(out)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minisgl", "max_model_len": context_length}]}

    @app.get("/health")
    async def health():
        if not is_alive():
            return JSONResponse(error_body(frontend.failure or "a worker process has stopped", 503), status_code=503)
        return {"status": "ok"}

    @app.get("/state")
    async def server_state():
        return state()

    return app


async def _gather(stream: AsyncIterator) -> list:
    return [item async for item in stream]
