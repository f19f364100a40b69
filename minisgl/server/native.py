"""SGLang's native endpoints, in SGLang's own dialect, so that SGLang's clients work unchanged (``/generate``
came with chapter 02; the dialect, the batches and the other endpoints with the complete server).

- ``POST /generate``: ``text`` or ``input_ids``, one prompt or a list, and ``sampling_params``
  (``max_new_tokens`` defaults to 128, as in SGLang; ``n`` samples per prompt; ``top_k`` -1, SGLang's
  "no limit", is 0 here). The answer is ``{"text", "meta_info", "index"}`` for one prompt and one
  sample, a list of them otherwise.
  ``meta_info`` holds the token counts, the cached tokens and the finish reason as SGLang sends it, an
  object: ``{"type": "stop", "matched": <the stop string or token>}``, ``{"type": "length", "length":
  N}`` or ``{"type": "abort"}``. With ``return_logprob``, ``output_token_logprobs`` lists ``[logprob,
  token id, text or None]`` per token and ``output_top_logprobs`` the ``top_logprobs_num`` best of each;
  ``input_token_logprobs`` and ``input_top_logprobs`` do the same for the prompt, from ``logprob_start_len``
  on (-1, the default: its last token only), the first entry's log probability None, as in SGLang.
  Streamed, each event carries the text *so far*, as SGLang's does, not the increment.
  ``sampling_params.no_stop_trim`` keeps the matched stop string at the end of the text;
  ``sampling_params.stop_token_ids`` and ``stop_regex`` end a reply as EOS and stop strings do (``matched``:
  the token id, or the pattern); a top-level ``cache_salt`` keeps the request's cached prefixes to its tenant.
- ``GET /get_model_info``, ``GET /get_server_info``: what is served, and with which settings (with the KV
  cache's capacity in tokens, ``max_total_num_tokens``); also under SGLang's newer names, ``/model_info`` and
  ``/server_info``, which SGLang's Model Gateway asks first.
- ``GET /get_load``: how busy the server is, per data-parallel rank (one here), as SGLang reports it; the
  gateway's ``power_of_two`` policy reads it (chapter 06).
- ``POST /flush_cache``: drop every cached prefix no request is using (the scheduler does it between steps).
"""

import time

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from .. import __version__
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
from .frontend import Output
from .protocol import GenerateRequest, GenerateSampling

router = APIRouter()


def params_of(sampling: GenerateSampling, logprobs: int | None, cache_salt: str | None = None) -> list[SamplingParams]:
    refuse(sampling.model_dump(exclude_unset=True))
    constraints = [(kind, check_encodable(spec, kind)) for kind, spec in (
        ("json_schema", sampling.json_schema), ("regex", sampling.regex), ("ebnf", sampling.ebnf)) if spec is not None]
    if len(constraints) > 1:
        raise APIError(400, "give at most one of json_schema, regex and ebnf", "sampling_params")
    stop = [sampling.stop] if isinstance(sampling.stop, str) else list(sampling.stop or [])
    seed = sampling.sampling_seed if sampling.sampling_seed is not None else sampling.seed
    stop_token_ids = check_stop_token_ids(sampling.stop_token_ids, "sampling_params.stop_token_ids")
    patterns = [sampling.stop_regex] if isinstance(sampling.stop_regex, str) else list(sampling.stop_regex or [])
    stop_regex = check_stop_regex(patterns, "sampling_params.stop_regex")
    try:
        return [SamplingParams(temperature=sampling.temperature, top_k=max(sampling.top_k, 0), top_p=sampling.top_p,
                               seed=None if seed is None else seed + i, max_tokens=sampling.max_new_tokens,
                               stop=check_stop(stop, "sampling_params.stop"), ignore_eos=sampling.ignore_eos,
                               logit_bias=token_biases(sampling.logit_bias), logprobs=logprobs,
                               constraint=constraints[0] if constraints else None,
                               frequency_penalty=sampling.frequency_penalty,
                               presence_penalty=sampling.presence_penalty,
                               repetition_penalty=sampling.repetition_penalty, min_p=sampling.min_p,
                               stop_token_ids=stop_token_ids, stop_regex=stop_regex, cache_salt=cache_salt)
                for i in range(sampling.n)]
    except InvalidParam as error:  # it names its own field; max_new_tokens and top_logprobs_num, protocol.py bounds
        raise APIError(400, str(error), f"sampling_params.{error.param}") from None


