"""The shapes of requests the server accepts, as pydantic models (introduced in chapter 02).

They follow OpenAI's API: a client written for OpenAI works unchanged. Fields we do not use (such as
``frequency_penalty``) are accepted and ignored, as most OpenAI-compatible servers do. Range checks
live in ``SamplingParams``, so that the HTTP server and the engine agree on one set of rules.
"""

from typing import Literal

from pydantic import BaseModel, Field


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = None  # None: as many as the context leaves room for
    max_completion_tokens: int | None = None  # the newer OpenAI name for max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]


class GenerateRequest(BaseModel):
    """SGLang's native endpoint: text or token ids in, text and token ids out."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict = Field(default_factory=dict)
    stream: bool = False
