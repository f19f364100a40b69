"""The server with ``--cache-type naive``: pages, but no prefix sharing; the contract's replies as the radix one.

The naive cache is the baseline the radix cache is measured against, so it must be as correct: every reply
the same, nothing cached, and every page free again once the server is idle.

From the contract, the tests that reach the scheduler run here (``tests/kit/scheduler_contract.py``;
``openai_contract.py`` says why the rest run once, against the chapter's main server).
"""

import httpx
import pytest

from scheduler_contract import *  # noqa: F403  the contract's tests that reach the scheduler
from scheduler_contract import MODEL


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--cache-type", "naive")


def test_nothing_is_cached_and_an_idle_server_holds_no_page(server, client):
    question = "Recite the zebra-quokka-narwhal rhyme about seventeen purple umbrellas, please."
    first, again = (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                   max_tokens=8, temperature=0) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == first.choices[0].message.content
    state = httpx.get(server.url + "/state").json()
    assert state["running"] == 0 and state["cached_pages"] == 0 and state["in_use_pages"] == 0
    assert state["free_pages"] == state["total_pages"] > 0 and state["prefix_hit_rate"] == 0
