"""The complete server's command line (DESIGN.md section 5): every flag there parses to its setting; and the
launcher's reading of a model folder against it (``resolve_config``)."""

import json

import pytest

from minisgl.args import overlap_schedule, parse_args


def test_max_prefill_length_is_the_chunked_prefill_size():
    """mini-sglang's name for the prompt tokens of one step; SGLang's is --chunked-prefill-size."""
    assert parse_args(["--max-prefill-length", "64"]).chunked_prefill_size == 64
    assert parse_args(["--chunked-prefill-size", "96"]).chunked_prefill_size == 96


@pytest.mark.parametrize("flags, field, value", [
    (["--attention-backend", "triton"], "attention_backend", "triton"),
    (["--cuda-graph-max-bs", "8"], "cuda_graph_max_bs", 8),
    (["--disable-cuda-graph"], "disable_cuda_graph", True),
    (["--shell"], "shell", True),
    (["--kv-cache-memory", "256"], "kv_cache_memory", 256),
    (["--max-request-bytes", "4096"], "max_request_bytes", 4096),
])
def test_chapter_06_flags(flags, field, value):
    assert getattr(parse_args(flags), field) == value


@pytest.mark.parametrize("flags, device, overlap", [
    ([], "cuda", True), ([], "cpu", False),  # on where it pays: a GPU (chapter 06 measures a CPU slower)
    (["--disable-overlap-schedule"], "cuda", False), (["--enable-overlap-schedule"], "cpu", True),
])
def test_overlap_scheduling_is_on_by_default_on_a_gpu_only(flags, device, overlap):
    assert overlap_schedule(parse_args(flags), device) is overlap


def test_overlap_cannot_be_both_on_and_off(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--enable-overlap-schedule", "--disable-overlap-schedule"])
    assert "not both" in capsys.readouterr().err


def test_a_backend_that_does_not_exist_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--attention-backend", "cuda"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_launcher_reads_config_json_with_the_models_own_reader(tmp_path):
    """One reader of config.json (``ModelConfig``): a model minisgl cannot run, or cannot split over --tp-size
    ranks, is refused before any process starts; which tokens end a reply is the launcher's one set."""
    from minisgl.config import resolve_config

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    resolved = resolve_config(parse_args(["--model-path", str(tmp_path), "--context-length", "512"]))
    assert (resolved.vocab_size, resolved.context_length, resolved.eos_token_ids) == (100, 256, (2, 7))
    with pytest.raises(ValueError, match=r"--tp-size 3 does not divide the model's 4 attention heads.*\(1, 2, 4\)"):
        resolve_config(parse_args(["--model-path", str(tmp_path), "--tp-size", "3"]))
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        resolve_config(parse_args(["--model-path", str(tmp_path)]))
