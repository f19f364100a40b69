"""The OpenAI-compatible HTTP API (introduced in chapter 02).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models`` (and ``/v1/models/{model}``), ``GET /health`` and ``GET /state`` (the
server's counts, for tests and dashboards); from chapter 06 on ``GET /metrics`` (Prometheus' text
format, ``metrics.py``). SGLang's native endpoints (``/generate``...) are in ``native.py``, OpenAI's
Responses API (``POST /v1/responses``, a chat in other words) in ``responses.py``, and ``app.py`` puts
them together.

The complete server speaks the OpenAI surface real clients use: structured output
(``response_format``, and SGLang's ``regex`` and ``ebnf``, compiled and enforced by the scheduler,
``grammar.py``), tool calls (``tools.py``), ``logit_bias``, log probabilities, several prompts in one
completion request (each echoed if asked, text or token ids), assistant prefill (``continue_final_message``),
``matched_stop`` and usage in every chunk, and SGLang's other stops (``stop_token_ids``,
``stop_regex``) and per-tenant prefix cache (``cache_salt``). A field it does not implement is
refused with a 400 that names it (``protocol.py`` lists the hints it accepts and ignores).

The handlers run on the asyncio event loop of the API server process, which holds neither the model
nor the tokenizer: a handler checks the body, turns it into one ``TokenizeRequest`` per choice
(``n``), and reads the outputs through the ``Frontend`` (``frontend.py``). If the client goes away
first, the frontend aborts its requests, which frees their KV cache pages in the scheduler.

Bad input gets an OpenAI-shaped error, ``{"error": {"message", "type", "param", "code"}}``, with status
400 (404 for an unknown model, 413 for a body over ``--max-request-bytes``, 401 without the
``--api-key``, 503 with ``Retry-After`` past ``--max-queued-requests``), and the server goes on
serving. Errors only the tokenizer can see (a prompt too long for the context) come back as the
request's first output, before any byte of the reply is sent, so they too become a plain 400.

The module reads top to bottom: from a body to requests; one helper that answers a chat or a
completion, streamed or whole; the route handlers. What it shares with ``native.py`` (the errors, checks
of a body's values, ``submit`` and ``collect``, which talk to the frontend) is in ``common.py``.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..core import InvalidParam, SamplingParams
from ..messages import TokenizeRequest, TokenText
from .common import (
    REQUEST_FAILED,
    APIError,
    check_cache_salt,
    check_encodable,
    check_model,
    check_stop,
    check_stop_regex,
    check_stop_token_ids,
    collect,
    error_body,
    keeping_stop_strings,
    prompt_of,
    refuse,
    sse,
    submit,
    token_biases,
)
from .frontend import DecodeFailed, Output, WorkersDown
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .tools import ToolPlan, as_template_messages, describe_tools, parse_calls, plan_tools

# ------------------------------------------------------------------------------------------------
# From a body to requests
# ------------------------------------------------------------------------------------------------


# --8<-- [start:sampling-params-check]
def sampling_params(body: SamplingFields, model_name: str, logprobs: int | None = None,
                    constraint: tuple[str, str] | None = None, prompt_logprobs: bool = False) -> list[SamplingParams]:
    """Check the body and make one SamplingParams per choice (the tokenizer checks the length)."""
    check_model(body.model, model_name)
    refuse(body.model_dump(exclude_unset=True))
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", "stream_options")
    check_stop(body.stop_list)
    stop_token_ids, stop_regex = check_stop_token_ids(body.stop_token_ids), check_stop_regex(body.stop_regex_list)
    cache_salt = check_cache_salt(body.cache_salt)
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
                logit_bias=token_biases(body.logit_bias),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                constraint=constraint,
                frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty,
                repetition_penalty=body.repetition_penalty,
                min_p=body.min_p,
                stop_token_ids=stop_token_ids,
                stop_regex=stop_regex,
                cache_salt=cache_salt,
            )
            for i in range(body.n)
        ]
    except InvalidParam as error:  # it names its own field; those the API calls otherwise, protocol.py bounds
        raise APIError(400, str(error), error.param) from None
# --8<-- [end:sampling-params-check]


# --8<-- [start:constraint]
def constraint_of(body: SamplingFields) -> tuple[str, str] | None:
    """The one constraint on the reply's text a body asks for: OpenAI's ``response_format`` or SGLang's
    ``regex`` or ``ebnf`` (the scheduler compiles it, and refuses one that does not compile)."""
    given = []
    format_ = body.response_format
    if format_ is not None:
        kind = format_.get("type")
        if kind == "json_object":
            given.append(("json_object", ""))
        elif kind == "json_schema":
            described = format_.get("json_schema")
            schema = described.get("schema") if isinstance(described, dict) else None
            if not isinstance(schema, dict):
                message = 'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}'
                raise APIError(400, message, "response_format")
            given.append(("json_schema", check_encodable(json.dumps(schema, ensure_ascii=False), "response_format")))
        elif kind != "text":
            raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                           "response_format")
    given += [(kind, check_encodable(spec, kind)) for kind, spec in (("regex", body.regex), ("ebnf", body.ebnf))
              if spec is not None]
    if len(given) > 1:
        raise APIError(400, "give at most one of response_format, regex and ebnf", "response_format")
    return given[0] if given else None
# --8<-- [end:constraint]


def choices(params: list[SamplingParams], prompts: list[dict]) -> list[TokenizeRequest]:
    """One request per choice: every prompt, ``n`` times each (choice ``p * n + j``)."""
    base = uuid.uuid4().hex[:16]
    return [TokenizeRequest(f"{base}-{p * len(params) + j}", param, **prompt)
            for p, prompt in enumerate(prompts) for j, param in enumerate(params)]


# ------------------------------------------------------------------------------------------------
# Answering: streamed as server-sent events, or whole
# ------------------------------------------------------------------------------------------------


@dataclass
class ReplyShape:
    """What differs between a chat reply and a completion reply; everything else is shared."""

    id_prefix: str  # "chatcmpl" or "cmpl"
    object: str  # of the whole reply
    chunk_object: str  # of each streamed chunk
    text_key: str  # where a choice's text goes: "message" (chat) or "text" (completion)
    logprobs: Callable[[list[TokenText], int], dict]  # a choice's log probabilities in this API's format


def chat_logprobs(tokens: list[TokenText], _offset: int) -> dict:
    entry = lambda text, logprob: {"token": text, "logprob": logprob, "bytes": list(text.encode())}  # noqa: E731
    return {"content": [entry(t.text, t.logprob) | {"top_logprobs": [entry(text, lp) for _, text, lp in t.top]}
                        for t in tokens]}


def completion_logprobs(tokens: list[TokenText], offset: int) -> dict:
    """The legacy format: parallel lists, and each token's offset in the choice's text."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {text: lp for _, text, lp in t.top} for t in tokens],
            "text_offset": offsets}


