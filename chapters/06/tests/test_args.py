"""The complete server's command line (DESIGN.md section 5): every flag there parses to its setting."""

import pytest

from minisgl.args import parse_args


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


def test_a_backend_that_does_not_exist_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--attention-backend", "cuda"])
    assert "invalid choice" in capsys.readouterr().err
