"""Tool calls on chat completions: from ``tools`` and ``tool_choice`` to a prompt and a grammar, and from
the reply back to ``tool_calls`` (added to the complete server, after chapter 06).

A model calls a tool by writing the call as text; the server's job is to make that text a valid call
and to hand it to the client as structured data instead of prose.

- ``tool_choice: "required"`` or a named function: the reply *must* be a call, so it is forced with the
  grammar engine. The constraint is a JSON schema of ``{"name": ..., "arguments": ...}`` where the
  name is one of the declared functions (or the named one) and the arguments follow that function's
  parameter schema. The reply then always parses.
- ``"auto"``: the model decides. That needs a model trained to call tools, whose chat template takes
  ``tools`` and shows them to it; the reply is then searched for a call in the template's usual form
  (``<tool_call>{...}</tool_call>``, or a reply that is the call's JSON alone). A model whose template
  takes no tools (the default model's) gets a 400 instead of a silent chat without tools.
- ``"none"``, or no tools: an ordinary chat.

When the template takes no tools but a call is forced, the tools are described to the model in a
system message: the grammar guarantees the shape, the description helps it choose well.
"""

import json
import re
import uuid
from dataclasses import dataclass

from ..core import InvalidParam


@dataclass
class ToolPlan:
    constraint: tuple[str, str] | None  # the grammar that forces a call, or None ("auto")
    template_tools: list[dict] | None  # the tools handed to the chat template, if it takes them
    forced: bool  # the whole reply is a call
    names: set[str]  # the functions a call may name


def template_takes_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def function_of(tool: dict) -> dict:
    function = tool.get("function")
    named = isinstance(function, dict) and isinstance(function.get("name"), str)
    if tool.get("type") != "function" or not named:
        raise InvalidParam("tools", 'each tool must be {"type": "function", "function": {"name": ..., '
                                 '"parameters": ...}}')
    return function


def call_schema(function: dict) -> dict:
    """The JSON schema of one call of ``function``."""
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


# --8<-- [start:plan]
def plan_tools(tools: list[dict] | None, tool_choice, chat_template: str | None) -> ToolPlan | None:
    """What a chat request's tools mean for its prompt and its grammar (None: an ordinary chat)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidParam("tool_choice", "tool_choice needs tools")
        return None
    functions = [function_of(tool) for tool in tools]
    if tool_choice == "none":
        return None
    takes_tools = template_takes_tools(chat_template)
    choice = tool_choice or "auto"
    if choice == "auto":
        if not takes_tools:
            raise InvalidParam("tool_choice", "this model's chat template takes no tools, so it cannot choose to "
                                           'call one: send tool_choice "required" or name a function')
        return ToolPlan(None, tools, forced=False, names={f["name"] for f in functions})
    if choice == "required":
        chosen = functions
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            message = f"tool_choice names the function {name!r}, which is not among the tools"
            raise InvalidParam("tool_choice", message)
    else:
        raise InvalidParam("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                                       '{"type": "function", "function": {"name": ...}}')
    schemas = [call_schema(f) for f in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return ToolPlan(("json_schema", json.dumps(schema)), tools if takes_tools else None, forced=True,
                    names={f["name"] for f in chosen})
# --8<-- [end:plan]


def describe_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tools described in a system message (for a template that takes no tools)."""
    text = ("You can call these functions:\n" + "\n".join(json.dumps(function_of(t)) for t in tools)
            + '\nTo call one, reply with only {"name": <function name>, "arguments": <its arguments>}.')
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def as_template_messages(messages: list[dict]) -> list[dict]:
    """Earlier calls and their results as text, for a template that only knows roles and content."""
    shown = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"name": c.get("function", {}).get("name"), "arguments": c.get("function", {}).get("arguments")}
                     for c in message["tool_calls"]]
            text = "\n".join(json.dumps(call) for call in calls)
            message = {"role": message["role"], "content": ((message.get("content") or "") + "\n" + text).strip()}
        shown.append(message)
    return shown


# --8<-- [start:parse]
def parse_calls(text: str, forced: bool, names: set[str]) -> tuple[str | None, list[dict]]:
    """Split a reply into its text and its calls (OpenAI's ``tool_calls`` entries) of the functions
    ``names``. A forced reply is one call's JSON (unless it was cut short: then it is text); otherwise
    calls are looked for in ``<tool_call>`` tags, or as a reply that is a call's JSON alone."""
    if forced:
        found, rest = [text], ""
    else:
        found = [m.group(1) for m in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)]
        rest = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip()
        if not found and text.strip().startswith("{"):
            found, rest = [text], ""
    calls = []
    for raw in found:
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            return text, []  # not a call after all (or one cut short by a stop string): the reply is text
        if not isinstance(call, dict) or call.get("name") not in names:
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments)}})
    return (rest or None) if calls else text, calls
# --8<-- [end:parse]
