"""The OpenAI contract's tests whose requests reach the scheduler, for a module that serves a second
configuration of a chapter's server (another KV cache, more ranks):

    from scheduler_contract import *  # noqa: F403

``openai_contract.py`` says why the rest of the contract runs once, against the chapter's main server.
"""

from openai_contract import (
    MODEL,
    client,
    contract_xfail,
    greedy,
    test_a_stop_string_spanning_tokens_ends_the_reply_before_it,
    test_disconnect_mid_stream_frees_the_slot,
    test_greedy_chat_is_what_transformers_generates,
    test_greedy_completion_is_what_transformers_generates_streamed_or_not,
    test_n_choices_with_a_seed,
)

__all__ = [
    "MODEL",
    "client",
    "contract_xfail",
    "greedy",
    "test_a_stop_string_spanning_tokens_ends_the_reply_before_it",
    "test_disconnect_mid_stream_frees_the_slot",
    "test_greedy_chat_is_what_transformers_generates",
    "test_greedy_completion_is_what_transformers_generates_streamed_or_not",
    "test_n_choices_with_a_seed",
]
