"""The one-process server, through the real ``openai`` client and raw HTTP.

The OpenAI contract that every chapter's server keeps is written once, in ``tests/kit/openai_contract.py``;
this file runs it against this chapter's server and adds what only this chapter's server does.
"""

import httpx

from openai_contract import *  # noqa: F403  the contract's tests and fixtures, run against this chapter


def test_native_generate_returns_the_token_ids(server, tokenizer):
    body = {"text": "The sky is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert len(out["output_ids"]) == 4 and out["text"] == tokenizer.decode(out["output_ids"])
