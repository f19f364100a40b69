"""SGLang's other stops and its per-tenant prefix cache (the epilogue): ``stop_token_ids``, ``stop_regex`` and
``cache_salt``, on chat, completions and ``/generate``.

- ``stop_token_ids`` end a reply as EOS does, in the scheduler: the token is left out of the text (``no_stop_trim``
  puts its text back), ``matched_stop`` is its id, ``ignore_eos`` ignores them as it does in SGLang. With overlap
  scheduling the scheduler learns each token a step late; the reply still ends on the stop token, no later.
- ``stop_regex`` ends a reply as a stop string does, in the detokenizer: the text is cut before the match, a tail a
  pattern has begun to match is held back (a literal pattern behaves exactly as the stop string it spells),
  ``matched_stop`` is the pattern. A pattern that does not compile, or matches the empty text, is a 400.
- ``cache_salt``: the radix cache keys a salted request's first page by ``(salt, token)`` pairs, so tenants share
  no page, one tenant shares as before, and eviction still frees the least recently used pages of all of them.
"""

import random
import re
import secrets

import httpx
import openai
import pytest
import test_paged_engine as paged
from test_detokenizer import random_case
from test_paged_engine import TINY_EOS, check_idle

from minisgl.core import InvalidParam, SamplingParams
from minisgl.engine import Engine
from minisgl.messages import BatchTokenOutput, NewRequestInfo, TokenOutput, UserRequest, pack_ids
from minisgl.scheduler import Scheduler
from minisgl.scheduler.pages import PageAllocator, pages_for
from minisgl.scheduler.radix import RadixCache, prefix_pages
from minisgl.tokenizer.detokenize import Detokenizer
from minisgl.tokenizer.text_stream import TextStream
from openai_contract import MODEL

one_thread = paged.one_thread  # the tiny model runs on one thread (see test_paged_engine.py)


# ------------------------------------------------------------------------ the radix cache with salts


def new_cache(page_size: int = 4, num_pages: int = 33) -> tuple[RadixCache, PageAllocator]:
    allocator = PageAllocator(num_pages)
    return RadixCache(page_size, allocator), allocator


def finish_request(cache: RadixCache, allocator: PageAllocator, tokens: list[int], salt: str | None) -> list[int]:
    """What the scheduler does for one request: match, lock, take pages for the rest, run, and give the cache
    what it computed. Returns the pages it matched."""
    prefix, node = cache.match_prefix(tokens, salt)
    cache.lock(node)
    pages = prefix + allocator.allocate(pages_for(len(tokens), cache.page_size) - len(prefix))
    cache.cache_finished(tokens, pages, node, salt)
    return prefix


A = list(range(1, 13))  # three pages of 4


def test_a_salt_shares_cached_pages_only_with_the_same_salt():
    cache, allocator = new_cache()
    assert finish_request(cache, allocator, A, "tenant-a") == []
    assert cache.match_prefix(A + [99], "tenant-a")[0] == prefix_pages(cache.match_prefix(A + [99], "tenant-a")[1])
    assert len(cache.match_prefix(A + [99], "tenant-a")[0]) == 3  # the same tenant: all of it
    assert cache.match_prefix(A + [99], "tenant-b") == ([], cache.root)  # another tenant: nothing
    assert cache.match_prefix(A + [99]) == ([], cache.root)  # no salt: nothing
    assert finish_request(cache, allocator, A, None) == []  # the unsalted prompt is cached apart...
    assert cache.match_prefix(A + [99], "tenant-b") == ([], cache.root)  # ...and still not the other tenant's
    salted, plain = cache.match_prefix(A + [99], "tenant-a")[0], cache.match_prefix(A + [99])[0]
    assert len(salted) == len(plain) == 3 and not set(salted) & set(plain)  # two copies, one for each
    assert len(cache.root.children) == 2 and cache.cached_pages == 6
    # a match that ends inside the tenant's node splits it there, under the tenant's own root child
    pages, node = cache.match_prefix(A[:9] + [50, 51, 52], "tenant-a")
    assert pages == salted[:2] and prefix_pages(node) == salted[:2]
    assert "salt='tenant-a'" in cache.render() and cache.render().count("salt=") == 1  # its first node only