CHAT = ReplyShape("chatcmpl", "chat.completion", "chat.completion.chunk", "message", chat_logprobs)
COMPLETION = ReplyShape("cmpl", "text_completion", "text_completion", "text", completion_logprobs)


@dataclass
class Reply:
    """One request's reply, as it is put together from its choices' outputs."""

    shape: ReplyShape
    num_choices: int
    per_prompt: int = 1  # choices per prompt (n): usage counts each prompt once
    logprobs: bool = False
    tools: ToolPlan | None = None
    echo: list[str] | None = None  # per prompt: text to put before each of its choices (completions' echo)

    def choice(self, index: int, text: str, out: Output | None, logprobs: list[TokenText], streamed: bool,
               offset: int = 0) -> dict:
        """``offset``: where ``text`` starts in the choice's whole text (a streamed chunk's log probabilities)."""
        finish = out.finish_reason if out else None
        choice = {"index": index}
        if self.shape is CHAT:
            message = {"content": text} if (text or not streamed) else {}
            if self.tools is not None and out is not None and finish == "stop":  # the whole reply: find calls
                content, calls = parse_calls(text, self.tools.forced, self.tools.names)
                if calls:
                    message = {"content": content, "tool_calls": [c | {"index": i} if streamed else c
                                                                  for i, c in enumerate(calls)]}
                    finish = "tool_calls"
            if not streamed:
                message = {"role": "assistant", "content": None} | message
            choice["delta" if streamed else "message"] = message
        else:
            choice["text"] = text
        choice["logprobs"] = self.shape.logprobs(logprobs, offset) if self.logprobs else None
        choice["finish_reason"] = finish
        choice["matched_stop"] = out.matched_stop if out else None
        return choice

    def usage(self, latest: dict[int, Output]) -> dict:
        # one output of each prompt's choices (any: they share the prompt) counts that prompt
        groups = [range(p, p + self.per_prompt) for p in range(0, self.num_choices, self.per_prompt)]
        firsts = [next(latest[i] for i in group if i in latest) for group in groups if any(i in latest for i in group)]
        prompt_tokens = sum(out.prompt_tokens for out in firsts)
        completion = sum(out.completion_tokens for out in latest.values())
        cached = sum(out.cached_tokens for out in firsts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


# --8<-- [start:respond]
async def respond(http: HTTPRequest, body: SamplingFields, outputs: AsyncIterator, reply: Reply):
    """The reply to a chat or completion request: a stream of chunks, or one JSON object."""
    frontend, model = http.app.state.frontend, http.app.state.config.model_name
    shape = reply.shape
    header = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    echo = [reply.echo[i // reply.per_prompt] if reply.echo else "" for i in range(reply.num_choices)]
    if body.no_stop_trim:
        outputs = keeping_stop_strings(outputs)
    if body.stream:
        async def events():
            latest, held = {}, [""] * reply.num_choices  # held: a tool call's text, sent once it is whole
            offsets = [0] * reply.num_choices  # where each choice's next chunk starts in its whole text
            echoed = set()
            # A completion streamed with log probabilities holds each choice's chunk back until its next output
            # shows whether the reply ends there: an end that brings no token (EOS, which is not part of the reply)
            # then goes out in the held chunk, so that every chunk lists at least one token (SGLang's clients index
            # each chunk's tokens[0]). The price: each chunk leaves one step late.
            pending, hold = {}, shape is COMPLETION and reply.logprobs
            chunk = lambda choices: header | {"object": shape.chunk_object, "choices": choices}  # noqa: E731
            for index in range(reply.num_choices if shape is CHAT else 0):  # the role, before any token
                yield sse(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]))
            async for index, out in outputs:
                if out.error is not None or out.finish_reason == "error":
                    message = out.error.message if out.error else frontend.failure or REQUEST_FAILED
                    refused = out.error  # a refusal names its field (a constraint's dead end too)
                    yield sse(error_body(message, 400, refused.param, refused.code) if refused else
                              error_body(message, 500))
                    return
                latest[index] = out
                text, done = out.text, out.finish_reason is not None
                if index not in echoed:  # the echoed prompt (and its log probabilities) go first, with the first text
                    echoed.add(index)
                    text, out.logprobs = echo[index] + text, out.prompt_logprobs + out.logprobs
                if reply.tools is not None:  # calls are parsed from the whole reply
                    held[index] += text
                    text = held[index] if done else ""
                if hold and index in pending and not out.logprobs:  # no token: what it brings joins the held chunk
                    payload = pending.pop(index)
                    payload["choices"][0]["text"] += text
                    payload["choices"][0] |= {"finish_reason": out.finish_reason, "matched_stop": out.matched_stop}
                    offsets[index] += len(text)
                    if body.continuous_usage:
                        payload["usage"] = reply.usage(latest)
                    if done:
                        yield sse(payload)
                    else:
                        pending[index] = payload
                elif text or done or out.logprobs:
                    payload = chunk([reply.choice(index, text, out if done else None, out.logprobs, streamed=True,
                                                  offset=offsets[index])])
                    # the offsets count the tokens' own texts, as in a whole reply (a token that ends halfway
                    # through a character counts the replacement character it decodes to alone)
                    offsets[index] += sum(len(t.text) for t in out.logprobs) if out.logprobs else len(text)
                    if body.continuous_usage:
                        payload["usage"] = reply.usage(latest)
                    if index in pending:
                        yield sse(pending.pop(index))
                    if hold and not done:
                        pending[index] = payload
                    else:
                        yield sse(payload)
            for payload in pending.values():  # (none: every choice's last output sent its chunk)
                yield sse(payload)
            if body.include_usage:
                yield sse(header | {"object": shape.chunk_object, "choices": [], "usage": reply.usage(latest)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    texts, finals, logprobs = list(echo), {}, [[] for _ in range(reply.num_choices)]
    for index, out in await collect(http, outputs):
        texts[index] += out.text
        logprobs[index] += out.prompt_logprobs + out.logprobs
        if out.finish_reason:
            finals[index] = out
    return header | {"object": shape.object, "usage": reply.usage(finals),
                     "choices": [reply.choice(i, texts[i], finals[i], logprobs[i], streamed=False)
                                 for i in range(reply.num_choices)]}
# --8<-- [end:respond]


# ------------------------------------------------------------------------------------------------
# The endpoints
# ------------------------------------------------------------------------------------------------

router = APIRouter()


# --8<-- [start:chat]
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    config = http.app.state.config
    if not body.messages:
        raise APIError(400, "messages must not be empty", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if body.continue_final_message and body.messages[-1].role != "assistant":  # assistant prefill
        raise APIError(400, "continue_final_message needs the last message to be an assistant's, whose text the "
                       f"reply continues; the last message is a {body.messages[-1].role}'s", "continue_final_message")
    if body.tools:
        check_encodable(json.dumps(body.tools, ensure_ascii=False), "tools")
    try:
        messages = [{"role": m.role, "content": check_encodable(m.text(), "messages")}
                    | ({"tool_calls": with_parsed_arguments(m.tool_calls)} if m.tool_calls else {})
                    for m in body.messages]
        tools = plan_tools(body.tools, body.tool_choice, config.chat_template)
    except InvalidParam as error:
        raise APIError(400, str(error), error.param) from None
    constraint = constraint_of(body)
    if tools is not None and tools.constraint is not None:
        if constraint is not None:
            raise APIError(400, "a forced tool call cannot also have a response_format, regex or ebnf", "tool_choice")
        constraint = tools.constraint
        if tools.template_tools is None:
            messages = describe_tools(messages, body.tools)
    if tools is None or tools.template_tools is None:
        messages = as_template_messages(messages)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, config.model_name, logprobs, constraint)
    prompt = {"messages": messages, "tools": tools.template_tools if tools else None,
              "continue_final": body.continue_final_message}
    outputs = await submit(http, choices(params, [prompt]))
    return await respond(http, body, outputs, Reply(CHAT, len(params), len(params), body.logprobs, tools))
# --8<-- [end:chat]


def with_parsed_arguments(calls: list[dict]) -> list[dict]:
    """OpenAI sends a call's arguments as a JSON string; chat templates (and our own rendering) want the object."""
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # not JSON: shown as the text it is
        parsed.append(call | {"function": function | {"arguments": arguments}})
    return parsed


# --8<-- [start:completions]
@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: HTTPRequest):
    config = http.app.state.config
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is supported only equal to n (every sample is returned)", "best_of")
    # A string, a list of strings, a list of token ids, or a list of lists of ids: always a list of prompts.
    prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
        else [body.prompt]
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    params = sampling_params(body, config.model_name, body.logprobs, constraint_of(body),
                             prompt_logprobs=body.echo and body.logprobs is not None)
    fields = [prompt_of(p, "prompt") for p in prompts]
    echo = [p if isinstance(p, str) else await prompt_text(http, p) for p in prompts] if body.echo else None
    outputs = await submit(http, choices(params, fields))
    reply = Reply(COMPLETION, len(prompts) * len(params), len(params), body.logprobs is not None, echo=echo)
    return await respond(http, body, outputs, reply)
# --8<-- [end:completions]


async def prompt_text(http: HTTPRequest, ids: list[int]) -> str:
    """The text of a prompt sent as token ids, for its echo. This process holds no tokenizer (nor should it:
    a tokenizer worker has one already), so it asks one, in a round trip of its own before the request is sent
    (``Frontend.decode``), rather than carry the text through the scheduler and the detokenizer with the reply."""
    try:
        return await http.app.state.frontend.decode(ids)
    except WorkersDown as error:
        raise APIError(503, str(error)) from None
    except DecodeFailed as failed:
        raise APIError(400, failed.error.message, failed.error.param) from None


@router.get("/v1/models")
async def models(http: HTTPRequest):
    return {"object": "list", "data": [model_card(http.app.state.config)]}


@router.get("/v1/models/{model:path}")
async def model(model: str, http: HTTPRequest):
    config = http.app.state.config
    check_model(model, config.model_name)
    return model_card(config)


def model_card(config) -> dict:
    """OpenAI's model object, with what SGLang's and vLLM's add: ``root``, the model it is (the served name, as
    SGLang gives it), and ``max_model_len``, the context length."""
    return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "minisgl",
            "root": config.model_name, "parent": None, "max_model_len": config.context_length}


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
    return PlainTextResponse(frontend.metrics.render(frontend.state()), media_type=frontend.metrics.CONTENT_TYPE)