def prompts_of(body: GenerateRequest) -> tuple[list[dict], bool]:
    """Each prompt as TokenizeRequest fields, and whether the body held a batch."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", "text")
    if body.text is not None:
        texts = body.text if isinstance(body.text, list) else [body.text]
        return [{"text": check_encodable(t, "text")} for t in texts], isinstance(body.text, list)
    batch = bool(body.input_ids) and isinstance(body.input_ids[0], list)
    ids = body.input_ids if batch else [body.input_ids]
    return [prompt_of(i, "input_ids") for i in ids], batch


def finish_reason(out: Output) -> dict | None:
    if out.finish_reason is None:
        return None
    if out.finish_reason == "length":
        return {"type": "length", "length": out.completion_tokens}
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.matched_stop}
    return {"type": out.finish_reason}  # abort, error


def logprob_entries(tokens: list[TokenText], with_text: bool) -> tuple[list, list]:
    """SGLang's shape: ``[logprob, token id, text or None]`` per token, and a list of such entries per token for
    its likeliest alternatives (None for a prompt's first reported token, which has no log probability)."""
    text = lambda t: t if with_text else None  # noqa: E731
    return ([[t.logprob, t.id, text(t.text)] for t in tokens],
            [None if t.logprob is None else [[lp, i, text(s)] for i, s, lp in t.top] for t in tokens])


@router.post("/generate")
async def generate(body: GenerateRequest, http: HTTPRequest):
    check_model(body.model, http.app.state.config.model_name)
    refuse(body.model_dump(exclude_unset=True, exclude={"sampling_params"}))
    prompts, batch = prompts_of(body)
    if not prompts:
        raise APIError(400, "the batch is empty", "text")
    params = params_of(body.sampling_params, body.top_logprobs_num if body.return_logprob else None,
                       check_cache_salt(body.cache_salt))
    if body.return_logprob:  # the prompt's too, from logprob_start_len on (-1: the last token; the tokenizer checks it)
        for param in params:
            param.prompt_logprobs, param.logprob_start_len = True, body.logprob_start_len
    per_prompt, started = len(params), time.monotonic()
    requests = [TokenizeRequest(f"gen-{time.monotonic_ns():x}-{p * per_prompt + j}", param, **prompt)
                for p, prompt in enumerate(prompts) for j, param in enumerate(params)]
    outputs = await submit(http, requests)
    if body.sampling_params.no_stop_trim:
        outputs = keeping_stop_strings(outputs)
    texts, logprobs, prompt_logprobs = [""] * len(requests), [[] for _ in requests], [[] for _ in requests]

    def result(index: int, out: Output) -> dict:
        meta = {"id": requests[index].uid, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
                "finish_reason": finish_reason(out), "e2e_latency": round(time.monotonic() - started, 4)}
        if body.return_logprob:
            tokens, top = logprob_entries(logprobs[index], body.return_text_in_logprobs)
            prompt_tokens, prompt_top = logprob_entries(prompt_logprobs[index], body.return_text_in_logprobs)
            meta["input_token_logprobs"], meta["output_token_logprobs"] = prompt_tokens, tokens
            if body.top_logprobs_num:
                meta["input_top_logprobs"], meta["output_top_logprobs"] = prompt_top, top
        return {"text": texts[index], "meta_info": meta, "index": index}

    if body.stream:
        async def events():
            async for index, out in outputs:
                if out.error is not None or out.finish_reason == "error":
                    message = out.error.message if out.error else http.app.state.frontend.failure or REQUEST_FAILED
                    refused = out.error  # a refusal names its field (a constraint's dead end too)
                    yield sse(error_body(message, 400, refused.param, refused.code) if refused else
                              error_body(message, 500))
                    return
                texts[index] += out.text
                logprobs[index] += out.logprobs
                prompt_logprobs[index] += out.prompt_logprobs
                yield sse(result(index, out))  # the text so far, as SGLang streams it
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    finals = {}
    for index, out in await collect(http, outputs):
        texts[index] += out.text
        logprobs[index] += out.logprobs
        prompt_logprobs[index] += out.prompt_logprobs
        if out.finish_reason:
            finals[index] = out
    results = [result(i, finals[i]) for i in range(len(requests))]
    return results if batch or per_prompt > 1 else results[0]


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(http: HTTPRequest):
    config = http.app.state.config
    return {"model_path": config.model_path, "tokenizer_path": config.model_path, "is_generation": True,
            "served_model_name": config.model_name, "context_length": config.context_length,
            "vocab_size": config.vocab_size}


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(http: HTTPRequest):
    """The settings (every command-line option but the key), and what SGLang's clients read besides: the KV
    cache's capacity in tokens (``max_total_num_tokens``, its usable pages times their size, as the scheduler
    counts them), the longest prompt (``max_req_input_len``), the version, and the scheduler's counts."""
    config, state = http.app.state.config, http.app.state.frontend.state()
    settings = {name: value for name, value in vars(config.args).items() if name != "api_key"}
    pages = state.get("total_pages") or max(config.num_pages - 1, 0)  # (sized by the engine: known once it runs)
    return settings | {"model_path": config.model_path, "served_model_name": config.model_name,
                       "context_length": config.context_length, "max_req_input_len": config.context_length - 1,
                       "max_total_num_tokens": pages * config.args.page_size, "version": __version__,
                       "internal_states": [state]}


@router.get("/get_load")
async def get_load(http: HTTPRequest):
    """SGLang's shape: one entry per data-parallel rank. ``num_tokens`` counts the tokens whose keys and values
    requests hold (whole pages); SGLang adds the prompts still waiting, which our scheduler does not count."""
    state, page_size = http.app.state.frontend.state(), http.app.state.config.args.page_size
    running, waiting = state.get("running", 0), state.get("waiting", 0)
    return [{"dp_rank": 0, "num_reqs": running + waiting, "num_waiting_reqs": waiting,
             "num_tokens": state.get("used_pages", 0) * page_size}]


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(http: HTTPRequest):
    await http.app.state.frontend.flush_cache()
    return {"message": "cache flush requested: the scheduler drops every prefix no request is using"}