def test_a_salted_request_shares_its_prompt_while_it_runs():
    """The scheduler's protocol (cache_unfinished after a chunk, cache_finished at the end) with a salt: a second
    request of the tenant finds the first one's prompt while it still runs; another tenant does not."""
    cache, allocator = new_cache()
    prefix, node = cache.match_prefix(A + [13], "t")
    cache.lock(node)
    pages = allocator.allocate(4)
    pages, node = cache.cache_unfinished(A + [13], pages, node, "t")  # its prompt is in
    assert len(cache.match_prefix(A + [77], "t")[0]) == 3 and cache.match_prefix(A + [77], "u")[0] == []
    assert cache.evictable_pages == 0  # the running request holds them
    cache.cache_finished(A + [13, 14], pages, node, "t")
    assert cache.evictable_pages == cache.cached_pages == 3
    assert allocator.num_free + cache.cached_pages == allocator.num_total


def test_reclaiming_pages_frees_the_least_recently_used_across_tenants():
    cache, allocator = new_cache(num_pages=40)
    for salt in ("old", None, "new"):  # three copies of one prompt, used in this order
        finish_request(cache, allocator, A, salt)
    assert cache.cached_pages == cache.evictable_pages == 9
    prefix, node = cache.match_prefix(A + [99], "old")  # "old" is used again, and locked: it stays
    cache.lock(node)
    assert cache.evictable_pages == 6
    freed = cache.evict(3)  # the least recently used unlocked copy: the unsalted one
    assert freed == 3 and cache.match_prefix(A + [99]) == ([], cache.root)
    assert len(cache.match_prefix(A + [99], "new")[0]) == 3
    cache.unlock(node)
    assert cache.evict(cache.evictable_pages) == 6  # everything else, both tenants' pages
    assert cache.cached_pages == 0 and cache.root.children == {}
    assert allocator.num_free == allocator.num_total


def test_random_salted_requests_keep_every_page_accounted_for():
    """Prompts of a few tenants (and none) that share beginnings, finished one after another while pages run
    short: every page is free or cached once, each tenant only ever matches its own prompts."""
    rng = random.Random(0)
    cache, allocator = new_cache(page_size=4, num_pages=25)
    salts = ["a", "b", None]
    bases = [[rng.randrange(1, 50) for _ in range(16)] for _ in range(3)]
    cached: dict[str | None, list[list[int]]] = {salt: [] for salt in salts}
    hits = 0
    for _ in range(300):
        salt, base = rng.choice(salts), rng.choice(bases)
        tokens = base[: rng.randrange(2, 17)] + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 9))]
        needed = pages_for(len(tokens), 4)
        if needed > allocator.num_free:
            cache.evict(needed - allocator.num_free)
        prefix = finish_request(cache, allocator, tokens, salt)
        longest = max((n for seen in cached[salt] for n in range(0, min(len(seen), len(tokens) - 1) + 1, 4)
                       if seen[:n] == tokens[:n]), default=0)
        assert len(prefix) * 4 <= longest, "it matched a prefix its own tenant never cached"
        hits += bool(prefix)
        cached[salt].append(tokens)
        assert allocator.num_free + cache.cached_pages == allocator.num_total
        assert cache.evictable_pages == cache.cached_pages
        pages = [page for _, node in cache.nodes() for page in node.pages]
        assert len(pages) == len(set(pages)) == cache.cached_pages
    assert hits > 50  # tenants did share with themselves
    cache.evict(cache.cached_pages)
    assert allocator.num_free == allocator.num_total


# ------------------------------------------------------------------------ stop patterns in the text stream


def pieces(tokenizer, stream: TextStream, texts: list[str]) -> list[tuple[str, bool]]:
    """Feed one token per text (each must be one token) and return what ``add`` gave back for each."""
    out = []
    for text in texts:
        [token] = tokenizer.encode(text, add_special_tokens=False)
        out.append(stream.add(token))
        if out[-1][1]:
            break
    return out


def test_a_stop_pattern_holds_back_what_it_has_begun_to_match(tokenizer):
    stream = TextStream(tokenizer, [], [r"b+c"])
    assert pieces(tokenizer, stream, ["x", "a", "b", "b", "x"]) == [("x", False), ("a", False), ("", False),
                                                                    ("", False), ("bbx", False)]
    assert pieces(tokenizer, stream, ["b", "c", "z"]) == [("", False), ("", True)]
    assert (stream.matched, stream.matched_text) == (r"b+c", "bc")


