"""The server with the radix prefix cache, through the real ``openai`` client and raw HTTP.

Paged, with prefixes shared between requests, the server must still do everything chapter 04's did: the
OpenAI contract (``tests/kit/openai_contract.py``) runs here against it. What chapter 05 adds to the
reply: a prompt whose beginning the cache already held reports it as ``usage.prompt_tokens_details.cached_tokens``.
"""

import signal

import httpx

from openai_contract import *  # noqa: F403  the contract's tests and fixtures, run against this chapter
from openai_contract import MODEL
from server_process import wait_until_gone
from streams import ended_with_error_events, open_streams

PAGE_SIZE = 16  # the server's default --page-size


def test_a_repeated_prompt_reports_its_cached_prefix_and_says_the_same(server, client):
    # Words no other test sends, so that the first request finds at most the chat template's system prompt.
    question = "Recite the zebra-quokka-narwhal rhyme about seventeen purple umbrellas, please."
    first, again = (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                   max_tokens=8, temperature=0) for _ in range(2))
    prompt_tokens = first.usage.prompt_tokens
    assert again.usage.prompt_tokens == prompt_tokens
    # The second finds the whole prompt in the cache, in whole pages, less the one token it must run itself.
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // PAGE_SIZE * PAGE_SIZE
    assert first.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].message.content == first.choices[0].message.content  # the cache changes no token
    state = httpx.get(server.url + "/state").json()
    assert state["running"] == 0 and state["in_use_pages"] == 0  # idle: nobody holds a page
    assert state["cached_pages"] > 0 and state["free_pages"] + state["cached_pages"] == state["total_pages"]
    assert state["prefix_hit_rate"] > 0


def test_sigterm_ends_every_stream_in_flight_with_an_error_event(start_server):
    server = start_server()  # its own: this test stops it
    children = server.descendants()
    streams = open_streams(server, 2)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    assert wait_until_gone(children) == []
    assert ended_with_error_events(*streams), streams[1]  # each client is told, none is cut off without a word
