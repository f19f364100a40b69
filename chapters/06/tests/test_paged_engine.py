"""The paged engine and its scheduler, in one process (carried from chapter 05: chapter 06 must keep all of it):
exactness on the real model, and page accounting under load.

On the default model (float32), with the scheduler built directly and fed the messages a server would send:
- greedy tokens are transformers' whatever the page size (1, 16, 64) and the prefill chunk size;
- a prompt that starts like an earlier one finds that prefix in the radix cache (``cached_tokens``) and
  still says exactly what it says without the cache.

On a tiny random model, a seeded random workload (shared prefixes, duplicates, random lengths, aborts at
random points, some in the middle of a chunked prefill, more requests than the pool holds) checks after
every step that every page has exactly one owner: the free list, the radix tree, or one admitted request.

Last, the scheduler process's loop (``serve_steps``) with stand-in sockets: the counts it publishes for
``GET /state`` must already show the step whose tokens it sends.
"""

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from minisgl.core import SamplingParams
from minisgl.engine import Engine
from minisgl.messages import AbortRequest, BatchTokenOutput, TokenOutput, UserRequest, pack_ids
from minisgl.scheduler import Scheduler
from minisgl.scheduler.pages import pages_for
from minisgl.scheduler.radix import RadixCache, prefix_pages


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every model here runs on one thread. Ours are small, and on a busy machine (CI, or a laptop doing other
    work) two threads of one process wait for each other more than they work: a step of the default model
    measured 12 times slower with two threads than with one while other processes kept the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    """What the detokenizer would learn about one request from the scheduler's messages."""

    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    cached_tokens: int | None = None  # from NewRequestInfo: set once, before or with its first output
    prompt_tokens: int | None = None
    finishes: int = 0  # how many messages said it finished: exactly one, however it ended


def collect(replies: dict[str, Reply], message: BatchTokenOutput | list[TokenOutput] | None) -> None:
    """``message``: a step's, or the outputs of ``Scheduler.handle`` (an abort ends its request at once)."""
    if message is None:
        return
    for output in message.outputs if isinstance(message, BatchTokenOutput) else message:
        uid, token, finish, info = output.uid, output.token, output.finish, output.new
        if info is not None:
            reply = replies.setdefault(info.uid, Reply())
            assert reply.cached_tokens is None, f"request {info.uid} was announced twice"
            reply.cached_tokens, reply.prompt_tokens = info.cached_tokens, info.prompt_tokens
        reply = replies[uid]
        assert reply.cached_tokens is not None, f"request {uid} got output before it was announced"
        assert reply.finish is None, f"request {uid} got output after it finished ({reply.finish})"
        if token != -1:
            reply.tokens.append(token)
        if finish is not None:
            reply.finish, reply.finishes = finish, reply.finishes + 1


def submit(scheduler: Scheduler, uid: str, prompt: list[int], **params) -> None:
    scheduler.handle(UserRequest(uid, pack_ids(prompt), SamplingParams(**params)))


def run_until_idle(scheduler: Scheduler, replies: dict[str, Reply], max_steps: int, check=None) -> int:
    """Step until nothing is left (a bounded number of steps), then once more to flush what is pending."""
    steps = 0
    while scheduler.has_work:
        assert steps < max_steps, f"still working after {max_steps} steps: {scheduler.state()}"
        collect(replies, scheduler.step())
        steps += 1
        if check:
            check(scheduler)
    collect(replies, scheduler.step())  # an idle step: must say nothing more
    return steps


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------- the real model

SYSTEM = ("You are a meticulous librarian in a small mountain town. You answer questions about books, reading "
          "and the history of libraries, briefly and kindly, and you never invent titles or authors. When you do "
          "not know something, you say so plainly and suggest where the reader could look it up.")
NEW_TOKENS = 12


