"""The OpenAI surface real clients use, on the complete server: structured output, nothing ignored
silently, tool calls and logit_bias, log probabilities, batched and token prompts, the small fields
clients touch, and SGLang's native dialect.

The default model serves in float32, greedy wherever the text is compared; the oracle for log
probabilities is transformers' own forward pass. Grammars, tool plans and reply parsing are also
tested directly, without a server.
"""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from openai_contract import MODEL

SCHEMA = {  # every reply it allows is short, so a greedy reply always completes it
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                   "confidence": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, text, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def post(server, path, body, status=200):
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


# ---------------------------------------------------------------- 1. structured output


def test_a_json_schema_reply_is_valid_json_of_that_schema_whole_and_streamed(client):
    import jsonschema

    format_ = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    whole = chat(client, "Is the sky green? Answer in JSON.", max_tokens=40, temperature=0, response_format=format_)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    chunks = list(chat(client, "Is the sky green? Answer in JSON.", max_tokens=40, temperature=0,
                                  response_format=format_, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    # sampled replies obey it too
    for seed in range(3):
        sampled = chat(client, "Is water wet?", max_tokens=40, temperature=1.0, seed=seed, response_format=format_)
        jsonschema.validate(json.loads(sampled.choices[0].message.content), SCHEMA)


def test_json_object_mode_replies_with_an_object_where_the_free_model_would_not(client):
    question = "Describe a cat as JSON with keys name and color."
    free = chat(client, question, max_tokens=80, temperature=0).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):  # the premise: left alone, the model does not reply in JSON
        json.loads(free)
    reply = chat(client, question, max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_regex_and_ebnf_constrain_completions_and_chats(client):
    out = client.completions.create(model=MODEL, prompt="Is water wet? Answer:", max_tokens=10, temperature=0,
                                    extra_body={"regex": " (yes|no)"})
    assert out.choices[0].text in (" yes", " no") and out.choices[0].finish_reason == "stop"
    date = client.completions.create(model=MODEL, prompt="Today's date is", max_tokens=20, temperature=0,
                                     extra_body={"regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", date.choices[0].text)
    ebnf = 'root ::= "The answer is " ("A" | "B") "."'
    reply = chat(client, "Pick A or B.", max_tokens=20, temperature=0.8, seed=3, extra_body={"ebnf": ebnf})
    assert reply.choices[0].message.content in ("The answer is A.", "The answer is B.")


def test_constrained_and_free_requests_share_a_batch_without_touching_each_other(client, server):
    free_alone = [chat(client, f"Name a fruit number {i}.", max_tokens=12, temperature=0).choices[0].message.content
                  for i in range(2)]
    format_ = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    results = {}

    def run(key, **kwargs):
        results[key] = chat(client, **kwargs).choices[0].message.content

    threads = [threading.Thread(target=run, args=(f"free{i}",), kwargs={
        "text": f"Name a fruit number {i}.", "max_tokens": 12, "temperature": 0}) for i in range(2)]
    threads += [threading.Thread(target=run, args=(f"json{i}",), kwargs={
        "text": f"Question {i}: is it raining?", "max_tokens": 40, "temperature": 0, "response_format": format_})
        for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results["free0"], results["free1"]] == free_alone
    for i in range(2):
        assert set(json.loads(results[f"json{i}"])) == {"answer", "confidence"}
    assert post_state(server)["in_use_pages"] == 0


def post_state(server) -> dict:
    return httpx.get(server.url + "/state", timeout=30).json()


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"regex": "(ab"}, "regex", "parenthesis"),
    ({"ebnf": "root ::= "}, "ebnf", "ebnf"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "response_format", "at most one"),
])
def test_a_constraint_that_does_not_compile_gets_a_400_naming_the_problem(server, client, extra, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    error = post(server, "/v1/chat/completions", body, 400)["error"]
    assert error["param"] == param and words in error["message"].lower(), error
    assert chat(client, "hi", max_tokens=2).usage.completion_tokens == 2  # still serving


def test_grammars_are_compiled_once_per_distinct_constraint(model_path):
    from minisgl.grammar import GrammarError, Grammars

    grammars = Grammars(model_path, 49152, {2})

    def matcher(constraint, pool=None):
        return grammars.matcher(constraint, grammars.compile_later(constraint, pool).result())

    schema = ("json_schema", json.dumps(SCHEMA))
    first, second = matcher(schema), matcher(schema)
    assert grammars.compiles == 1 and first is not second  # one grammar, a matcher (a position in it) each
    with ThreadPoolExecutor(1) as pool:  # on a thread, two requests with one constraint wait for one compile
        regex = ("regex", "a+")
        assert grammars.compile_later(regex, pool) is grammars.compile_later(regex, pool)
        matcher(regex, pool)
    assert grammars.compiles == 2
    with pytest.raises(GrammarError, match="regex"):
        matcher(("regex", "(a"))
    with pytest.raises(GrammarError, match="allows no reply"):
        matcher(("regex", "[^\\s\\S]"))


def test_the_mask_lets_through_exactly_the_tokens_the_grammar_allows(model_path):
    from transformers import AutoTokenizer

    from minisgl.grammar import Grammars, apply_grammar_masks

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    grammars = Grammars(model_path, 49152, {2})
    matcher = grammars.matcher(("regex", "(yes|no)"), grammars.compile("regex", "(yes|no)"))
    logits = torch.zeros(2, 49152)
    apply_grammar_masks(logits, [matcher, None])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    starts = [i for i in range(len(tokenizer)) if (text := tokenizer.decode([i])) and "yesno".find(text) in (0, 3)]
    assert allowed == starts  # every token that starts "yes" or "no", and nothing else
    assert torch.isfinite(logits[1]).all()  # the free row is untouched


# ---------------------------------------------------------------- 2. nothing ignored silently


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"frobnicate": True}, "frobnicate"),
    ("/v1/chat/completions", {"modalities": ["audio"]}, "modalities"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/generate", {"image_data": "x"}, "image_data"),
])
def test_a_field_the_server_does_not_implement_gets_a_400_that_names_it(server, path, extra, param):
    prompt = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
              "/v1/completions": {"prompt": "hi"}, "/generate": {"text": "hi"}}[path]
    error = post(server, path, {**prompt, **extra}, 400)["error"]
    assert error["param"].endswith(param) and param in error["message"], error


