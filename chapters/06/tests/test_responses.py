"""OpenAI's Responses API on the complete server (``POST /v1/responses``, ``minisgl/server/responses.py``):
through the openai client's ``responses.create``, plain and streamed, and through httpx for the raw event
stream and the error shapes. The oracle for a reply is chat completions: a Responses request is a chat in
other words, so its greedy reply and its token counts are those of the same messages sent to chat.
"""

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from openai_contract import MODEL

EVENTS = TypeAdapter(ResponseStreamEvent)
# The events of one streamed reply, in order; the text's deltas (one or more) come in the middle.
OPENING = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
LONG = "Write a long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def respond(client, **kwargs):
    return client.responses.create(model=MODEL, temperature=0, **kwargs)


def post(server, body, status):
    response = httpx.post(server.url + "/v1/responses", json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def raw_events(server, body) -> list[tuple[str, dict]]:
    """A streamed reply's events as sent: each one's ``event:`` name and its ``data:`` object."""
    with httpx.stream("POST", server.url + "/v1/responses", json=body | {"stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = "".join(response.iter_text()).strip().split("\n\n")
    events = []
    for block in blocks:
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        assert set(lines) == {"event", "data"}, block
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def valid_response(payload: dict) -> Response:
    """The response object, checked against the openai client's own type (strictly, not just constructed).
    The type lists ``cache_write_tokens`` for OpenAI's explicit caching, which this server does not count."""
    checked = json.loads(json.dumps(payload))
    if checked.get("usage"):
        checked["usage"]["input_tokens_details"]["cache_write_tokens"] = 0
    return Response.model_validate(checked)


def check_usage(usage, chat_usage):
    assert usage.input_tokens == chat_usage.prompt_tokens
    assert usage.output_tokens == chat_usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens == chat_usage.total_tokens
    assert 0 <= usage.input_tokens_details.cached_tokens <= usage.input_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


# ---------------------------------------------------------------- whole replies


def test_a_text_input_gets_the_greedy_chat_reply_and_its_usage(client):
    question = "What is the capital of France?"
    reply = respond(client, input=question, max_output_tokens=24)
    expected = chat(client, [{"role": "user", "content": question}], max_tokens=24)
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.model == MODEL
    assert reply.output_text == expected.choices[0].message.content and reply.output_text
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"] and message.content[0].annotations == []
    status = "completed" if expected.choices[0].finish_reason == "stop" else "incomplete"
    assert reply.status == message.status == status
    check_usage(reply.usage, expected.usage)


def test_message_input_with_instructions_is_the_chat_of_those_messages(client):
    instructions = "You answer in one short sentence."
    history = [
        {"role": "user", "content": "Name a colour."},
        {"type": "message", "role": "assistant", "id": "msg_earlier", "status": "completed",
         "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name "},
                                                         {"type": "input_text", "text": "another one."}]},
    ]
    reply = respond(client, input=history, instructions=instructions, max_output_tokens=20)
    expected = chat(client, [{"role": "system", "content": instructions}, {"role": "user", "content": "Name a colour."},
                             {"role": "assistant", "content": "Blue."},
                             {"role": "user", "content": "Name another one."}], max_tokens=20)
    assert reply.output_text == expected.choices[0].message.content
    assert reply.instructions == instructions
    check_usage(reply.usage, expected.usage)
    # A developer message goes to the template as chat sends it
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert respond(client, input=developer, max_output_tokens=12).output_text == \
        chat(client, developer, max_tokens=12).choices[0].message.content


def test_max_output_tokens_cuts_the_reply_short_as_incomplete(client):
    reply = respond(client, input=LONG, max_output_tokens=5)
    assert reply.status == "incomplete"
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output[0].status == "incomplete"
    assert reply.usage.output_tokens == 5 and reply.max_output_tokens == 5
    expected = chat(client, [{"role": "user", "content": LONG}], max_tokens=5)
    assert reply.output_text == expected.choices[0].message.content
    check_usage(reply.usage, expected.usage)


def test_the_response_object_has_every_field_the_client_type_requires(server):
    payload = post(server, {"model": MODEL, "input": "Hello!", "max_output_tokens": 8, "temperature": 0,
                            "store": True, "metadata": {"run": "t"}, "user": "u"}, 200)
    response = valid_response(payload)
    assert response.usage.total_tokens == payload["usage"]["input_tokens"] + payload["usage"]["output_tokens"]
    assert payload["tools"] == [] and payload["error"] is None and payload["metadata"] == {"run": "t"}
    assert payload["temperature"] == 0 and payload["text"] == {"format": {"type": "text"}}
    assert isinstance(payload["created_at"], int)


def test_text_format_json_schema_is_chats_response_format(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    question = "Is the sky green? Answer in JSON."
    reply = respond(client, input=question, max_output_tokens=30,
                    text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}})
    expected = chat(client, [{"role": "user", "content": question}], max_tokens=30,
                    response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    assert reply.output_text == expected.choices[0].message.content
    assert json.loads(reply.output_text)["answer"] in ("yes", "no")
    assert reply.text.format.type == "json_schema"
    question = "Describe a cat as JSON with keys name and color."
    as_object = respond(client, input=question, max_output_tokens=80, text={"format": {"type": "json_object"}})
    expected = chat(client, [{"role": "user", "content": question}], max_tokens=80,
                    response_format={"type": "json_object"})
    assert as_object.output_text == expected.choices[0].message.content
    assert as_object.status == "completed" and isinstance(json.loads(as_object.output_text), dict)


# ---------------------------------------------------------------- streamed replies


def test_a_streamed_reply_sends_the_events_in_order_and_ends_with_the_whole_response(server, client):
    body = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 24, "temperature": 0}
    events = raw_events(server, body)
    kinds = [kind for kind, _ in events]
    assert all(data["type"] == kind for kind, data in events)  # the event: line names the data's type
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data for kind, data in events if kind == "response.output_text.delta"]
    assert deltas and kinds == OPENING + ["response.output_text.delta"] * len(deltas) + CLOSING + \
        [f"response.{events[-1][1]['response']['status']}"]
    for _, data in events[:-1]:
        EVENTS.validate_python(data)  # each event has the shape the openai client's types describe
    text = "".join(d["delta"] for d in deltas)
    whole = respond(client, input=body["input"], max_output_tokens=24)
    assert text == whole.output_text
    ids = {data["item_id"] for kind, data in events if "item_id" in data}
    assert ids == {events[2][1]["item"]["id"]}  # every part and delta belongs to the one message
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    assert events[4 + len(deltas)][1]["text"] == text
    final = valid_response(events[-1][1]["response"])
    assert final.id == events[0][1]["response"]["id"] and final.output_text == text
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_the_client_iterates_a_stream_and_its_helper_gives_the_final_response(client):
    question = "Name three fruits."
    events = list(respond(client, input=question, max_output_tokens=20, stream=True))
    assert type(events[0]).__name__ == "ResponseCreatedEvent"
    assert type(events[-1]).__name__ in ("ResponseCompletedEvent", "ResponseIncompleteEvent")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    expected = chat(client, [{"role": "user", "content": question}], max_tokens=20)
    assert text == events[-1].response.output_text == expected.choices[0].message.content
    check_usage(events[-1].response.usage, expected.usage)
    # responses.stream: the helper that gathers the events; it wants a response.completed at the end
    with client.responses.stream(model=MODEL, input="Say hi.", temperature=0, max_output_tokens=120) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == streamed


