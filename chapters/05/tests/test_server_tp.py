"""The paged server at ``--tp-size 3``: the OpenAI contract's replies, each rank with its own page allocator and
radix tree, which must stay identical (same pages handed out, same nodes split and evicted).

``--tp-check-lockstep`` is on, so a step where the ranks sampled different tokens stops the server.

From the contract, the tests that reach the scheduler run here (``tests/kit/scheduler_contract.py``;
``openai_contract.py`` says why the rest run once, against the chapter's main server).
"""

import pytest

from scheduler_contract import *  # noqa: F403  the contract's tests that reach the scheduler

pytestmark = pytest.mark.ranks(3)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--tp-size", "3", "--tp-check-lockstep")
