"""The multi-process server, through the real ``openai`` client and raw HTTP.

Everything chapter 02's server does, it still does: the OpenAI contract is written once, in
``tests/kit/openai_contract.py``, and runs here against this chapter's process tree (a disconnect, for
one, now has to travel from the API server through the tokenizer to the scheduler to free its slot).
"""

from openai_contract import *  # noqa: F403  the contract's tests and fixtures, run against this chapter