def test_a_streamed_reply_cut_short_ends_with_response_incomplete(server):
    events = raw_events(server, {"model": MODEL, "input": LONG, "max_output_tokens": 4, "temperature": 0})
    kind, data = events[-1]
    assert kind == "response.incomplete"
    assert data["response"]["status"] == "incomplete"
    assert data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["response"]["output"][0]["status"] == "incomplete"
    assert data["response"]["usage"]["output_tokens"] == 4


# ---------------------------------------------------------------- what is refused


@pytest.mark.parametrize("extra,param,words", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_123"}, "conversation", "keeps no responses"),
    ({"background": True}, "background", "keeps no responses"),
    ({"frobnicate": 1}, "frobnicate", "not supported"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "chat/completions"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", "not one of"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "not supported"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than 0"),
    ({"temperature": -1}, "temperature", "temperature"),
], ids=["previous-id", "conversation", "background", "unknown-field", "tools", "tool-choice", "format-type",
        "format-no-schema", "verbosity", "max-output-zero", "negative-temperature"])
def test_a_field_this_server_refuses_gets_a_400_naming_it(server, extra, param, words):
    error = post(server, {"model": MODEL, "input": "Hi"} | extra, 400)["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("input_,param", [
    (42, "input"),
    ([], "input"),
    (["hello"], "input[0]"),
    ([{"type": "function_call_output", "call_id": "c", "output": "1"}], "input[0]"),
    ([{"role": "robot", "content": "hi"}], "input[0].role"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}], "input[0].content[0]"),
    ([{"role": "user", "content": "hi", "name": "bob"}], "input[0].name"),
    ([{"role": "user", "content": 7}], "input[0].content"),
], ids=["number", "empty-list", "bare-string-item", "function-output", "bad-role", "image", "unknown-key",
        "content-number"])
