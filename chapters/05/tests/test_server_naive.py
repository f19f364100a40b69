"""The server with ``--cache-type naive``: pages, but no prefix sharing; the contract's replies as the radix one.

The naive cache is the baseline the radix cache is measured against, so it must be as correct: every reply
the same, nothing cached, and every page free again once the server is idle.

From the contract, the tests that reach the scheduler run here (``tests/kit/openai_contract.py`` says
why the rest run once, against the chapter's main server).
"""

import httpx
import pytest

from openai_contract import (  # the contract's tests that reach the scheduler, run against this configuration
    MODEL,
    client,  # noqa: F401  fixtures of those tests
    contract_xfail,  # noqa: F401
    greedy,  # noqa: F401
    test_a_stop_string_spanning_tokens_ends_the_reply_before_it,  # noqa: F401
    test_disconnect_mid_stream_frees_the_slot,  # noqa: F401
    test_greedy_chat_is_what_transformers_generates,  # noqa: F401
    test_greedy_completion_is_what_transformers_generates_streamed_or_not,  # noqa: F401
    test_n_choices_with_a_seed,  # noqa: F401
)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--cache-type", "naive")


def test_nothing_is_cached_and_an_idle_server_holds_no_page(server, client):  # noqa: F811  the fixture
    question = "Recite the zebra-quokka-narwhal rhyme about seventeen purple umbrellas, please."
    first, again = (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                   max_tokens=8, temperature=0) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == first.choices[0].message.content
    state = httpx.get(server.url + "/state").json()
    assert state["running"] == 0 and state["cached_pages"] == 0 and state["in_use_pages"] == 0
    assert state["free_pages"] == state["total_pages"] > 0 and state["prefix_hit_rate"] == 0
