"""Generation on the real default model, against transformers' greedy ``generate``."""

import subprocess
import sys

import pytest
import torch

from minisgl.generate import TextStream
from minisgl.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain what a hash table is to a ten-year-old.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def hf_generate(model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(prompt_ids, max_new_tokens):
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids) :].tolist()

    return generate


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(prompt, generator, hf_generate):
    prompt_ids = generator.encode(prompt, chat=prompt != PROMPTS[-1])  # the code prompt is raw completion
    ours = generator.generate(prompt_ids, SamplingParams(max_tokens=32))
    theirs = hf_generate(prompt_ids, 32)
    if ours.finish_reason == "stop":  # ended on EOS: transformers keeps the EOS token, we do not
        assert theirs[len(ours.token_ids)] in generator.eos_ids
        theirs = theirs[: len(ours.token_ids)]
    assert ours.token_ids == theirs


def test_streamed_text_equals_decoded_tokens(generator, tokenizer):
    prompt_ids = generator.encode("Say hello in Japanese, Chinese and with an emoji.")
    deltas = list(generator.stream(prompt_ids, SamplingParams(max_tokens=48)))
    token_ids = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason in ("stop", "length")


def test_eos_ends_generation(generator):
    prompt_ids = generator.encode("What is the capital of France? Answer in one sentence.")
    out = generator.generate(prompt_ids, SamplingParams(max_tokens=64))
    assert out.finish_reason == "stop" and 0 < len(out.token_ids) < 64
    assert not set(out.token_ids) & generator.eos_ids  # the EOS token itself is not part of the reply
    ignored = generator.generate(prompt_ids, SamplingParams(max_tokens=len(out.token_ids) + 8, ignore_eos=True))
    assert ignored.finish_reason == "length" and ignored.token_ids[: len(out.token_ids)] == out.token_ids


def test_max_tokens_ends_generation(generator):
    prompt_ids = generator.encode("Tell me a long story about a dragon.")
    out = generator.generate(prompt_ids, SamplingParams(max_tokens=7))
    assert out.finish_reason == "length" and len(out.token_ids) == 7


@pytest.mark.exercise("stop-strings")
def test_stop_string_cuts_the_text_before_it(generator):
    prompt_ids = generator.encode("Tell me a long story about a dragon.")
    free = generator.generate(prompt_ids, SamplingParams(max_tokens=40))
    stop = free.text[25:31]  # a stop string from the middle of the reply, likely spanning tokens
    cut = free.text.index(stop)
    out = generator.generate(prompt_ids, SamplingParams(max_tokens=40, stop=["never appears", stop]))
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut]


@pytest.mark.exercise("stop-strings")
def test_text_stream_never_shows_text_past_a_stop_string(tokenizer):
    text = "The answer is 42. STOP-HERE and then more text"
    shown, stopped = "", False
    stream = TextStream(tokenizer, stop=["STOP-HERE"])
    for token_id in tokenizer.encode(text):
        piece, stopped = stream.add(token_id)
        shown += piece
        assert "STOP" not in shown  # not even a part of it leaks before we know
        if stopped:
            break
    assert stopped and shown == "The answer is 42. "


@pytest.mark.exercise("stop-strings")
def test_text_stream_releases_a_held_back_prefix_that_was_not_a_stop(tokenizer):
    stream = TextStream(tokenizer, stop=["ENDX"])
    shown = "".join(stream.add(t)[0] for t in tokenizer.encode("a bit END of it"))
    assert shown + stream.flush() == "a bit END of it"


def test_multibyte_characters_stream_whole(tokenizer):
    text = "日本語 😀 café"
    stream = TextStream(tokenizer, stop=[])
    pieces = [stream.add(t)[0] for t in tokenizer.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character


def test_same_seed_same_text_different_seed_different_text(generator):
    prompt_ids = generator.encode("Write a short poem about autumn.")

    def run(seed):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=16)
        return generator.generate(prompt_ids, params).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_prompt_longer_than_the_context_is_refused(generator):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        next(generator.stream([1] * 10, SamplingParams(max_tokens=generator.config.max_position_embeddings)))


def run_cli(request, *args):
    """``python -m minisgl`` from this chapter's snapshot (the working directory comes first on sys.path)."""
    return subprocess.run(
        [sys.executable, "-m", "minisgl", *args],
        cwd=request.config.minisgl_root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_streams_a_reply(request, model_path):
    result = run_cli(request, "What is 2+2?", "--model-path", str(model_path), "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "finish:" in result.stderr


def test_command_line_reports_a_bad_model_path(request, tmp_path):
    result = run_cli(request, "hi", "--model-path", str(tmp_path))
    assert result.returncode == 2 and "no config.json" in result.stderr
