"""Turning a request's text into token ids, in a tokenizer worker (introduced in chapter 03).

Chat messages go through the model's chat template; a raw prompt is encoded as it is. Here, where the
prompt's length is first known, we also check that prompt plus reply fit in the context, and fill in
``max_tokens`` when the client left it open (and, in the complete server, where the prompt's log
probabilities start, ``logprob_start_len``). The complete server also turns token ids back into text here,
for an echo of a prompt sent as ids (``decode``).
"""

from ..messages import TokenizeError, TokenizeRequest, UserRequest, pack_ids, unpack_ids


class Tokenizer:
    def __init__(self, tokenizer, context_length: int, vocab_size: int, chat_template: str | None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.chat_template = chat_template  # resolved once at launch (config.py); None: the model has none

    # --8<-- [start:tokenize]
    def tokenize(self, request: TokenizeRequest) -> UserRequest | TokenizeError:
        if request.messages is not None:
            if self.chat_template is None:
                message = "this model has no chat template: send a prompt to /v1/completions"
                return TokenizeError(request.uid, message, "messages")
            try:
                # continue_final: the last message (an assistant's, the API server checked) is left open, and the
                # reply continues it (assistant prefill); otherwise a new assistant turn is opened for the reply.
                text = self.tokenizer.apply_chat_template(
                    request.messages, tools=request.tools, chat_template=self.chat_template, tokenize=False,
                    add_generation_prompt=not request.continue_final, continue_final_message=request.continue_final,
                )
            except Exception as error:  # the template itself refused these messages
                return TokenizeError(request.uid, f"the chat template rejected the messages: {error}", "messages")
            prompt_ids, field = self.tokenizer.encode(text, add_special_tokens=False), "messages"
        elif request.input_ids is not None:
            prompt_ids, field = unpack_ids(request.input_ids), "prompt"
            if any(not 0 <= t < self.vocab_size for t in prompt_ids):
                return TokenizeError(request.uid, "prompt token ids must be in the vocabulary", field)
        else:
            prompt_ids, field = self.tokenizer.encode(request.text or ""), "prompt"
        if not prompt_ids:
            return TokenizeError(request.uid, "the prompt is empty", field)
        params = request.params
        if params.prompt_logprobs and params.logprob_start_len == -1:  # SGLang's default: the last prompt token
            params.logprob_start_len = len(prompt_ids) - 1
        if params.prompt_logprobs and params.logprob_start_len >= len(prompt_ids):
            message = (f"logprob_start_len ({params.logprob_start_len}) must be smaller than the prompt's length "
                       f"({len(prompt_ids)} tokens)")
            return TokenizeError(request.uid, message, "logprob_start_len")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            message = f"logit_bias keys must be token ids below {self.vocab_size}"
            return TokenizeError(request.uid, message, "logit_bias")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            message = f"stop_token_ids must be token ids below {self.vocab_size}"
            return TokenizeError(request.uid, message, "stop_token_ids")
        if len(prompt_ids) >= self.context_length:
            return TokenizeError(
                request.uid,
                f"the prompt is {len(prompt_ids)} tokens, longer than the model's context length of "
                f"{self.context_length} tokens (it must leave room for at least one generated token)",
                field,
                "context_length_exceeded",
            )
        if params.max_tokens is None:  # as much as fits
            params.max_tokens = max(self.context_length - len(prompt_ids), 1)
        if len(prompt_ids) + params.max_tokens > self.context_length:
            return TokenizeError(
                request.uid,
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"context length of {self.context_length} tokens",
                field,
                "context_length_exceeded",
            )
        return UserRequest(request.uid, pack_ids(prompt_ids), params)
    # --8<-- [end:tokenize]

    def decode(self, ids: list[int]) -> str:
        """A prompt's token ids as text, for completions' ``echo`` of a prompt sent as ids. Special tokens are
        dropped, as in a reply's text and in SGLang's echo: the ids of a text with a BOS token added echo as
        that text."""
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError("prompt token ids must be in the vocabulary")
        return self.tokenizer.decode(ids, skip_special_tokens=True)
