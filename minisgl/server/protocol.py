"""The shapes of requests the server accepts, as pydantic models (introduced in chapter 02).

They follow OpenAI's API: a client written for OpenAI works unchanged. Range checks live in
``SamplingParams``, so that the HTTP server and the engine agree on one set of rules, and its errors
name its own fields. A field an API calls by another name (chat's ``top_logprobs`` for ``logprobs``,
``max_completion_tokens`` and ``/generate``'s ``max_new_tokens`` for ``max_tokens``, ``top_logprobs_num``)
carries the same bound here, in pydantic, so that a client's error names the field the client sent.
The sampling penalties, OpenAI's ``frequency_penalty`` and ``presence_penalty`` and ``/generate``'s
``repetition_penalty`` and ``min_p`` too, act as SGLang defines them (``sampling.py``), in its ranges.

From the complete server on, nothing is ignored silently: a field the server does not know is refused
with a 400 that names it (``extra="forbid"``), and so is a known field it does not implement, unless
its value is the neutral one (``suffix`` empty, ``best_of`` equal to ``n``...). The only
fields accepted and not acted on are those OpenAI defines as hints a server may ignore: ``user`` and
``safety_identifier`` (who the end user is, for abuse monitoring), ``metadata`` and ``store`` (for
OpenAI's stored completions), ``service_tier`` and ``prompt_cache_key`` (how OpenAI schedules and
caches), ``parallel_tool_calls`` (a reply here holds at most one call, which satisfies either value).
Chat messages may carry fields a client copied back from an earlier reply (``refusal``, ``audio``...):
those are a record of the conversation, not options, and are left alone.

SGLang's own fields are accepted as SGLang defines them, since SGLang's Model Gateway (``smg``) forwards
them with every request, set or not (chapter 06 runs replicas behind it): ``no_stop_trim`` keeps what
a stop cut at the end of the text (the stop string, what a stop pattern matched, a stop token's own text);
``stop_token_ids`` end a reply as EOS does (``ignore_eos`` ignores them too; ``matched_stop`` is the id) and
``stop_regex``, regular expressions, as stop strings do (``matched_stop`` is the pattern); ``cache_salt`` keeps
a tenant's cached prefixes to itself: a request shares no cached page with another salt, or none (vLLM's too);
``continue_final_message`` makes a chat's reply continue its last message, which must be an assistant's
(assistant prefill: the reply holds only what follows it); ``/generate``'s ``logprob_start_len`` says from
which prompt position ``input_token_logprobs`` start (-1: the last token only; the first entry's log
probability is None, as in SGLang); ``separate_reasoning`` and ``stream_reasoning`` act only in a server
launched with a reasoning parser, which this one has not, so that at either value the text stays whole, as
in SGLang without one; ``/generate``'s ``model`` must name the served model, as in the OpenAI endpoints. The
rest are implemented at their neutral value only (``NEUTRAL_VALUES``).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core import MAX_TOP_LOGPROBS, InvalidParam

# Known fields that do something this server does not do, and the one value at which they do nothing. From
# ``skip_special_tokens`` on, SGLang's: the gateway sends them with every request, at these values unless a
# client set them (``log_metrics``: count the request in the metrics; ``no_logs``: log nothing of it).
NEUTRAL_VALUES = {"suffix": None, "skip_special_tokens": True,
                  "return_hidden_states": False, "log_metrics": True,
                  "no_logs": False, "background": False, "return_bytes": False, "return_entropy": False}


def refuse_unsupported(fields: dict) -> None:
    """A 400 (through ``InvalidParam``) for a field set to a value whose meaning this server does not implement."""
    for name, neutral in NEUTRAL_VALUES.items():
        value = fields.get(name, neutral)
        if value != neutral and not (neutral is None and value in ([], "")):
            raise InvalidParam(name, f"{name} is not supported by this server (only {neutral!r})")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, lt=2**31)  # None: as many as the context leaves room for
    max_completion_tokens: int | None = Field(None, gt=0, lt=2**31)  # the newer OpenAI name for max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, lt=2**31)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63 - 16)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    regex: str | None = None  # SGLang's extensions: the reply matches this regular expression...
    ebnf: str | None = None  # ...or this EBNF grammar
    # hints a server may ignore (see the module's docstring)
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    no_stop_trim: bool = False  # SGLang's: keep the matched stop string at the end of the text
    stop_token_ids: list[int] | None = None  # SGLang's (and vLLM's): token ids that end the reply as EOS does
    stop_regex: str | list[str] | None = None  # SGLang's: regular expressions that end it as stop strings do
    cache_salt: str | None = None  # SGLang's and vLLM's: the tenant whose cached prefixes this request may use
    frequency_penalty: float = 0.0  # the penalties, bounded by SamplingParams (sampling.py applies them)
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # SGLang's extensions, as on its OpenAI endpoints
    min_p: float = 0.0
    # known, implemented only at their neutral value
    skip_special_tokens: bool = True
    return_hidden_states: bool = False

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def stop_regex_list(self) -> list[str]:
        return [self.stop_regex] if isinstance(self.stop_regex, str) else list(self.stop_regex or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    @property
    def continuous_usage(self) -> bool:
        """vLLM's and SGLang's ``stream_options.continuous_usage_stats``: usage in every chunk."""
        return bool(self.stream_options and self.stream_options.get("continuous_usage_stats"))


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers

    def text(self) -> str:
        """The content as text; a part that is not text (an image, audio) is refused, not dropped."""
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            for part in self.content:
                if part.get("type") != "text":
                    raise InvalidParam("messages", f"content parts of type {part.get('type')!r} are not supported: "
                                                  "this model reads text only")
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # SamplingParams.logprobs
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # "none", "auto", "required" or {"type": "function", "function": {...}}
    parallel_tool_calls: bool | None = None  # a hint (see the module's docstring)
    separate_reasoning: bool = True  # SGLang's, with a reasoning parser only (see the module's docstring)
    stream_reasoning: bool = True
    continue_final_message: bool = False  # SGLang's (and vLLM's): the reply continues the last, assistant, message


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the legacy API's number of top tokens (0: only the chosen one)
    echo: bool = False
    best_of: int | None = None  # implemented only equal to n (one sample per choice)
    suffix: str | None = None


class ResponsesRequest(Strict):
    """OpenAI's Responses API (``POST /v1/responses``, ``responses.py``): one conversation in, one message out.
    ``input`` is checked there, item by item, so that an error names the item (``input[2]``)."""

    model: str | None = None
    input: Any  # a string (one user message) or a list of messages
    instructions: str | None = None  # a system message before the input
    max_output_tokens: int | None = Field(None, gt=0, lt=2**31)  # None: as many as the context leaves room for
    temperature: float | None = None  # None: OpenAI's default, 1
    top_p: float | None = None
    stream: bool = False
    text: dict | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict] | None = None  # refused unless empty (responses.py says why)
    tool_choice: str | dict | None = None  # without tools: "auto" or "none" only
    # hints a server may ignore (see the module's docstring)
    store: bool | None = None  # OpenAI keeps responses for later turns; this server keeps none
    metadata: dict | None = None
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None
    # refused when set: they need a server that keeps responses
    previous_response_id: str | None = None
    conversation: str | dict | None = None
    background: bool | None = None  # accepted only false


class GenerateSampling(Strict):
    """SGLang's ``sampling_params`` of ``/generate``."""

    max_new_tokens: int | None = Field(128, gt=0, lt=2**31)  # SGLang's default; None: as much as the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1, lt=2**31)  # -1: no limit, as in SGLang
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = Field(None, ge=-(2**63), lt=2**63 - 16)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63 - 16)
    logit_bias: dict[str, float] | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    no_stop_trim: bool = False  # keep the matched stop string at the end of the text
    skip_special_tokens: bool = True


class GenerateRequest(Strict):
    """SGLang's native endpoint: text or token ids in (one or a batch), text and meta_info out."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # SamplingParams.logprobs, with return_logprob
    return_text_in_logprobs: bool = False
    # With return_logprob: the first prompt position whose log probability is returned (input_token_logprobs);
    # -1, SGLang's default: the last prompt token only.
    logprob_start_len: int = Field(-1, ge=-1, lt=2**31)
    rid: str | list[str] | None = None  # the caller's id for the request (a hint: ours are our own)
    model: str | None = None  # sent by SGLang's gateway (null); if set, it must name the served model
    cache_salt: str | None = None  # the tenant whose cached prefixes every prompt of the request may use
    # SGLang's, implemented only at their neutral value (the gateway sends them with every request)
    log_metrics: bool = True
    return_hidden_states: bool = False
    background: bool = False
    no_logs: bool = False
    return_bytes: bool = False
    return_entropy: bool = False
