"""The paged server at ``--tp-size 3``: the same OpenAI contract, each rank with its own page allocator and
radix tree, which must stay identical (same pages handed out, same nodes split and evicted).

``--tp-check-lockstep`` is on, so a step where the ranks sampled different tokens stops the server.
"""

import pytest

from openai_contract import *  # noqa: F403  the contract's tests and fixtures, run against this chapter

pytestmark = pytest.mark.ranks(3)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--tp-size", "3", "--tp-check-lockstep")
