"""The paged server at ``--tp-size 3``: the OpenAI contract's replies, each rank with its own page allocator and
radix tree, which must stay identical (same pages handed out, same nodes split and evicted).

``--tp-check-lockstep`` is on, so a step where the ranks sampled different tokens stops the server. So is
overlap scheduling (``--enable-overlap-schedule``, off by default on a CPU): every rank builds each step
before the last one's tokens are back, and the contract's replies (streamed, stopped, aborted, constrained)
must hold with the ranks in lockstep.

From the contract, the tests that reach the scheduler run here (``tests/kit/scheduler_contract.py``;
``openai_contract.py`` says why the rest run once, against the chapter's main server).
"""

import pytest

from scheduler_contract import *  # noqa: F403  the contract's tests that reach the scheduler
from scheduler_contract import MODEL

pytestmark = pytest.mark.ranks(3)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--tp-size", "3", "--tp-check-lockstep", "--enable-overlap-schedule")


def test_constraints_logprobs_and_logit_bias_keep_the_ranks_in_lockstep(server, client):
    """Every rank compiles the grammar, masks and advances it: sampled replies (not only greedy ones)
    stay identical across ranks, or the lockstep check would stop the server."""
    import json

    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Is it raining?"}], max_tokens=20, temperature=1.0,
            seed=seed, logprobs=True, top_logprobs=2, logit_bias={"28": -5},
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        assert json.loads(reply.choices[0].message.content)["answer"] in ("yes", "no")
        assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    assert client.models.list().data[0].id == MODEL  # the server is still up: no rank left lockstep