def test_a_stop_pattern_sees_the_text_before_what_was_sent(tokenizer):
    """A lookbehind (and ``^``, ``\\b``) reads text already sent: the search starts at the unsent text, with the
    whole text before it."""
    stream = TextStream(tokenizer, [], [r"(?<=x)y"])
    assert pieces(tokenizer, stream, ["a", "y", "x", "y"]) == [("a", False), ("y", False), ("x", False), ("", True)]
    assert stream.matched_text == "y"


def test_a_literal_pattern_behaves_as_the_stop_string_it_spells(tokenizer):
    rng = random.Random(1)
    stopped = 0
    for case in range(300):
        text, stops = random_case(rng)
        stop = stops[:1]
        strings, patterns = TextStream(tokenizer, stop), TextStream(tokenizer, [], [re.escape(s) for s in stop])
        for token in tokenizer.encode(text, add_special_tokens=False):
            got, expected = patterns.add(token), strings.add(token)
            assert got == expected, (case, text, stop)
            if got[1]:
                stopped += 1
                assert patterns.matched_text == strings.matched_text == stop[0]
                break
        else:
            assert patterns.flush() == strings.flush()
    assert 30 < stopped < 270


def test_the_detokenizer_reports_the_pattern_and_the_text_it_cut(tokenizer):
    detokenizer = Detokenizer(tokenizer)
    ids = tokenizer.encode(" one two three", add_special_tokens=False)
    info = NewRequestInfo("r", prompt_tokens=3, stop=[], stop_regex=[r"t\w+"])
    texts = [detokenizer.detokenize(BatchTokenOutput([TokenOutput("r", ids[0], new=info)]))[0]]
    texts += [detokenizer.detokenize(BatchTokenOutput([TokenOutput("r", token)]))[0] for token in ids[1:2]]
    assert "".join(t for out in texts for t in out.texts) == " one "
    last = texts[-1]
    assert (last.finish_reasons, last.matched_stops, last.matched_texts) == (["stop"], [r"t\w+"], ["two"])
    # a stop token: its id is what matched, its own text what was cut ("" for a special token, such as EOS)
    comma = tokenizer.encode(",", add_special_tokens=False)[0]
    info = NewRequestInfo("s", prompt_tokens=3, stop=[])
    out, _ = detokenizer.detokenize(BatchTokenOutput([TokenOutput("s", ids[0], new=info),
                                                      TokenOutput("s", -1, "stop", matched_eos=comma)]))
    assert (out.texts, out.matched_stops, out.matched_texts) == ([" one", ""], [None, comma], ["", ","])
    assert detokenizer.states == {}


def test_stop_token_ids_must_be_token_ids():
    with pytest.raises(InvalidParam, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[5, -1])


# ------------------------------------------------------------------------ stop tokens under overlap scheduling


def tiny_scheduler(tiny_llama, overlap: bool) -> Scheduler:
    engine = Engine(tiny_llama, "float32", "cpu", 64 + 1, 4, 128, max_running_requests=4)
    return Scheduler(engine, 4, 8, {TINY_EOS}, "radix", overlap=overlap)


def run(scheduler: Scheduler, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[TokenOutput]]:
    for uid, (prompt, params) in requests.items():
        scheduler.handle(UserRequest(uid, pack_ids(prompt), params))
    outputs: dict[str, list[TokenOutput]] = {uid: [] for uid in requests}
    for _ in range(60):
        if not scheduler.has_work:
            break
        message = scheduler.step()
        for output in message.outputs if message else []:
            assert not any(earlier.finish for earlier in outputs[output.uid]), f"{output.uid}: output after its end"
            outputs[output.uid].append(output)
    return outputs


def tokens_of(outputs: list[TokenOutput]) -> list[int]:
    return [output.token for output in outputs if output.token >= 0]