def test_input_that_is_not_text_messages_gets_a_400_naming_the_item(server, input_, param):
    error = post(server, {"model": MODEL, "input": input_}, 400)["error"]
    assert error["param"] == param, error


def test_a_missing_input_or_a_wrong_model_is_refused_in_openais_shape(server):
    error = post(server, {"model": MODEL}, 400)["error"]
    assert error["param"] == "input"
    error = post(server, {"model": "gpt-5", "input": "Hi"}, 404)["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found"
    # a refusal from the tokenizer, in this API's words: the prompt plus max_output_tokens past the context
    error = post(server, {"model": MODEL, "input": "Hi", "max_output_tokens": 100_000}, 400)["error"]
    assert error["param"] == "input" and error["code"] == "context_length_exceeded"
    assert "max_output_tokens (100000)" in error["message"]


def test_the_client_raises_a_bad_request_for_previous_response_id(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_abc")
    assert caught.value.body["param"] == "previous_response_id"


def test_hints_are_accepted_and_change_nothing(client):
    plain = respond(client, input="Say hello.", max_output_tokens=10)
    hinted = respond(client, input="Say hello.", max_output_tokens=10, store=True, user="someone",
                     metadata={"k": "v"}, safety_identifier="abc", prompt_cache_key="key", parallel_tool_calls=False,
                     service_tier="auto", tool_choice="none")
    assert hinted.output_text == plain.output_text


# ---------------------------------------------------------------- an error mid-stream


def test_a_refusal_after_the_reply_started_is_an_error_event_naming_the_field(fake_workers):
    # the workers played by a task (conftest.py): every request gets " {", then its grammar's dead end
    call, _ = fake_workers
    dead_end_workers = lambda body: call("post", "/v1/responses", json=body)  # noqa: E731
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 5, "text": {"format": {"type": "json_object"}}}
    whole = dead_end_workers(body)
    assert whole.status_code == 400
    assert whole.json()["error"]["param"] == "text.format"
    streamed = dead_end_workers(body | {"stream": True})
    assert streamed.status_code == 200
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == OPENING + ["response.output_text.delta", "error"]
    error = EVENTS.validate_python(events[-1])
    assert error.param == "text.format" and error.code == "constraint_dead_end"
    assert "allows no next token" in error.message and error.sequence_number == len(events) - 1
