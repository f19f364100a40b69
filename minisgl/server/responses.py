"""OpenAI's Responses API, ``POST /v1/responses``: the shape OpenAI's newer clients and agent frameworks
speak by default (added to the complete server after chapter 06, in the second pass over the clients'
surface; the epilogue introduced it, next to chat completions).

A Responses request is a chat request in other words: ``input`` is a string (one user message) or a list
of messages, ``instructions`` a system message before them, ``max_output_tokens`` is ``max_tokens``,
``text.format`` is ``response_format``. So the handler turns it into one, and from there it is chat
completions' path: the same chat template, the same ``sampling_params``, the same ``submit`` and
``collect`` (``api.py``, ``common.py``); a greedy reply is the chat reply to the same messages, token for
token. What differs is the reply: a ``response`` object whose ``output`` holds one assistant message
(``output_text`` parts), with ``status`` ``completed``, or ``incomplete`` when ``max_output_tokens`` cut it
short; and, streamed, a sequence of typed events (``response.created`` ... ``response.completed``), each
an SSE ``event:`` line and a ``data:`` line that carries its ``type`` and ``sequence_number``.

What it refuses, with a 400 naming the field:

- ``previous_response_id`` (and ``conversation``, ``background: true``): OpenAI keeps every response (unless
  ``store`` is false) so that the next turn can point at it instead of sending the conversation again.
  This server keeps no responses: nothing is kept between requests but the prefix cache, and a response
  id here names nothing after its reply. ``store`` is accepted as the hint it is; send the whole
  conversation in ``input`` (the prefix cache still saves recomputing it).
- ``tools``: a Responses tool call is an output item of its own (``function_call``) that comes back as
  ``function_call`` and ``function_call_output`` input items, with streaming events of its own; chat
  completions implement tool calls here (``tools.py``), this endpoint not yet.
- input items other than messages, content parts other than text, and any field it does not know.
"""

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..core import SamplingParams
from .api import choices, sampling_params
from .common import REQUEST_FAILED, APIError, check_encodable, collect, submit
from .frontend import Output
from .protocol import ChatCompletionRequest, ResponsesRequest

router = APIRouter()

# ------------------------------------------------------------------------------------------------
# From a Responses request to a chat
# ------------------------------------------------------------------------------------------------

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")  # a user's text; an assistant's, from an earlier reply
# What a message item may carry besides its role and content: a record of an earlier reply sent back
# (its id, status and phase), as chat messages may carry ``refusal``; it is no option, and left alone.
RECORD_KEYS = {"type", "role", "content", "id", "status", "phase"}
PART_KEYS = {"type", "text", "annotations", "logprobs"}
# Chat's names for the fields a refusal from further down names (the tokenizer's, a constraint's), in this API.
FIELD_NAMES = {"messages": "input", "prompt": "input", "max_tokens": "max_output_tokens",
               "response_format": "text.format"}
KEEPS_NO_RESPONSES = ("this server keeps no responses, so there is none to continue: send the whole conversation "
                      "in input")


def messages_of(body: ResponsesRequest) -> list[dict]:
    """The chat messages of a request: ``instructions`` as a system message, then ``input``'s."""
    messages = [{"role": "system", "content": check_encodable(body.instructions, "instructions")}] \
        if body.instructions is not None else []
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": check_encodable(body.input, "input")}]
    if not isinstance(body.input, list) or not body.input:
        raise APIError(400, "input must be a string or a non-empty list of messages", "input")
    for i, item in enumerate(body.input):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{param} must be a message: {{\"role\": ..., \"content\": ...}}", param)
        kind = item.get("type", "message")
        if kind != "message":
            raise APIError(400, f"input items of type {kind!r} are not supported by this server: it takes "
                                "messages (function calls come with tools, which it refuses here)", param)
        unknown = sorted(set(item) - RECORD_KEYS)
        if unknown:
            where = f"{param}.{unknown[0]}"
            raise APIError(400, f"{where} is not supported by this server", where)
        if item.get("role") not in ROLES:
            raise APIError(400, f"{param}.role must be one of {', '.join(ROLES)}", f"{param}.role")
        messages.append({"role": item["role"], "content": text_of(item.get("content"), f"{param}.content")})
    return messages


def text_of(content, param: str) -> str:
    """A message's content as text: a string, or text parts; a part that is not text (an image) is refused."""
    if isinstance(content, str):
        return check_encodable(content, param)
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of input_text parts", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise APIError(400, f"content parts of type {kind!r} are not supported: this model reads text only",
                           f"{param}[{j}]")
        unknown = sorted(set(part) - PART_KEYS)
        if unknown:
            where = f"{param}[{j}].{unknown[0]}"
            raise APIError(400, f"{where} is not supported by this server", where)
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{param}[{j}].text must be a string", f"{param}[{j}].text")
        texts.append(check_encodable(part["text"], param))
    return "".join(texts)


def constraint_of(text: dict | None) -> tuple[str, str] | None:
    """``text.format`` as the constraint chat's ``response_format`` would give (the same grammars). Unlike
    chat's, a Responses ``json_schema`` format is flat: ``{"type", "name", "schema", "strict"}``."""
    if text is None:
        return None
    unknown = sorted(set(text) - {"format"})
    if unknown:
        raise APIError(400, f"text.{unknown[0]} is not supported by this server", f"text.{unknown[0]}")
    format_ = text.get("format")
    kind = format_.get("type") if isinstance(format_, dict) else None
    if format_ is None or kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", "")
    if kind == "json_schema":
        if not isinstance(format_.get("schema"), dict):
            raise APIError(400, 'text.format json_schema needs {"type": "json_schema", "name": ..., "schema": {...}}',
                           "text.format")
        return ("json_schema", check_encodable(json.dumps(format_["schema"], ensure_ascii=False), "text.format"))
    raise APIError(400, f"text.format type {kind!r} is not one of text, json_object, json_schema", "text.format")