def chat_ids(tokenizer, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def eos_ids(model_path) -> set[int]:
    from minisgl.config import eos_token_ids, read_json

    return set(eos_token_ids(model_path, read_json(model_path / "config.json"),
                             read_json(model_path / "tokenizer_config.json") or {}))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    found = {
        "chat": chat_ids(tokenizer, "What is the capital of France? Answer in one sentence."),
        "code": tokenizer.encode("def fibonacci(n):"),
        "long": chat_ids(tokenizer, "Which book should I read first?", SYSTEM),
    }
    assert len(found["long"]) > 64 and len(found["code"]) < 16  # more than a page of 64; less than one of 16
    return found


@pytest.fixture(scope="module")
def oracle(model_path, eos_ids):
    """transformers' greedy ``generate`` in float32: prompt ids -> (the new ids before any EOS, finish reason)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    memo = {}

    def generate(prompt: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], str]:
        if (tuple(prompt), new_tokens) not in memo:
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=sorted(eos_ids))
            tokens = out[0, len(prompt):].tolist()
            ended = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
            memo[tuple(prompt), new_tokens] = (tokens, "length") if ended is None else (tokens[:ended], "stop")
        return memo[tuple(prompt), new_tokens]

    return generate


@pytest.fixture(scope="module")
def real_engine(model_path):
    """The default model in float32 with a pool of pages of the given size (one engine per size, kept)."""
    engines = {}

    def make(page_size: int) -> Engine:
        if page_size not in engines:
            engines[page_size] = Engine(model_path, "float32", "cpu", pages_for(4 * 256, page_size) + 1, page_size,
                                        512)
        return engines[page_size]

    return make


def serve(engine: Engine, eos_ids, requests: dict[str, list[int]], chunk: int = 0, cache_type: str = "radix",
          stagger: bool = False) -> tuple[dict[str, Reply], Scheduler]:
    """Run greedy requests of NEW_TOKENS tokens through a fresh scheduler on ``engine`` until it is idle. With
    ``stagger`` the first request is prefilled alone before the others arrive, so steps mix decode and prefill."""
    scheduler = Scheduler(engine, 4, chunk, eos_ids, cache_type)
    replies: dict[str, Reply] = {}
    uids = list(requests)
    for i, uid in enumerate(uids):
        submit(scheduler, uid, requests[uid], max_tokens=NEW_TOKENS)
        while stagger and i == 0 and not scheduler.running:  # its prompt is in before the others arrive
            collect(replies, scheduler.step())
    bound = sum(len(p) + NEW_TOKENS for p in requests.values()) + 2
    run_until_idle(scheduler, replies, bound)
    return replies, scheduler


@pytest.mark.real_model
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_greedy_tokens_are_what_transformers_generates(real_engine, eos_ids, prompts, oracle, page_size):
    replies, scheduler = serve(real_engine(page_size), eos_ids, prompts)
    for uid, prompt in prompts.items():
        tokens, finish = oracle(prompt)
        got = replies[uid]
        assert (got.tokens, got.finish) == (tokens, finish), (
            f"page size {page_size}, prompt {uid!r}: said {got.tokens} ({got.finish}), transformers {tokens} ({finish})"
        )
        assert got.prompt_tokens == len(prompt) and got.cached_tokens == 0  # a fresh cache holds nothing yet
    assert scheduler.pages.num_free + scheduler.cache.cached_pages == scheduler.pages.num_total


@pytest.mark.real_model
@pytest.mark.parametrize("chunk", [0, 1, 15, 17], ids=["whole", "chunk-1", "page-minus-1", "page-plus-1"])
def test_chunked_prefill_gives_the_same_tokens(real_engine, eos_ids, prompts, oracle, chunk):
    # Pages of 16, chunks that end inside pages; the first request is prefilled alone, so the second's chunks
    # share steps with its decoding. (Two prompts, not three: at one token a step, each prompt token is a step.)
    prompts = {uid: prompts[uid] for uid in ("chat", "code")}
    replies, scheduler = serve(real_engine(16), eos_ids, prompts, chunk=chunk, stagger=True)
    for uid, prompt in prompts.items():
        tokens, finish = oracle(prompt)
        assert (replies[uid].tokens, replies[uid].finish) == (tokens, finish), (
            f"chunked prefill size {chunk}, prompt {uid!r}: said {replies[uid].tokens}, transformers {tokens}"
        )
    assert scheduler.steps["mixed"] > 0  # decode tokens and prompt chunks did share steps
    if chunk:
        longest = max(len(p) for p in prompts.values())
        assert scheduler.steps["prefill"] + scheduler.steps["mixed"] >= -(-longest // chunk)


@pytest.fixture(scope="module")
def shared_prompts(tokenizer) -> tuple[list[int], list[int]]:
    """Two chats with the same long system prompt and different questions."""
    return (chat_ids(tokenizer, "Which book should I read first?", SYSTEM),
            chat_ids(tokenizer, "How old is the oldest library in the world?", SYSTEM))


@pytest.fixture(scope="module")
def second_without_cache(real_engine, eos_ids, shared_prompts) -> Reply:
    """The second chat alone with the naive cache: what it says when nothing is shared."""
    replies, scheduler = serve(real_engine(16), eos_ids, {"second": shared_prompts[1]}, cache_type="naive")
    assert replies["second"].cached_tokens == 0 and scheduler.pages.num_free == scheduler.pages.num_total
    return replies["second"]


@pytest.mark.real_model
@pytest.mark.parametrize("when, chunk", [("after", 0), ("during", 20)],
                         ids=["after-the-first-finished", "while-the-first-decodes-chunked-20"])
def test_a_shared_system_prompt_is_found_in_the_cache_and_changes_no_token(
        real_engine, eos_ids, shared_prompts, second_without_cache, oracle, when, chunk):
    first, second = shared_prompts
    engine, page_size = real_engine(16), 16
    scheduler = Scheduler(engine, 4, chunk, eos_ids, "radix")
    replies: dict[str, Reply] = {}
    submit(scheduler, "first", first, max_tokens=NEW_TOKENS)
    if when == "after":  # the first has finished: the tree holds its prompt and its reply
        run_until_idle(scheduler, replies, len(first) + NEW_TOKENS)
        held = first + replies["first"].tokens[:-1]  # its last token was sampled, never run
    else:  # the first is still decoding: the tree holds the prompt it has prefilled, chunk by chunk
        while scheduler.prefilling or scheduler.waiting:
            collect(replies, scheduler.step())
        held = first
        assert scheduler.running and replies["first"].finish is None
    submit(scheduler, "second", second, max_tokens=NEW_TOKENS)
    run_until_idle(scheduler, replies, len(first) + len(second) + 2 * NEW_TOKENS)

    expected = min(common_prefix(held, second), len(second) - 1) // page_size * page_size
    assert expected >= 48  # the system prompt spans pages: this test means something
    assert replies["second"].cached_tokens == expected, (
        f"the second request found {replies['second'].cached_tokens} tokens in the cache; it shares "
        f"{common_prefix(held, second)} tokens with what the first computed, {expected} of them in whole pages"
    )
    assert scheduler.prefix_hits == expected and scheduler.state()["prefix_hit_rate"] > 0
    # The same greedy tokens as without the cache (naive), and as transformers.
    assert replies["second"].tokens == second_without_cache.tokens == oracle(second)[0]
    assert replies["first"].tokens == oracle(first)[0]
    check_idle(scheduler)


# --------------------------------------------------------------------- page accounting, tiny model


def check_accounting(scheduler: Scheduler) -> None:
    """Every usable page has exactly one owner: the free list, the radix tree, or one admitted request (its
    pages past the tree's); the tree's counts and every node's lock count agree with who holds what."""
    cache, allocator = scheduler.cache, scheduler.pages
    radix = isinstance(cache, RadixCache)
    nodes = [node for _, node in cache.nodes()] if radix else []
    tree_pages = [page for node in nodes for page in node.pages]
    admitted = scheduler.running + scheduler.prefilling
    own, locks = [], Counter()
    for request in admitted:
        shared = prefix_pages(request.node) if radix else []
        assert request.pages[: len(shared)] == shared, (
            f"{request.uid}'s page table {request.pages} does not start with the pages of the prefix it locks {shared}"
        )
        own += request.pages[len(shared):]
        # room for every token it may still run: its prompt and all its replies but the last (sampled, never run)
        room, longest = len(request.pages) * cache.page_size, len(request.prompt_ids) + request.params.max_tokens - 1
        assert room >= longest, f"{request.uid} holds {len(request.pages)} pages: no room for {longest} tokens"
        node = request.node
        while radix and node is not cache.root:
            locks[id(node)] += 1
            node = node.parent
    for request in scheduler.waiting:
        assert request.pages == [] and request.node is None, f"waiting {request.uid} holds {request.pages}"
    owners = Counter(allocator.free_pages) + Counter(tree_pages) + Counter(own)
    twice = sorted(page for page, count in owners.items() if count > 1)
    assert not twice, f"pages {twice} have two owners (free list, tree, requests)"
    assert set(owners) == set(range(1, allocator.num_total + 1)), "a page is lost, or the spare page was handed out"
    assert allocator.num_free + cache.cached_pages + len(own) == allocator.num_total
    assert cache.cached_pages == len(tree_pages)
    assert all(allocator.is_free[page] for page in allocator.free_pages) and not any(allocator.is_free[p] for p in own)
    for node in nodes:
        assert node.lock_ref == locks[id(node)], f"{node} is locked by {locks[id(node)]} admitted requests"
    assert cache.evictable_pages == sum(len(node.pages) for node in nodes if node.lock_ref == 0)
    state = scheduler.state()
    assert state["in_use_pages"] == len(own) and state["running"] == len(admitted)


def check_idle(scheduler: Scheduler) -> None:
    cache, allocator = scheduler.cache, scheduler.pages
    check_accounting(scheduler)
    assert not scheduler.has_work
    assert allocator.num_free + cache.cached_pages == allocator.num_total
    assert cache.evictable_pages == cache.cached_pages  # nobody locks anything: all of it could go
    if isinstance(cache, RadixCache):
        assert all(node.lock_ref == 0 for _, node in cache.nodes())
        cache.evict(cache.cached_pages)
    assert allocator.num_free == allocator.num_total and cache.cached_pages == 0


@pytest.fixture(scope="module")
def tiny_oracle(tiny_llama):
    """Greedy tokens of the tiny model by transformers (each token from a full forward pass), and how far the
    best logit was ahead of the second at each step: where it was a near-tie, float noise may pick either."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(prompt: list[int], max_tokens: int, ignore_eos: bool) -> tuple[list[int], list[float]]:
        ids, tokens, margins = list(prompt), [], []
        while len(tokens) < max_tokens:
            top = model(torch.tensor([ids])).logits[0, -1].topk(2)
            token = top.indices[0].item()
            margins.append((top.values[0] - top.values[1]).item())
            if token == TINY_EOS and not ignore_eos:
                break
            tokens.append(token)
            ids.append(token)
        return tokens, margins

    return generate


TINY_EOS = 255


def tiny_scheduler(tiny_llama, page_size: int, usable_pages: int, chunk: int, cache_type: str,
                   max_running: int = 4, overlap: bool = False) -> Scheduler:
    engine = Engine(tiny_llama, "float32", "cpu", usable_pages + 1, page_size, 128)
    return Scheduler(engine, max_running, chunk, {TINY_EOS}, cache_type, overlap=overlap)


def assert_greedy_matches(oracle, uid: str, prompt: list[int], params: dict, reply: Reply) -> None:
    expected, margins = oracle(prompt, params["max_tokens"], params["ignore_eos"])
    n = common_prefix(reply.tokens, expected)
    if n < max(len(reply.tokens), len(expected)):  # they part at token n: only a near-tie may explain it
        assert n < len(margins) and margins[n] < 1e-4, (
            f"{uid}: said {reply.tokens}, transformers {expected}; they part at token {n}, where transformers' best "
            f"logit led by {margins[n] if n < len(margins) else 'n/a'}: no float noise explains that"
        )


@pytest.mark.parametrize("page_size, usable_pages, chunk, cache_type, seed, overlap", [
    (4, 40, 5, "radix", 0, False),  # chunks that end inside pages
    (1, 130, 3, "radix", 1, False),  # a page per token
    (8, 20, 0, "radix", 2, False),  # whole prompts, big pages
    (4, 40, 7, "naive", 3, False),
    (16, 12, 16, "radix", 4, False),  # chunks of exactly a page
    # Overlap scheduling (chapter 06): results one step late, a finished request's extra token dropped.
    (4, 40, 5, "radix", 5, True),
    (1, 130, 3, "radix", 6, True),
    (8, 20, 0, "naive", 7, True),
])
def test_random_workload_keeps_every_page_accounted_for(tiny_llama, tiny_oracle, page_size, usable_pages, chunk,
                                                        cache_type, seed, overlap):
    rng = random.Random(seed)
    scheduler = tiny_scheduler(tiny_llama, page_size, usable_pages, chunk, cache_type, overlap=overlap)
    # A pool of about 150 tokens, requests of up to 100: only one or two fit at a time, the rest queue.
    assert usable_pages * page_size < 200
    prefixes = [[rng.randrange(1, 255) for _ in range(rng.randrange(4, 50))] for _ in range(3)]
    requests, sent = [], []
    for i in range(40):
        if sent and rng.random() < 0.15:
            prompt = list(rng.choice(requests)[1])  # the same prompt again: found whole, but its last token
        else:
            prompt = rng.choice(prefixes + [[]])[: rng.randrange(0, 50)]
            prompt = prompt + [rng.randrange(1, 255) for _ in range(rng.randrange(1, 30))]
        params = {"max_tokens": rng.randrange(1, 25), "ignore_eos": rng.random() < 0.5}
        requests.append((f"r{i}", prompt, params))
        sent.append(False)
    replies: dict[str, Reply] = {}
    aborted_in_flight, aborted_early = set(), set()
    queued = evicted = chunked_aborts = 0
    bound = sum(len(p) + params["max_tokens"] for _, p, params in requests) + 200
    next_request, steps, last_cached = 0, 0, 0
    while next_request < len(requests) or scheduler.has_work:
        assert steps < bound, f"not done after {steps} steps: {scheduler.state()}"
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):  # arrivals
            if next_request < len(requests):
                uid, prompt, params = requests[next_request]
                submit(scheduler, uid, prompt, **params)
                sent[next_request] = True
                next_request += 1
        if rng.random() < 0.2:  # an abort between steps
            kind = rng.choice(["prefilling", "prefilling", "running", "waiting", "unsent", "finished"])
            if kind == "prefilling" and scheduler.prefilling:
                target = rng.choice(scheduler.prefilling)
                chunked_aborts += target.cached_len > target.prefix_len  # some chunks ran, not all of them
                uid = target.uid
            elif kind == "running" and scheduler.running:
                uid = rng.choice(scheduler.running).uid
            elif kind == "waiting" and scheduler.waiting:
                uid = rng.choice(scheduler.waiting).uid
            elif kind == "unsent" and next_request < len(requests):
                uid = requests[rng.randrange(next_request, len(requests))][0]  # the abort overtakes its request
            elif kind == "finished" and replies:
                uid = rng.choice(sorted(replies))
            else:
                uid = None
            if uid is not None:
                in_flight = any(r.uid == uid for r in [*scheduler.running, *scheduler.prefilling, *scheduler.waiting])
                (aborted_in_flight if in_flight else aborted_early if kind == "unsent" else set()).add(uid)
                collect(replies, scheduler.handle(AbortRequest(uid)))
                check_accounting(scheduler)  # an abort frees its pages at once
        collect(replies, scheduler.step())
        steps += 1
        queued += bool(scheduler.waiting)  # after admission: someone was left to wait
        check_accounting(scheduler)
        evicted += scheduler.cache.cached_pages < last_cached  # only eviction shrinks the tree
        last_cached = scheduler.cache.cached_pages
    collect(replies, scheduler.step())
    check_idle(scheduler)

    assert queued > 0, "the workload never had to queue: make the pool smaller"
    if cache_type == "radix":
        assert evicted > 0 and scheduler.prefix_hits > 0, "the workload should hit the cache and evict from it"
    else:
        assert scheduler.prefix_hits == 0
    if chunk:
        assert chunked_aborts > 0, "no abort landed in the middle of a chunked prefill"
    for uid, prompt, params in requests:
        if uid in aborted_early:
            assert uid not in replies, f"{uid} was aborted before it arrived, yet it ran"
            continue
        reply = replies[uid]
        assert reply.finishes == 1 and reply.prompt_tokens == len(prompt), f"{uid}: {reply}"
        if uid in aborted_in_flight:
            assert reply.finish == "abort"
            continue
        assert reply.finish in ("stop", "length"), f"{uid} ended with {reply.finish}"
        if reply.finish == "length":
            assert len(reply.tokens) == params["max_tokens"]
        else:
            assert not params["ignore_eos"] and len(reply.tokens) < params["max_tokens"]
        assert reply.cached_tokens % page_size == 0 and reply.cached_tokens < len(prompt)
        assert_greedy_matches(tiny_oracle, uid, prompt, params, reply)


@pytest.mark.parametrize("cache_type", ["radix", "naive"])
def test_more_requests_than_memory_queue_and_all_complete(tiny_llama, cache_type):
    # 8 usable pages of 8 tokens; each request needs 4 of them (20 prompt + 12 new tokens): two at a time.
    scheduler = tiny_scheduler(tiny_llama, 8, 8, 0, cache_type, max_running=8)
    replies: dict[str, Reply] = {}
    for i in range(6):
        submit(scheduler, f"r{i}", [i + 1] * 20, max_tokens=12, ignore_eos=True)
    collect(replies, scheduler.step())
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 4  # admitted by pages, not by the 8 allowed
    run_until_idle(scheduler, replies, 6 * 13, check_accounting)
    assert [(replies[f"r{i}"].finish, len(replies[f"r{i}"].tokens)) for i in range(6)] == [("length", 12)] * 6
    check_idle(scheduler)


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["fresh", "after-a-cached-prefix"])
def test_an_abort_in_the_middle_of_a_chunked_prefill_frees_its_pages_and_unlocks_once(
        tiny_llama, tiny_oracle, shared_prefix):
    scheduler = tiny_scheduler(tiny_llama, 4, 40, 6, "radix")
    cache, allocator = scheduler.cache, scheduler.pages
    prompt = [(7 * i) % 250 + 1 for i in range(30)]
    replies: dict[str, Reply] = {}
    if shared_prefix:  # an earlier request leaves the first 8 tokens (2 pages) of the prompt in the tree
        submit(scheduler, "earlier", prompt[:9] + [251, 252], max_tokens=1)
        run_until_idle(scheduler, replies, 5)
    submit(scheduler, "x", prompt, max_tokens=4)
    collect(replies, scheduler.step())
    collect(replies, scheduler.step())
    (request,) = scheduler.prefilling
    start = 8 if shared_prefix else 0
    assert request.prefix_len == start and request.cached_len == start + 12  # two chunks of 6 ran, 30 - 12 to go
    assert prefix_pages(request.node) == request.pages[: (start + 12) // 4]  # it locks what it computed so far
    assert request.node.lock_ref == 1
    free_before = allocator.num_free

    collect(replies, scheduler.handle(AbortRequest("x")))
    check_accounting(scheduler)
    assert not scheduler.has_work and request.node is None and request.pages == []
    assert all(node.lock_ref == 0 for _, node in cache.nodes())  # unlocked: not twice (unlock would raise), not never
    # The tree keeps the whole pages computed (3 of them its own); every other page of its goes back to the free list.
    assert cache.cached_pages == (start + 12) // 4
    assert allocator.num_free == free_before + (pages_for(30 + 4, 4) - start // 4) - 3
    assert allocator.num_free + cache.cached_pages == allocator.num_total
    assert scheduler.handle(AbortRequest("x")) == []  # a second abort of the same request changes nothing
    collect(replies, scheduler.step())
    check_accounting(scheduler)
    assert replies["x"].finish == "abort" and replies["x"].finishes == 1
    assert allocator.num_free + cache.cached_pages == allocator.num_total

    # What the aborted request computed is reused, and it is right: the same prompt again finds it.
    submit(scheduler, "again", prompt, max_tokens=4, ignore_eos=True)
    run_until_idle(scheduler, replies, 30, check_accounting)
    assert replies["again"].cached_tokens == start + 12
    assert_greedy_matches(tiny_oracle, "again", prompt, {"max_tokens": 4, "ignore_eos": True}, replies["again"])
    check_idle(scheduler)


def test_an_abort_in_the_middle_of_a_chunked_prefill_frees_every_page_with_the_naive_cache(tiny_llama):
    scheduler = tiny_scheduler(tiny_llama, 4, 40, 6, "naive")
    submit(scheduler, "x", list(range(1, 31)), max_tokens=4)
    scheduler.step()
    assert scheduler.prefilling and scheduler.pages.num_free == 40 - pages_for(34, 4)
    replies: dict[str, Reply] = {}
    collect(replies, scheduler.handle(AbortRequest("x")))
    assert replies["x"].finish == "abort" and scheduler.pages.num_free == 40
    check_idle(scheduler)


def test_the_tiny_model_is_not_degenerate(tiny_oracle):
    """The workload tests compare greedy tokens: they mean something only if the tokens vary."""
    tokens, _ = tiny_oracle(list(range(1, 20)), 24, True)
    assert len(set(tokens)) > 4, tokens



# ----------------------------------------------------------------- /state, as the scheduler process publishes it


class Idle(Exception):
    """The scheduler would now wait for a message that never comes: the test is over."""


class ScriptedInbox:
    """Stands in for the scheduler's ZMQ socket: hands out the given messages, then ends the loop when it idles."""

    def __init__(self, messages):
        from minisgl.messages import encode

        self.queue = [encode(message) for message in messages]

    def poll(self, timeout_ms=None) -> bool:
        if not self.queue and timeout_ms is None:
            raise Idle
        return bool(self.queue)

    def recv(self, flags=0) -> bytes:
        import zmq

        if not self.queue:
            raise zmq.Again
        return self.queue.pop(0)


class RecordingOutbox:
    """Stands in for the socket to the detokenizer: records each message with the counts /state shows as it leaves."""

    def __init__(self, counts):
        from minisgl.messages import ToDetokenizer, decoder
        from minisgl.server.frontend import COUNTS

        self.counts, self.names, self.decoder, self.sent = counts, COUNTS, decoder(ToDetokenizer), []

    def send(self, data: bytes) -> None:
        self.sent.append((self.decoder.decode(data), dict(zip(self.names, self.counts))))


def test_state_already_shows_the_step_whose_tokens_go_out(tiny_llama):
    # A client that has seen a token and then asks GET /state must see the step that made it: the request
    # running after its first token, gone (and its pages released) once its last token went out. The contract's
    # disconnect test relies on it, and fails on a busy machine where the scheduler is descheduled between
    # sending a step's tokens and publishing the counts at the top of its next loop.
    from minisgl.scheduler.worker import serve_steps
    from minisgl.server.frontend import COUNTS

    scheduler = tiny_scheduler(tiny_llama, 4, 40, 0, "radix")
    counts = [0] * len(COUNTS)
    outbox = RecordingOutbox(counts)
    request = UserRequest("r", pack_ids(list(range(1, 11))), SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(Idle):
        serve_steps(scheduler, ScriptedInbox([request]), outbox, counts, check_lockstep=False)
    assert [[out.finish for out in message.outputs] for message, _ in outbox.sent] == [[None], [None], ["length"]]
    (_, first), *_, (_, last) = outbox.sent
    assert first["running"] == 1 and first["in_use_pages"] > 0, (
        f"/state as the first token left: {first}; the request was running and held pages"
    )
    assert last["running"] == 0 and last["in_use_pages"] == 0, (
        f"/state as the last token left: {last}; the request had finished and released its pages"
    )


def test_kv_cache_memory_sizes_the_pool_by_bytes(tiny_llama):
    """--kv-cache-memory: as many pages as the budget holds. The tiny model's page of 4 tokens costs keys and
    values x 2 layers x 4 tokens x 2 KV heads x 16 dims x 4 bytes = 2048 bytes, so 100 KiB hold 50 pages."""
    engine = Engine(tiny_llama, "float32", "cpu", 0, 4, 128, kv_cache_bytes=100 * 1024)
    assert engine.kv_cache.num_pages == 50
    assert engine.kv_cache.k.numel() * 4 + engine.kv_cache.v.numel() * 4 <= 100 * 1024
    with pytest.raises(ValueError, match=r"fewer than one request of --context-length 128 needs \(33"):
        Engine(tiny_llama, "float32", "cpu", 0, 4, 128, kv_cache_bytes=32 * 2048)


def test_num_pages_and_kv_cache_memory_are_not_given_together(capsys):
    from minisgl.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--num-pages", "100", "--kv-cache-memory", "64"])
    assert "not both" in capsys.readouterr().err
    assert parse_args(["--kv-cache-memory", "64"]).kv_cache_memory == 64


def test_decodes_of_one_length_attend_without_a_mask_to_the_same_result():
    """The torch backend's batch-of-one-length path: with no padding to hide, ``paged_decode_attention`` is given
    no lengths and SDPA no mask (faster); it must give what the masked path gives. The backend takes it only
    when every decode request has the same length."""
    from minisgl.attention.paged import padded_locations, paged_decode_attention
    from minisgl.attention.torch_backend import TorchBackend
    from minisgl.core import Batch, Request
    from minisgl.kv_cache import KVCache

    generator = torch.Generator().manual_seed(0)
    page_size, length = 4, 11
    k_cache, v_cache = (torch.randn(32 * page_size, 2, 16, generator=generator) for _ in range(2))
    q = torch.randn(2, 4, 16, generator=generator)
    rows = [[3, 9, 5], [7, 1, 12]]
    locations = padded_locations(rows, [length, length], page_size)
    masked = paged_decode_attention(q, k_cache, v_cache, locations, torch.tensor([length, length]), 0.25)
    unmasked = paged_decode_attention(q, k_cache, v_cache, locations, None, 0.25)
    torch.testing.assert_close(unmasked, masked)

    backend = TorchBackend(KVCache(2, 32, page_size, 2, 16, torch.float32, "cpu"))
    requests = [Request(f"r{i}", list(range(length - 1)), SamplingParams(), pages=row) for i, row in enumerate(rows)]
    for request in requests:
        request.cached_len, request.output_ids = length - 1, [5]
    backend.prepare(Batch(requests, [1, 1]), torch.tensor([length - 1] * 2))
    assert backend.metadata.decode_seq_lens is None, "two decodes of one length: nothing to mask"
    requests[1].cached_len, requests[1].prompt_ids = length - 2, list(range(length - 2))
    backend.prepare(Batch(requests, [1, 1]), torch.tensor([length - 1, length - 2]))
    assert backend.metadata.decode_seq_lens.tolist() == [length, length - 1], "different lengths: masked"