def test_a_stop_token_ends_the_reply_with_overlap_as_without(tiny_llama):
    no_eos = {TINY_EOS: -100.0}  # the tiny model's replies go on to max_tokens: only the stop token ends them
    free = run(tiny_scheduler(tiny_llama, overlap=False), {"free": ([5, 6, 7], SamplingParams(
        max_tokens=10, logit_bias=no_eos))})["free"]
    free_tokens = tokens_of(free)
    k = next(i for i in range(2, len(free_tokens)) if free_tokens[i] not in free_tokens[:i])
    stop = free_tokens[k]
    for overlap in (False, True):
        scheduler = tiny_scheduler(tiny_llama, overlap)
        outputs = run(scheduler, {
            "stops": ([5, 6, 7], SamplingParams(max_tokens=10, logit_bias=no_eos, stop_token_ids=[stop])),
            "ignores": ([5, 6, 7], SamplingParams(max_tokens=10, logit_bias=no_eos, stop_token_ids=[stop],
                                                  ignore_eos=True)),  # SGLang: ignore_eos ignores them too
            "other": ([9, 8, 7, 6], SamplingParams(max_tokens=6, ignore_eos=True))})
        stopped, last = outputs["stops"], outputs["stops"][-1]
        assert tokens_of(stopped) == free_tokens[:k], f"overlap {overlap}: the stop token is not part of the reply"
        assert (last.finish, last.matched_eos, last.token) == ("stop", stop, -1)
        assert tokens_of(outputs["ignores"]) == free_tokens and outputs["ignores"][-1].finish == "length"
        assert len(tokens_of(outputs["other"])) == 6
        if overlap:
            assert scheduler.forward_thread is not None
        check_idle(scheduler)
        assert sorted(scheduler.free_slots) == [0, 1, 2, 3]


# ------------------------------------------------------------------------ through the server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def greedy_ids(server, prompt: dict, tokens: int = 16) -> list[int]:
    """The greedy reply's token ids, from /generate's log probabilities (``prompt``: text or input_ids)."""
    body = prompt | {"sampling_params": {"max_new_tokens": tokens, "temperature": 0}, "return_logprob": True}
    return [entry[1] for entry in post(server, "/generate", body)["meta_info"]["output_token_logprobs"]]


def first_new(ids: list[int]) -> int:
    """The first position from 2 on whose token has not appeared before: a stop token there ends the reply there."""
    return next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])


COUNTING = "Count with me: 1, 2, 3, 4,"


def test_stop_token_ids_end_a_completion_and_a_generate_on_that_token(client, server, tokenizer):
    ids = greedy_ids(server, {"text": COUNTING})
    k = first_new(ids)
    stop, before = ids[k], tokenizer.decode(ids[:k])
    reply = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=16, temperature=0,
                                      extra_body={"stop_token_ids": [stop]})
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["matched_stop"]) == (before, "stop", stop)
    assert reply.usage.completion_tokens == k
    native = post(server, "/generate", {"text": COUNTING, "sampling_params": {
        "max_new_tokens": 16, "temperature": 0, "stop_token_ids": [stop]}})
    assert native["text"] == before
    assert native["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = post(server, "/generate", {"text": COUNTING, "sampling_params": {
        "max_new_tokens": 16, "temperature": 0, "stop_token_ids": [stop], "no_stop_trim": True}})
    assert kept["text"] == before + tokenizer.decode([stop])  # SGLang keeps the token, decoded
    streamed = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=16, temperature=0, stream=True,
                                         extra_body={"stop_token_ids": [stop]})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_end_a_chat_on_that_token(client, server, tokenizer):
    messages = [{"role": "user", "content": "Name three colors."}]
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = greedy_ids(server, {"input_ids": tokenizer.encode(template, add_special_tokens=False)})
    k = first_new(ids)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                           extra_body={"stop_token_ids": [ids[k]]})
    choice = reply.choices[0]
    assert choice.message.content == tokenizer.decode(ids[:k])
    assert (choice.finish_reason, choice.model_extra["matched_stop"]) == ("stop", ids[k])