def refuse_fields(body: ResponsesRequest) -> None:
    """The fields this server knows and refuses (the module's docstring says why)."""
    for field in ("previous_response_id", "conversation"):
        if getattr(body, field) is not None:
            raise APIError(400, f"{field} is not supported: {KEEPS_NO_RESPONSES}", field)
    if body.background:
        raise APIError(400, "background is not supported (only false): a background response is fetched later, "
                            "and this server keeps no responses", "background")
    if body.tools:
        raise APIError(400, "tools are not supported on /v1/responses by this server; /v1/chat/completions "
                            "implements tool calls", "tools")
    if body.tool_choice not in (None, "auto", "none"):
        raise APIError(400, 'tool_choice needs tools: without them only "auto" or "none"', "tool_choice")


# --8<-- [start:responses-params]
def chat_params(body: ResponsesRequest, model_name: str, constraint) -> list[SamplingParams]:
    """The sampling parameters chat completions would make of the same settings, by chat's own code."""
    given = {"temperature": body.temperature, "top_p": body.top_p,
             "max_completion_tokens": body.max_output_tokens}
    chat = ChatCompletionRequest(model=body.model, messages=[], stream=body.stream,
                                 **{name: value for name, value in given.items() if value is not None})
    return sampling_params(chat, model_name, constraint=constraint)
# --8<-- [end:responses-params]


def renamed(error: APIError) -> APIError:
    """A refusal from further down (the tokenizer, a grammar) under this API's name for its field."""
    error.param = FIELD_NAMES.get(error.param, error.param)
    error.message = error.message.replace("max_tokens", "max_output_tokens")  # the tokenizer's words for it
    return error


# ------------------------------------------------------------------------------------------------
# The response object, and its events
# ------------------------------------------------------------------------------------------------


class ResponseShape:
    """One response as it is built: its ids and what the request asked for, which it echoes."""

    def __init__(self, body: ResponsesRequest, model: str, params: SamplingParams):
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body, self.model, self.params = body, model, params

    def message(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, status: str, output: list[dict], last: Output | None = None) -> dict:
        """The response object (``last``: the reply's final output, for its usage), as OpenAI shapes it."""
        body, done = self.body, status in ("completed", "incomplete")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model, "instructions": body.instructions, "output": output,
            "max_output_tokens": body.max_output_tokens, "temperature": self.params.temperature,
            "top_p": self.params.top_p, "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tools": [], "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "previous_response_id": None, "reasoning": None, "truncation": "disabled", "background": False,
            "metadata": body.metadata or {}, "user": body.user, "service_tier": "default",
            "usage": usage(last) if done and last is not None else None,
        }


def usage(out: Output) -> dict:
    return {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def status_of(out: Output) -> str:
    return "incomplete" if out.finish_reason == "length" else "completed"


# --8<-- [start:responses-events]
async def events(shape: ResponseShape, outputs: AsyncIterator[tuple[int, Output]], frontend):
    """The reply as Responses events: the response created, its message and text part opened, a delta per
    piece of text, then each closed in turn and the whole response, usage and all, at the end."""
    numbers = itertools.count()

    def event(kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(numbers)} | fields
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shape.response("in_progress", []))
    yield event("response.in_progress", response=shape.response("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=shape.message(None, "in_progress"))
    yield event("response.content_part.added", **where, part=shape.part(""))
    text, last = "", None
    async for _, out in outputs:
        if out.error is not None or out.finish_reason == "error":  # a refusal names its field, a failure not
            error = out.error
            yield event("error", code=error.code if error else "server_error",
                        message=error.message if error else frontend.failure or REQUEST_FAILED,
                        param=FIELD_NAMES.get(error.param, error.param) if error else None)
            return
        if out.text:
            text += out.text
            yield event("response.output_text.delta", **where, delta=out.text, logprobs=[])
        if out.finish_reason is not None:
            last = out
    status = status_of(last) if last is not None else "completed"
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=shape.part(text))
    item = shape.message(text, status)
    yield event("response.output_item.done", output_index=0, item=item)
    yield event(f"response.{status}", response=shape.response(status, [item], last))
# --8<-- [end:responses-events]


# ------------------------------------------------------------------------------------------------
# The endpoint
# ------------------------------------------------------------------------------------------------


# --8<-- [start:responses]
@router.post("/v1/responses")
async def responses(body: ResponsesRequest, http: HTTPRequest):
    frontend, model = http.app.state.frontend, http.app.state.config.model_name
    refuse_fields(body)
    messages = messages_of(body)
    params = chat_params(body, model, constraint_of(body.text))  # checks the model's name too
    shape = ResponseShape(body, model, params[0])
    try:
        outputs = await submit(http, choices(params, [{"messages": messages}]))
        if body.stream:
            return StreamingResponse(events(shape, outputs, frontend), media_type="text/event-stream")
        gathered = await collect(http, outputs)
    except APIError as error:
        raise renamed(error) from None
    text, last = "".join(out.text for _, out in gathered), gathered[-1][1]
    status = status_of(last)
    return shape.response(status, [shape.message(text, status)], last)
# --8<-- [end:responses]
