"""The server at ``--tp-size 3``, through the real ``openai`` client and raw HTTP.

Split over three ranks, the server must still do everything chapter 03's did: the OpenAI contract
(``tests/kit/openai_contract.py``) runs here against three schedulers in lockstep, with
``--tp-check-lockstep`` on, so that a step where the ranks sampled different tokens stops the server.
"""

from openai_contract import *  # noqa: F403  the contract's tests and fixtures, run against this chapter
