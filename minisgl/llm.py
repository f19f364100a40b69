"""The offline API: generate for a list of prompts in this process, with no server (introduced in chapter 06).

    from minisgl import LLM, SamplingParams

    llm = LLM()  # the default model; any ServerArgs option as a keyword: LLM(path, dtype="float32")
    for out in llm.generate(["The capital of France is", "1, 2, 3,"], SamplingParams(max_tokens=16)):
        print(out.text, out.finish_reason)

It is the server without its processes: the same ``Tokenizer`` and ``Detokenizer`` objects the worker
processes hold, and the same ``Scheduler`` and ``Engine``, called one after the other in one loop instead
of talking over sockets. Every prompt is handed to the scheduler at once, so continuous batching, the
page pool and the radix cache work exactly as they do behind HTTP, and the same settings give the same
greedy tokens as the server.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import count

from transformers import PreTrainedTokenizerFast

from .args import ServerArgs, overlap_schedule
from .config import resolve_config
from .core import SamplingParams
from .default_model import default_model_path
from .engine import Engine
from .grammar import GrammarManager, Grammars
from .messages import AbortRequest, TokenizeError, TokenizeRequest, TokenText, pack_ids
from .scheduler import Scheduler
from .tokenizer.detokenize import Detokenizer
from .tokenizer.tokenize import Tokenizer


@dataclass
class Completion:
    """One prompt's result."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated; with a stop string, up to the one ending it
    # "stop", "length", "abort", "error" or "dead_end" (its constraint allowed no next token)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    matched_stop: str | int | None = None  # the stop string or end-of-sequence token that ended it
    logprobs: list[TokenText] = field(default_factory=list)  # per generated token, if SamplingParams.logprobs
    prompt_logprobs: list[TokenText] = field(default_factory=list)  # per prompt token, if .prompt_logprobs


class LLM:
    def __init__(self, model_path: str | None = None, **options):
        """``options``: any field of ``ServerArgs`` (``dtype``, ``device``, ``max_running_requests``,
        ``page_size``, ``cache_type``, ``attention_backend``, ...)."""
        args = ServerArgs(model_path=str(model_path or default_model_path()), **options)
        if args.tp_size != 1:  # one process, one rank: say so rather than quietly run on one
            raise ValueError(f"the offline API runs on one rank, not tp_size {args.tp_size}; "
                             "for tensor parallelism start the server with --tp-size")
        self.config = config = resolve_config(args)
        hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(config.model_path)
        self.tokenizer = Tokenizer(hf_tokenizer, config.context_length, config.vocab_size, config.chat_template)
        self.detokenizer = Detokenizer(hf_tokenizer)
        self.engine = Engine(config.model_path, args.dtype, args.device, config.num_pages, args.page_size,
                             config.context_length, kv_cache_bytes=args.kv_cache_memory * 2**20,
                             attention_backend=args.attention_backend, quantization=args.quantization,
                             cuda_graph_max_bs=0 if args.disable_cuda_graph else args.cuda_graph_max_bs,
                             max_running_requests=args.max_running_requests,
                             compile_attention=args.enable_torch_compile)
        # Constraints compile inline, here: nothing else of this process would run meanwhile.
        grammars = GrammarManager(Grammars(config.model_path, config.vocab_size, set(config.eos_token_ids)))
        self.scheduler = Scheduler(self.engine, args.max_running_requests, args.chunked_prefill_size,
                                   set(config.eos_token_ids), args.cache_type, grammars,
                                   overlap=overlap_schedule(args, self.engine.device.type))
        self.uids = count()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """One ``Completion`` per prompt, in order; a prompt is text or a list of token ids."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.run([{"input_ids": pack_ids(p)} if isinstance(p, list) else {"text": p} for p in prompts], params)

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """One ``Completion`` per conversation (a list of ``{"role": ..., "content": ...}`` messages), the
        reply of the assistant, through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.run([{"messages": c} for c in conversations], params)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """The assistant's reply to one conversation, piece by piece as it is generated. ``should_stop`` is
        asked between steps (the shell's Ctrl-C): once it says yes, the request is aborted, its pages freed."""
        uid = f"offline-{next(self.uids)}"
        message = self.tokenizer.tokenize(TokenizeRequest(uid, replace(params or SamplingParams()), messages=messages))
        if isinstance(message, TokenizeError):
            raise ValueError(message.message)
        self.submit([message])
        finished, aborts = False, []
        try:
            while not finished:
                if should_stop():
                    return
                output = self.scheduler.step(aborts)
                if output is None:
                    aborts = []
                    continue
                text, aborts = self.detokenizer.detokenize(output)  # a stop string: aborted in the next step
                for piece, finish in zip(text.texts, text.finish_reasons):  # only this request runs
                    finished = finish is not None
                    if piece:
                        yield piece
        finally:
            if not finished or aborts:  # stopped early, the caller went away, or a stop string: free its pages
                self.abort([uid])

    # --8<-- [start:run]
    def run(self, prompts: list[dict], params) -> list[Completion]:
        """``prompts``: the prompt fields of a ``TokenizeRequest`` each (``text``, ``messages`` or ``input_ids``)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        uids = [f"offline-{next(self.uids)}" for _ in prompts]
        ready = []
        for uid, prompt, p in zip(uids, prompts, params):  # every prompt is checked before any runs
            # A copy of the params each: the tokenizer fills in an open max_tokens, per prompt.
            message = self.tokenizer.tokenize(TokenizeRequest(uid, replace(p), **prompt))
            if isinstance(message, TokenizeError):
                raise ValueError(f"prompt {len(ready)}: {message.message}")
            ready.append(message)
        self.submit(ready)
        results = {uid: Completion() for uid in uids}
        left, aborts = set(uids), []
        while left:
            output = self.scheduler.step(aborts)  # the last step's stop strings: the scheduler frees their pages
            if output is None:
                aborts = []
                continue
            for out in output.outputs:
                if out.token >= 0 and out.uid in left:
                    results[out.uid].token_ids.append(out.token)
            text, aborts = self.detokenizer.detokenize(output)
            for i, uid in enumerate(text.uids):
                result = results[uid]
                result.text += text.texts[i]
                result.prompt_tokens, result.cached_tokens = text.prompt_tokens[i], text.cached_tokens[i]
                result.logprobs += text.logprobs[i] if text.logprobs else []
                result.prompt_logprobs += text.prompt_logprobs[i] if text.prompt_logprobs else []
                if text.finish_reasons[i] is not None:
                    result.finish_reason, result.matched_stop = text.finish_reasons[i], text.matched_stops[i]
                    left.discard(uid)
        if aborts:  # the last step's stop strings: free those requests' pages now
            self.abort([abort.uid for abort in aborts])
        return [results[uid] for uid in uids]
    # --8<-- [end:run]

    def submit(self, messages: list) -> None:
        """Hand tokenized requests to the scheduler. If it refuses one (its constraint does not compile),
        run none of them: a ValueError says which and why."""
        for message in messages:
            self.scheduler.handle(message)
        refused = self.scheduler.grammars_ready()
        if refused:
            uids = [message.uid for message in messages]
            self.abort(uids)
            prefix = f"prompt {uids.index(refused[0].uid)}: " if len(uids) > 1 else ""
            raise ValueError(prefix + refused[0].message)

    def abort(self, uids: list[str]) -> None:
        """End these requests and free what they hold (their last outputs go to the detokenizer, which
        forgets them)."""
        output = self.scheduler.step([AbortRequest(uid) for uid in uids])
        while output is not None or self.scheduler.has_work:
            if output is not None:
                self.detokenizer.detokenize(output)
            output = self.scheduler.step()