def test_hints_openai_lets_a_server_ignore_are_accepted(client):
    reply = chat(client, "hi", max_tokens=2, user="someone", metadata={"k": "v"}, store=False,
                 service_tier="auto", parallel_tool_calls=True, frequency_penalty=0, presence_penalty=0)
    assert reply.usage.completion_tokens == 2


def test_content_parts_that_are_not_text_are_refused_not_dropped(server):
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    error = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}, 400)["error"]
    assert error["param"] == "messages" and "image_url" in error["message"]


# ---------------------------------------------------------------- 3. tool calls and logit_bias


def test_a_required_tool_call_is_a_valid_call_of_a_declared_function_whole_and_streamed(client):
    reply = chat(client, "What is the weather in Paris?", max_tokens=60, temperature=0, tools=[WEATHER, TIME],
                 tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == ({"city"} if call.function.name == "get_weather" else {"zone"})
    chunks = list(chat(client, "What is the weather in Paris?", max_tokens=60, temperature=0,
                                  tools=[WEATHER, TIME], tool_choice="required", stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    streamed_calls = [call for d in deltas for call in (d.delta.tool_calls or [])]
    assert [c.function.name for c in streamed_calls] == [call.function.name]
    assert json.loads(streamed_calls[0].function.arguments) == arguments
    assert deltas[-1].finish_reason == "tool_calls"


def test_a_named_function_is_the_one_called(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    reply = chat(client, "What is the weather in Paris?", max_tokens=40, temperature=0, tools=[WEATHER, TIME],
                 tool_choice=choice)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_tool_choice_auto_without_a_template_that_takes_tools_is_refused_and_none_is_a_chat(server, client):
    body = {"messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER], "max_tokens": 4}
    error = post(server, "/v1/chat/completions", body, 400)["error"]
    assert error["param"] == "tool_choice" and "template" in error["message"]
    error = post(server, "/v1/chat/completions", body | {"tool_choice": {"type": "function", "function":
                                                                         {"name": "nope"}}}, 400)["error"]
    assert "nope" in error["message"]
    plain = chat(client, "weather in Paris?", max_tokens=4, tools=[WEATHER], tool_choice="none")
    assert plain.choices[0].message.tool_calls is None and plain.usage.completion_tokens == 4


def test_a_conversation_with_earlier_calls_and_results_goes_on(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content


def test_tool_plans_and_reply_parsing():
    from minisgl.core import InvalidParam
    from minisgl.server.tools import parse_calls, plan_tools, template_takes_tools

    with_tools = "{% for t in tools %}{{ t }}{% endfor %}{{ messages }}"
    plan = plan_tools([WEATHER], "auto", with_tools)
    assert plan.constraint is None and plan.template_tools == [WEATHER] and template_takes_tools(with_tools)
    assert plan_tools([WEATHER], "none", with_tools) is None and plan_tools(None, None, None) is None
    with pytest.raises(InvalidParam):
        plan_tools([{"type": "function"}], "required", None)
    names = {"get_weather"}
    text, calls = parse_calls('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                              '</tool_call>', forced=False, names=names)
    assert text == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_calls("It is sunny {probably}.", forced=False, names=names) == ("It is sunny {probably}.", [])
    person = '{"name": "Bob", "age": 3}'  # JSON with a "name", but no declared function's: text
    assert parse_calls(person, forced=False, names=names) == (person, [])
    cut = '{"name": "get_weather", "arguments": {"city": "Os'  # a forced call cut short (a stop string): text
    assert parse_calls(cut, forced=True, names=names) == (cut, [])
    with pytest.raises(InvalidParam, match="needs tools"):
        plan_tools(None, "required", None)


def test_logit_bias_bans_and_forces_tokens(client, tokenizer):
    free = chat(client, "Say hello.", max_tokens=1, temperature=0, logprobs=True).choices[0]
    first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(free.logprobs.content[0].token))[0]
    banned = chat(client, "Say hello.", max_tokens=1, temperature=0, logit_bias={str(first): -100}).choices[0]
    assert banned.message.content != free.message.content
    forced_id = tokenizer.encode(" banana")[0]
    forced = chat(client, "Say hello.", max_tokens=3, temperature=0, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == tokenizer.decode([forced_id] * 3)


def test_logit_bias_out_of_range_or_vocabulary_gets_a_400(server):
    for bias in ({"5": 101}, {"99999999": 1}, {"abc": 1}):
        body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": bias}
        assert post(server, "/v1/chat/completions", body, 400)["error"]["param"] == "logit_bias"


# ---------------------------------------------------------------- 4. log probabilities


def test_chat_logprobs_are_the_models_own_and_match_transformers(client, model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    reply = chat(client, "Name a color.", max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token  # greedy: the best
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert bytes(token.bytes).decode() == token.token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
    assert content[0].logprob == pytest.approx(expected.max().item(), abs=2e-3)


def test_logprobs_come_from_before_temperature_and_top_p(client):
    greedy = chat(client, "Name a color.", max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    hot = chat(client, "Name a color.", max_tokens=1, temperature=1.8, top_p=0.5, seed=1, logprobs=True,
               top_logprobs=5)
    first, hot_first = greedy.choices[0].logprobs.content[0], hot.choices[0].logprobs.content[0]
    assert [t.token for t in hot_first.top_logprobs] == [t.token for t in first.top_logprobs]
    for a, b in zip(first.top_logprobs, hot_first.top_logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_streamed_logprobs_cover_every_token(client):
    chunks = list(chat(client, "Count to five.", max_tokens=8, temperature=0.7, seed=5, logprobs=True,
                                  top_logprobs=1, stream=True, stream_options={"include_usage": True}))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(tokens) == chunks[-1].usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(t.token for t in tokens) == text


def test_completion_logprobs_in_the_legacy_format_and_echo(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                    logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-6 for top, chosen in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs))
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The capital of France is" + out.choices[0].text


# ---------------------------------------------------------------- 5. batched and token prompts


def test_a_list_of_prompts_gets_n_choices_each_in_order(client, tokenizer):
    prompts = ["The capital of France is", "One, two, three,"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert out.usage.completion_tokens == 20
    as_ids = client.completions.create(model=MODEL, prompt=[tokenizer.encode(p) for p in prompts], max_tokens=5,
                                       temperature=0)
    assert [c.text for c in as_ids.choices] == alone
    one_list = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompts[1]), max_tokens=5,
                                         temperature=0)
    assert [c.text for c in one_list.choices] == alone[1:]


def test_batched_prompts_stream_with_their_indexes(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=3,
                                                       temperature=0, stream=True))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_a_bad_prompt_in_a_batch_refuses_the_whole_request(server):
    error = post(server, "/v1/completions", {"prompt": ["fine", "x " * 600], "max_tokens": 2}, 400)["error"]
    assert "context length" in error["message"]


# ---------------------------------------------------------------- 6. the small ones clients touch


def test_a_model_can_be_retrieved_by_name(client, server):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_continuous_usage_stats_put_usage_in_every_chunk(client):
    chunks = list(chat(client, "Count to ten.", max_tokens=6, temperature=0, stream=True,
                                  stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content]
    assert counts and counts == sorted(counts) and all(c.usage is not None for c in chunks[1:])
    assert chunks[-1].usage.completion_tokens == 6


def test_matched_stop_names_the_stop_string_or_token(client, server):
    reply = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=20, temperature=0, stop=[","])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].model_extra["matched_stop"] == ","
    ended = chat(client, "Say hi.", max_tokens=60, temperature=0)
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].model_extra["matched_stop"] == 2  # <|im_end|>
    cut = chat(client, "Say hi.", max_tokens=1, temperature=0)
    assert cut.choices[0].model_extra["matched_stop"] is None


def test_cached_tokens_are_reported_on_every_endpoint(client, server):
    long_prompt = "You are a careful assistant who answers briefly. " * 6
    for _ in range(2):
        chatted = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "system", "content": long_prompt}, {"role": "user", "content": "hi"}])
    assert chatted.usage.prompt_tokens_details.cached_tokens >= 16
    for _ in range(2):
        completed = client.completions.create(model=MODEL, prompt=long_prompt + "Hello", max_tokens=2)
    assert completed.usage.prompt_tokens_details.cached_tokens >= 16
    native = post(server, "/generate", {"text": long_prompt + "Bye", "sampling_params": {"max_new_tokens": 2}})
    assert native["meta_info"]["cached_tokens"] >= 16


def test_a_prompt_longer_than_the_context_says_so(server):
    error = post(server, "/v1/completions", {"prompt": "hello " * 700, "max_tokens": 1}, 400)["error"]
    assert "longer than the model's context length" in error["message"] and error["code"] == "context_length_exceeded"


# ---------------------------------------------------------------- 7. SGLang's native dialect


def test_generate_answers_in_sglangs_shape(server):
    out = post(server, "/generate", {"text": "The capital of France is", "sampling_params": {"temperature": 0}})
    meta = out["meta_info"]
    assert meta["completion_tokens"] <= 128 and meta["prompt_tokens"] > 0 and "cached_tokens" in meta
    assert meta["finish_reason"]["type"] in ("stop", "length")
    long = post(server, "/generate", {"text": "Hi", "sampling_params": {"ignore_eos": True}})
    assert long["meta_info"]["completion_tokens"] == 128  # SGLang's default max_new_tokens
    assert long["meta_info"]["finish_reason"] == {"type": "length", "length": 128}
    stopped = post(server, "/generate", {"text": "Count: one, two,", "sampling_params": {
        "temperature": 0, "stop": [","], "max_new_tokens": 20}})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": ","}


def test_generate_takes_batches_and_n_and_answers_a_list(server, tokenizer):
    params = {"temperature": 0, "max_new_tokens": 4}
    texts = post(server, "/generate", {"text": ["Hello", "Goodbye"], "sampling_params": params})
    ids = post(server, "/generate", {"input_ids": [tokenizer.encode("Hello"), tokenizer.encode("Goodbye")],
                                     "sampling_params": params})
    assert isinstance(texts, list) and [t["text"] for t in texts] == [i["text"] for i in ids]
    n = post(server, "/generate", {"text": "Hello", "sampling_params": params | {"n": 3}})
    assert len(n) == 3 and len({r["text"] for r in n}) == 1  # greedy: the same three times


def test_generate_returns_logprobs_and_streams_the_text_so_far(server):
    out = post(server, "/generate", {"text": "The sky is", "sampling_params": {"temperature": 0, "max_new_tokens": 4},
                                     "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True})
    tokens, top = out["meta_info"]["output_token_logprobs"], out["meta_info"]["output_top_logprobs"]
    assert len(tokens) == len(top) == 4 and "".join(t[2] for t in tokens) == out["text"]
    assert all(t[1] == alternatives[0][1] and len(alternatives) == 2 for t, alternatives in zip(tokens, top))
    texts = []
    with httpx.stream("POST", server.url + "/generate", timeout=60, json={
            "text": "The sky is", "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": 4}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts.append(json.loads(line[6:])["text"])
    assert texts[-1] == out["text"] and all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_server_and_model_info_and_flushing_the_cache(server):
    model_info = httpx.get(server.url + "/get_model_info", timeout=30).json()
    assert model_info["is_generation"] is True and model_info["model_path"]
    server_info = httpx.get(server.url + "/get_server_info", timeout=30).json()
    assert server_info["cache_type"] == "radix" and server_info["context_length"] == 512
    assert "api_key" not in server_info
    post(server, "/generate", {"text": "A fairly long prompt to cache. " * 5, "sampling_params": {"max_new_tokens": 1}})
    assert post_state(server)["cached_pages"] > 0
    assert httpx.get(server.url + "/flush_cache", timeout=30).status_code == 200  # SGLang takes GET too
    post(server, "/flush_cache", {})
    for _ in range(50):
        if post_state(server)["cached_pages"] == 0:
            break
        time.sleep(0.1)
    assert post_state(server)["cached_pages"] == 0


@pytest.fixture(scope="module")
def tool_template_server(start_server, tiny_chat_model, tmp_path_factory):
    """The tiny random model with a chat template that takes tools (as tool-trained models' templates do)."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-tools")
    shutil.copytree(tiny_chat_model, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return start_server("--model-path", str(folder), "--served-model-name", MODEL)


def test_tool_choice_auto_shows_the_tools_to_the_template_and_parses_a_call_from_the_reply(tool_template_server):
    client = openai.OpenAI(base_url=tool_template_server.url + "/v1", api_key="unused", max_retries=0)
    plain = chat(client, "weather in Oslo?", max_tokens=4, tools=[WEATHER])
    without = chat(client, "weather in Oslo?", max_tokens=4)
    assert plain.usage.prompt_tokens > without.usage.prompt_tokens  # the template rendered the tools
    assert plain.choices[0].finish_reason == "length" and not plain.choices[0].message.tool_calls
    # The random model would never write a call by itself: a regex makes it write one, in the template's form.
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    reply = chat(client, "weather in Oslo?", max_tokens=60, tools=[WEATHER], tool_choice="auto",
                 extra_body={"regex": re.escape(call)})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Oslo"}



# ---------------------------------------------------------------- odd requests found in review


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "regex": "[^\\s\\S]"}, "regex"),  # matches nothing: no reply can exist
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999999999999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": [2**40]}, "prompt"),
    ("/v1/completions", {"prompt": [[5, 2**40]]}, "prompt"),
    ("/generate", {"input_ids": [2**40]}, "input_ids"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**70}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "regex": "a\ud800"}, "regex"),
    ("/generate", {"text": "hi", "sampling_params": {"json_schema": "\ud800"}}, "json_schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("inf")}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
])
def test_odd_requests_get_a_400_not_a_500(server, client, path, body, param):
    response = httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert chat(client, "hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
])
def test_a_value_out_of_range_is_refused_under_the_name_the_client_sent(server, path, body, param):
    """SamplingParams names its own fields (``logprobs``, ``max_tokens``); a field an API names otherwise is
    bounded under the client's name, in the error's param and in its message alike."""
    error = post(server, path, body, 400)["error"]
    assert error["param"] == param and param.split(".")[-1] in error["message"], error


def test_a_temperature_too_small_to_divide_by_is_greedy(client):
    greedy = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=4, temperature=0)
    tiny = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=4, temperature=1e-45)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_earlier_calls_reach_the_template_with_their_arguments_as_objects():
    from minisgl.server.api import with_parsed_arguments
    from minisgl.server.tools import as_template_messages

    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    [shown] = as_template_messages([{"role": "assistant", "content": "", "tool_calls": with_parsed_arguments([call])}])
    assert json.loads(shown["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_a_forced_call_cut_by_a_stop_string_is_returned_as_text(client):
    reply = chat(client, "What is the weather in Paris?", max_tokens=60, temperature=0, tools=[WEATHER],
                 tool_choice="required", stop=["}"])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content.startswith('{"name": "get_weather"')


def test_streamed_text_offsets_run_on_across_chunks(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=6, temperature=0,
                                            logprobs=0, stream=True, echo=False))
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_generate_takes_sglangs_top_k_of_minus_one(server):
    out = post(server, "/generate", {"text": "Hi", "sampling_params": {"top_k": -1, "max_new_tokens": 2}})
    assert out["meta_info"]["completion_tokens"] == 2


def test_a_slow_grammar_compiles_while_other_requests_run(server, client):
    """A schema that takes seconds to compile does not hold up the requests already running or sent after it:
    it compiles on the scheduler's grammar thread, and the request waits for it there."""
    slow = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "maxLength": 1200}}}
    done = []

    def constrained():
        chat(client, "Say something.", max_tokens=2, response_format=slow)
        done.append("constrained")

    thread = threading.Thread(target=constrained)
    thread.start()
    time.sleep(0.5)  # the constrained request is in the scheduler, its grammar compiling
    chat(client, "Say something else.", max_tokens=4, temperature=0)
    done.append("free")
    thread.join()
    assert done == ["free", "constrained"]


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(client, model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is Paris. The capital of Italy is"
    for _ in range(2):  # the second time the prompt is in the prefix cache: it must still be scored
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                        logprobs=2)
    lp, ids = out.choices[0].logprobs, tokenizer.encode(prompt)
    assert out.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 3
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[len(ids)] == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    for position in range(1, len(ids)):
        assert lp.token_logprobs[position] == pytest.approx(expected[position - 1, ids[position]].item(), abs=2e-3)
        assert len(lp.top_logprobs[position]) <= 2
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                              logprobs=2, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens and "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_prompt_logprob_rows_follow_chunks_of_a_prompt():
    from minisgl.core import Batch, Request, SamplingParams
    from minisgl.sampling import prompt_logprob_rows

    running = Request("a", [1, 2], SamplingParams(logprobs=0), output_ids=[3], cached_len=2)
    scored = Request("b", [10, 11, 12, 13, 14], SamplingParams(prompt_logprobs=True))
    assert prompt_logprob_rows(Batch([running, scored], [1, 3])) == [(1, 1, 11), (1, 2, 12), (1, 3, 13)]
    scored.cached_len = 3  # the second chunk: its last token predicts the first generated one, not a prompt token
    assert prompt_logprob_rows(Batch([scored], [2])) == [(0, 0, 14)]