def literal_pattern(text: str) -> tuple[str, str]:
    """Three characters from the middle of ``text``, as a pattern that is not a plain string (a character class,
    a group): it first matches where the three characters first appear."""
    middle = text[len(text) // 2 : len(text) // 2 + 3]
    return middle, f"[{re.escape(middle[0])}](?:{re.escape(middle[1:])})"


def test_stop_regex_cuts_a_completion_before_the_match_whole_and_streamed(client, server):
    free = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0).choices[0].text
    middle, pattern = literal_pattern(free)
    cut = free[: free.index(middle)]
    patterns = ["zq{3}x", pattern]  # a list; the first never matches
    reply = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0,
                                      extra_body={"stop_regex": patterns})
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["matched_stop"]) == (cut, "stop", pattern)
    chunks = list(client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"stop_regex": patterns}))
    assert "".join(c.choices[0].text for c in chunks) == cut  # nothing past the match was ever sent
    assert chunks[-1].choices[0].model_extra["matched_stop"] == pattern
    kept = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0,
                                     extra_body={"stop_regex": pattern, "no_stop_trim": True})
    assert kept.choices[0].text == cut + middle  # what the pattern matched, put back
    native = post(server, "/generate", {"text": COUNTING, "sampling_params": {
        "max_new_tokens": 24, "temperature": 0, "stop_regex": pattern}})
    assert native["text"] == cut and native["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}


def test_stop_regex_ends_a_chat(client):
    messages = [{"role": "user", "content": "Describe the sea in two sentences."}]
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    middle, pattern = literal_pattern(text)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                           extra_body={"stop_regex": pattern})
    assert reply.choices[0].message.content == text[: text.index(middle)]
    assert reply.choices[0].model_extra["matched_stop"] == pattern


BAD_STOPS = [
    ("/v1/completions", {"stop_regex": "(unclosed"}, "stop_regex", "not a regular expression"),
    ("/v1/chat/completions", {"stop_regex": ["ok", "x*"]}, "stop_regex", "matches the empty text"),
    ("/v1/completions", {"stop_regex": ["a"] * 5}, "stop_regex", "at most 4"),
    ("/v1/completions", {"stop_regex": "a" * 257}, "stop_regex", "at most 256"),
    ("/generate", {"stop_regex": "[z-a]"}, "sampling_params.stop_regex", "not a regular expression"),
    ("/v1/completions", {"stop_token_ids": [10**9]}, "stop_token_ids", "token ids below"),
    ("/v1/chat/completions", {"stop_token_ids": [-3]}, "stop_token_ids", "token ids of the vocabulary"),
    ("/v1/completions", {"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64"),
    ("/generate", {"stop_token_ids": [10**9]}, "stop_token_ids", "token ids below"),
    ("/v1/completions", {"cache_salt": ""}, "cache_salt", "non-empty"),
    ("/v1/chat/completions", {"cache_salt": "s" * 257}, "cache_salt", "at most 256"),
    ("/generate", {"cache_salt": ["a", "b"]}, "cache_salt", "string"),
]


@pytest.mark.parametrize("path, fields, param, words", BAD_STOPS,
                         ids=[f"{path.strip('/').replace('/', '-')}-{param}-{i}"
                              for i, (path, _, param, _) in enumerate(BAD_STOPS)])
def test_a_bad_stop_or_salt_is_a_400_naming_its_field(server, path, fields, param, words):
    if path == "/generate":
        sampling = {k: v for k, v in fields.items() if k != "cache_salt"}
        body = {"text": "Hi", "sampling_params": {"max_new_tokens": 2} | sampling}
        body |= {k: v for k, v in fields.items() if k == "cache_salt"}
    elif path == "/v1/completions":
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2} | fields
    else:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | fields
    error = post(server, path, body, 400)["error"]
    assert error["param"] == param and words in error["message"], error


def test_tenants_with_different_salts_never_share_cached_prefixes(client, server):
    # A prompt of several pages (16 tokens each) that no earlier test sent: nothing of it is cached yet.
    prompt = f"Ticket {secrets.token_hex(4)}: " + "the customer writes about a delayed parcel again. " * 8

    def cached(salt: str | None) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert [cached("tenant-a"), cached("tenant-b"), cached(None)] == [0, 0, 0]  # each its own copy
    assert cached("tenant-a") >= 48 and cached("tenant-b") >= 48 and cached(None) >= 48  # each finds its own
    native = post(server, "/generate", {"text": prompt, "cache_salt": "tenant-a",
                                        "sampling_params": {"max_new_tokens": 1}})
    assert native["meta_info"]["cached_tokens"] >= 48  # the salt goes with the tenant, whichever endpoint
    fresh = post(server, "/generate", {"text": prompt, "cache_salt": "tenant-c",
                                       "sampling_params": {"max_new_tokens": 1}})
    assert fresh["meta_info"]["cached_tokens"] == 0
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "Summarize."}]

    def chat_cached(salt: str) -> int:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                               extra_body={"cache_salt": salt})
        return reply.usage.prompt_tokens_details.cached_tokens

    assert chat_cached("tenant-a") == 0 and chat_cached("tenant-a") >= 48 and chat_cached("tenant-b") == 0
