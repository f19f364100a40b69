"""The paged server at ``--tp-size 3``: the OpenAI contract's replies, each rank with its own page allocator and
radix tree, which must stay identical (same pages handed out, same nodes split and evicted).

``--tp-check-lockstep`` is on, so a step where the ranks sampled different tokens stops the server.

From the contract, the tests that reach the scheduler run here (``tests/kit/openai_contract.py`` says
why the rest run once, against the chapter's main server).
"""

import pytest

from openai_contract import (  # the contract's tests that reach the scheduler, run against this configuration
    client,  # noqa: F401  fixtures of those tests
    contract_xfail,  # noqa: F401
    greedy,  # noqa: F401
    test_a_stop_string_spanning_tokens_ends_the_reply_before_it,  # noqa: F401
    test_disconnect_mid_stream_frees_the_slot,  # noqa: F401
    test_greedy_chat_is_what_transformers_generates,  # noqa: F401
    test_greedy_completion_is_what_transformers_generates_streamed_or_not,  # noqa: F401
    test_n_choices_with_a_seed,  # noqa: F401
)

pytestmark = pytest.mark.ranks(3)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--tp-size", "3", "--tp-check-lockstep")
