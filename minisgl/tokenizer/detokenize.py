"""Turning the scheduler's tokens back into text, in the detokenizer worker (introduced in chapter 03).

The scheduler sends one message per step with what happened to every request it ran. For each, the
detokenizer keeps a ``TextStream`` (incremental, UTF-8 safe, holding back what may start a stop
string). When a stop string appears, the request is over as far as the client is concerned: the
text before it is sent with ``finish_reason="stop"``, and an abort goes back to the scheduler to free
its KV cache pages. Tokens the scheduler produced meanwhile are dropped here, so no text past a stop
string ever reaches the client. The complete server's stop patterns (``stop_regex``) end a request the same
way, matched by the same stream.

A request whose tokens the decoder cannot turn into text (``DecodeStream`` raises on some token
sequences with some tokenizers) ends alone, with an error: its client is told, the scheduler gets an
abort, and every other request goes on (from chapter 06 on).
"""

import logging
from dataclasses import dataclass

from ..messages import AbortRequest, BatchTextOutput, BatchTokenOutput, NewRequestInfo, TokenOutput, TokenText
from .text_stream import TextStream

logger = logging.getLogger(__name__)


@dataclass
class DetokenizeState:
    stream: TextStream
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenText] | None = None  # tokens whose log probabilities wait for their text to be sent
    prompt: list[TokenText] | None = None  # the prompt's log probabilities, sent with the first output


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, DetokenizeState] = {}
        self.token_texts: dict[int, str] = {}  # each token's own text, decoded once (log probabilities list many)

    # --8<-- [start:detokenize]
    def detokenize(self, batch: BatchTokenOutput) -> tuple[BatchTextOutput, list[AbortRequest]]:
        out = BatchTextOutput([], [], [], [], [], [], logprobs=[], matched_stops=[], matched_texts=[],
                              prompt_logprobs=[])
        aborts = []
        for output in batch.outputs:
            try:
                self.step(output, out, aborts)
            except Exception:  # its tokens broke the decoder (tokenizers raise on some sequences): end it alone
                self.fail(output, out, aborts)
        if not any(out.logprobs):
            out.logprobs = []
        if not any(out.prompt_logprobs):
            out.prompt_logprobs = []
        if not any(out.matched_texts):
            out.matched_texts = []
        return out, aborts

    def step(self, output: TokenOutput, out: BatchTextOutput, aborts: list[AbortRequest]) -> None:
        """One request's output of this step: its new text, if any, and whether it is over."""
        if output.new is not None:  # its first output: start its stream
            self.start(output.new)
        uid, token, finish, matched = output.uid, output.token, output.finish, output.matched_eos
        state = self.states.get(uid)
        if state is None:  # already ended here (a stop string), the scheduler just did not know yet
            return
        if output.logprobs is not None and token >= 0:
            state.logprobs = (state.logprobs or []) + [self.token_text(token, output.logprobs)]
        # --8<-- [start:ex-detokenize-step]
        text = ""
        if token >= 0:
            state.completion_tokens += 1
            text, hit_stop = state.stream.add(token)
            if hit_stop:
                if finish is None:  # the scheduler would go on: stop it and free its pages
                    aborts.append(AbortRequest(uid))
                finish, matched = "stop", state.stream.matched  # never flush: text past the stop stays unsent
            elif finish is not None:
                text += state.stream.flush()  # the last token (max_tokens): release what was held
        elif finish is not None:
            text = state.stream.flush()  # ended without a token (EOS, abort, error)
        if finish is not None:
            del self.states[uid]
        # --8<-- [end:ex-detokenize-step]
        if text or finish is not None:
            self.emit(out, uid, text, finish, matched, state, self.matched_text(state, finish, matched))
    # --8<-- [end:detokenize]

    def matched_text(self, state: DetokenizeState, finish: str | None, matched) -> str:
        """The text of what ended a reply by ``stop``, which the reply leaves out (``no_stop_trim`` puts it back, as
        SGLang's detokenizer keeps it): the stop string, what a stop pattern matched, or a stop token's own text,
        without special tokens (so none for EOS)."""
        if finish != "stop" or matched is None:
            return ""
        if isinstance(matched, int):
            return self.tokenizer.decode([matched], skip_special_tokens=True)
        return state.stream.matched_text or ""

    def fail(self, output: TokenOutput, out: BatchTextOutput, aborts: list[AbortRequest]) -> None:
        """End a request whose output could not be turned into text with an error, and it alone: the
        client gets an error, the scheduler an abort (which frees its pages), the other requests go on."""
        logger.exception("request %s: turning its tokens into text failed; ending it with an error", output.uid)
        state = self.states.pop(output.uid, None)
        if output.finish is None:
            aborts.append(AbortRequest(output.uid))
        if state is None:  # it failed as it started
            state = DetokenizeState(None, output.new.prompt_tokens if output.new else 0)
        state.logprobs = state.prompt = None
        self.emit(out, output.uid, "", "error", None, state)

    def emit(self, out: BatchTextOutput, uid: str, text: str, finish: str | None, matched, state,
             matched_text: str = "") -> None:
        out.uids.append(uid)
        out.texts.append(text)
        out.finish_reasons.append(finish)
        out.prompt_tokens.append(state.prompt_tokens)
        out.completion_tokens.append(state.completion_tokens)
        out.cached_tokens.append(state.cached_tokens)
        out.matched_stops.append(matched)
        out.matched_texts.append(matched_text)
        out.logprobs.append(state.logprobs or [])
        out.prompt_logprobs.append(state.prompt or [])
        state.logprobs = state.prompt = None

    def start(self, info: NewRequestInfo) -> None:
        """A request's first output: its stream, with its stop strings, and its prompt's log probabilities."""
        self.states[info.uid] = state = DetokenizeState(
            TextStream(self.tokenizer, info.stop, info.stop_regex), info.prompt_tokens, cached_tokens=info.cached_tokens
        )
        if info.first_prompt_id is not None:  # it asked for its prompt's log probabilities
            first = info.first_prompt_id
            state.prompt = [TokenText(first, self.text_of(first), None, [])]
            state.prompt += [self.token_text(token, logprobs) for token, logprobs in info.prompt_logprobs]

    def token_text(self, token: int, logprobs) -> TokenText:
        """A token's log probabilities with the text of it and of each alternative, for the client."""
        chosen, top = logprobs
        return TokenText(token, self.text_of(token), chosen, [(i, self.text_of(i), lp) for i, lp in top])

    def text_of(self, token: int) -> str:
        if token not in self.token_texts:  # (at most one entry per token of the vocabulary)
            self.token_texts[token] = self.tokenizer.decode([token])
        return self.token_texts[token]
