"""The server with ``--attention-backend triton`` against ``--attention-backend torch``, through HTTP.

A tiny random model with the default model's tokenizer and chat template (so that prompts, templates and
stop handling are the real ones), the kernels run by Triton's interpreter on a CPU: the same greedy text
from both servers, for prompts that share a prefix (the second finds it in the radix cache) and a prompt
longer than the prefill chunk (chunks mixed with decode tokens).
"""

import httpx
import pytest

pytest.importorskip("triton", reason="Triton is available on Linux only: its kernels cannot run here")

SHARED = "The library opens at nine and closes at five on weekdays, and lends books, films and tools. "
PROMPTS = [
    SHARED * 2 + "On Saturdays it opens at ten and",
    SHARED * 2 + "On Sundays it is closed, except",
    " ".join(["A long prompt that takes several chunks to prefill, one after the other."] * 8),
]


def replies(server, model: str) -> list[tuple[str, int]]:
    out = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        data = response.json()
        out.append((data["choices"][0]["text"], data["usage"]["prompt_tokens_details"]["cached_tokens"]))
    return out


def test_triton_server_says_what_torch_server_says(start_server, tiny_chat_model):
    options = ("--model-path", str(tiny_chat_model), "--chunked-prefill-size", "32")
    torch_server = start_server(*options, "--attention-backend", "torch")
    triton_server = start_server(*options, "--attention-backend", "triton")
    expected = replies(torch_server, tiny_chat_model.name)
    assert expected[1][1] > 0, "the second prompt should find the first one's pages"
    assert replies(triton_server, tiny_chat_model.name) == expected
