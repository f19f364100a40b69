"""Generating text for one request (introduced in chapter 01).

``Generator`` ties the pieces together: the tokenizer and chat template (from transformers), the model,
the KV cache and sampling. ``Generator.stream`` is the whole inference loop of this chapter:

1. **prefill**: run every prompt token through the model at once, filling the KV cache;
2. **decode**: sample a token from the last position's logits, run just that token, repeat;
3. **stop** on an end-of-sequence token, on a stop string, or after ``max_tokens``.

Text is handed out as it is produced. Two details make that correct: a token can end in the middle of
a multi-byte UTF-8 character (tokenizers' ``DecodeStream`` holds such bytes back), and text that might
be the beginning of a stop string must be held back until we know (``TextStream``).
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from .models import load_model, resolve_model_path
from .sampling import SamplingParams, make_generator, sample


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` picks bfloat16 where the hardware computes it fast, else float32 (float16 on old GPUs)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


# --8<-- [start:text-stream]
class TextStream:
    """Turns token ids into text, one token at a time, and watches for stop strings.

    ``add`` returns the text that is now safe to show and whether a stop string was found. Text after
    a stop string is never returned, nor is the stop string itself.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.backend = tokenizer.backend_tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # how many characters of it were handed out

    def add(self, token_id: int) -> tuple[str, bool]:
        self.text += self.decoder.step(self.backend, token_id) or ""  # None: waiting for more bytes
        # --8<-- [start:ex-stop-strings]
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            return self._release(min(hits)), True
        # Hold back the longest tail that could still grow into a stop string.
        held = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        return self._release(len(self.text) - held), False
        # --8<-- [end:ex-stop-strings]

    def flush(self) -> str:
        """The rest of the text, once generation has ended for another reason."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece
# --8<-- [end:text-stream]


@dataclass
class Delta:
    """One streamed piece of a reply; ``finish_reason`` is set on the last one (``stop`` or ``length``)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class Generator:
    def __init__(self, model_path: str | Path, dtype: str = "auto", device: str = "auto"):
        model_path = resolve_model_path(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(model_path, self.dtype, self.device)
        self.config = self.model.config
        if not any((model_path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise FileNotFoundError(f"no tokenizer in {model_path}: expected tokenizer.json (or tokenizer.model)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.eos_ids = set(self.config.eos_token_ids) | _generation_eos_ids(model_path)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

    # --8<-- [start:encode]
    def encode(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids of ``prompt``; with ``chat``, wrapped in the model's chat template first."""
        if not chat:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template already has them
    # --8<-- [end:encode]

    @torch.inference_mode()
    def _forward(self, token_ids: list[int], start: int, kv_cache) -> torch.Tensor:
        """Logits of the last of ``token_ids``, which sit at positions start, start + 1, ..."""
        hidden = self.model(torch.tensor(token_ids, device=self.device), start, kv_cache)
        return self.model.logits(hidden[-1])

    # --8<-- [start:stream]
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Delta]:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.config.max_position_embeddings} tokens"
            )
        kv_cache = self.model.new_kv_cache(total)
        rng = make_generator(params.seed, self.device)
        text = TextStream(self.tokenizer, params.stop)

        logits = self._forward(prompt_ids, 0, kv_cache)  # prefill
        position = len(prompt_ids)
        for step in range(params.max_tokens):
            token = sample(logits, params, rng)
            if token in self.eos_ids and not params.ignore_eos:
                yield Delta(text.flush(), [], "stop")
                return
            piece, hit_stop = text.add(token)
            if hit_stop:
                yield Delta(piece, [token], "stop")
                return
            if step == params.max_tokens - 1:
                yield Delta(piece + text.flush(), [token], "length")
                return
            yield Delta(piece, [token])
            logits = self._forward([token], position, kv_cache)  # decode one token
            position += 1
    # --8<-- [end:stream]

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Run ``stream`` to the end and collect the reply."""
        pieces, token_ids = [], []
        for delta in self.stream(prompt_ids, params):
            pieces.append(delta.text)
            token_ids += delta.token_ids
        return Completion("".join(pieces), token_ids, delta.finish_reason, len(prompt_ids))


def _generation_eos_ids(model_path: str | Path) -> set[int]:
    """Chat models often list extra end ids in ``generation_config.json`` (Qwen's <|endoftext|>, say)."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return set() if eos is None else set(eos) if isinstance(eos, list) else {eos}
