"""The radix prefix cache: matching and splitting (exercise ``radix-match``), inserting, locking, LRU eviction
(exercise ``evict``), and a long random run of requests that checks every page is accounted for."""

import random
from collections import Counter

import pytest

from minisgl.scheduler.pages import PageAllocator, pages_for
from minisgl.scheduler.radix import NaiveCache, RadixCache, RadixNode, prefix_pages

A = list(range(1, 13))  # 12 tokens: three pages of 4


def new_cache(page_size: int = 4, num_pages: int = 33) -> tuple[RadixCache, PageAllocator]:
    allocator = PageAllocator(num_pages)
    return RadixCache(page_size, allocator), allocator


def cache_prompt(cache: RadixCache, allocator: PageAllocator, tokens: list[int]) -> list[int]:
    """Put ``tokens`` in the tree on fresh pages, as a finished request would; returns the pages it added."""
    pages = allocator.allocate(pages_for(len(tokens), cache.page_size))
    held, whole = cache.insert(tokens, pages) // cache.page_size, len(tokens) // cache.page_size
    allocator.free(pages[:held] + pages[whole:])  # those the tree held already, and a partial last page
    return pages[held:whole]


def path_tokens(node: RadixNode) -> list[int]:
    """The tokens on the path from the root down to ``node``."""
    parts = []
    while node.parent is not None:
        parts.append(node.key)
        node = node.parent
    return [token for part in reversed(parts) for token in part]


def shape(cache: RadixCache) -> list[tuple[int, list[int], list[int]]]:
    return [(depth, node.key, node.pages) for depth, node in cache.nodes()]


def find(cache: RadixCache, tokens: list[int]) -> RadixNode:
    """The node whose path from the root spells exactly ``tokens``."""
    found = [node for _, node in cache.nodes() if path_tokens(node) == tokens]
    assert found, f"no node ends after {tokens}; the tree is:\n{cache.render()}"
    return found[0]


# Each case: a prompt, the pages match_prefix must return, and why.
MATCH_CASES = [
    (A + [99], [1, 2, 3], "the whole cached prompt A, then one new token"),
    (A[:9] + [50, 51, 52], [1, 2], "the first 9 tokens of A: two whole pages (the third page differs)"),
    (A, [1, 2], "exactly A, fully cached: at most (12 - 1) // 4 = 2 pages, so one token is left to compute"),
    (A[:3] + [40, 41, 42, 43], [], "only 3 tokens of A: less than a page"),
    ([7, 7, 7, 7, 7], [], "nothing in common with A"),
]


@pytest.mark.exercise("radix-match", focused=True)
def test_match_prefix_returns_the_longest_cached_whole_pages():
    for prompt, expected, why in MATCH_CASES:
        cache, allocator = new_cache()
        cache_prompt(cache, allocator, A)
        setting = f"page_size 4, the tree holds prompt A={A} on pages [1, 2, 3]"
        result = cache.match_prefix(prompt)
        assert isinstance(result, tuple) and len(result) == 2, (
            f"match_prefix must return (pages, node), got {result!r}"
        )
        pages, node = result
        assert pages == expected, (
            f"{setting}. match_prefix({prompt}) returned pages {pages}, expected {expected}: {why}"
        )
        assert path_tokens(node) == prompt[: len(expected) * 4], (
            f"{setting}. match_prefix({prompt}) returned the right pages {pages} but node {node}, whose path from "
            f"the root spells {path_tokens(node)}; the node must end exactly where the match ends, "
            f"{prompt[: len(expected) * 4]} (when the match ends inside a node, split it there and return the head)"
        )
        assert cache.cached_pages == 3 and sorted(p for _, n in cache.nodes() for p in n.pages) == [1, 2, 3], (
            f"{setting}. After match_prefix({prompt}) the tree holds pages "
            f"{sorted(p for _, n in cache.nodes() for p in n.pages)}: matching must not add or lose pages. "
            f"The tree:\n{cache.render()}"
        )


@pytest.mark.exercise("radix-match")
def test_a_match_that_ends_inside_a_node_splits_it_at_the_page_boundary():
    cache, allocator = new_cache()
    cache_prompt(cache, allocator, A)
    tail = find(cache, A)
    cache.lock(tail)  # a running request holds A: the head must inherit its lock
    pages, node = cache.match_prefix(A[:9] + [50, 51, 52])
    assert pages == [1, 2]
    assert shape(cache) == [(1, A[:8], [1, 2]), (2, A[8:], [3])]
    assert node.key == A[:8] and node.lock_ref == 1 and node.children == {(9, 10, 11, 12): tail}
    assert tail.parent is node and tail.key == A[8:] and tail.lock_ref == 1, "the old node keeps the tail"
    assert cache.evictable_pages == 0 and cache.cached_pages == 3
    cache.unlock(tail)  # the request's lock is released through the head too
    assert node.lock_ref == 0 and tail.lock_ref == 0 and cache.evictable_pages == 3


@pytest.mark.exercise("radix-match")
@pytest.mark.parametrize("page_size", [1, 4])
def test_a_fully_cached_prompt_leaves_at_least_one_token_to_compute(page_size):
    cache, allocator = new_cache(page_size, num_pages=65)
    cached = cache_prompt(cache, allocator, A)
    pages, node = cache.match_prefix(A)
    assert pages == cached[: (len(A) - 1) // page_size]
    assert len(A) - len(pages) * page_size >= 1
    assert cache.match_prefix(A[:1]) == ([], cache.root)
    assert cache.match_prefix([]) == ([], cache.root)


@pytest.mark.exercise("radix-match")
def test_page_size_1_matches_token_by_token():
    cache, allocator = new_cache(page_size=1)
    cache_prompt(cache, allocator, [1, 2, 3, 4, 5])  # pages 1..5
    cache_prompt(cache, allocator, [1, 2, 9, 9])  # shares [1, 2]; its own [9, 9] on pages 8, 9
    assert shape(cache) == [(1, [1, 2], [1, 2]), (2, [3, 4, 5], [3, 4, 5]), (2, [9, 9], [8, 9])]
    assert cache.match_prefix([1, 2, 3, 7])[0] == [1, 2, 3]
    assert cache.match_prefix([1, 2, 9, 9, 9])[0] == [1, 2, 8, 9]
    assert cache.match_prefix([2, 1])[0] == []


@pytest.mark.exercise("radix-match")
def test_a_match_marks_its_path_as_recently_used():
    cache, allocator = new_cache()
    cache_prompt(cache, allocator, A)
    cache_prompt(cache, allocator, [20, 21, 22, 23, 24])
    before = find(cache, A).last_access
    cache.match_prefix(A[:8] + [0])
    head, tail = find(cache, A[:8]), find(cache, A)
    assert head.last_access > before and head.last_access > find(cache, [20, 21, 22, 23]).last_access
    assert tail.last_access == before, "the part of A the prompt did not match was not used"


def test_insert_returns_how_many_leading_tokens_the_tree_held():
    cache, allocator = new_cache()
    assert cache.insert(A, [1, 2, 3]) == 0
    assert cache.insert(A, [4, 5, 6]) == 12, "all of A was cached: the caller frees its pages [4, 5, 6]"
    assert cache.insert(A[:8] + [30, 31, 32, 33, 34], [7, 8, 9, 10]) == 8
    assert shape(cache) == [(1, A[:8], [1, 2]), (2, A[8:], [3]), (2, [30, 31, 32, 33], [9])], (
        "the caller's pages 7, 8 duplicate pages 1, 2 and stay out of the tree; its partial last page 10 too"
    )
    assert cache.cached_pages == 4 and cache.evictable_pages == 4
    assert cache.insert(A[:6], [11, 12]) == 4, "only whole pages count: 4 of A[:6] are cached"
    assert cache.insert([], []) == 0 and cache.cached_pages == 4


def test_lock_counts_every_node_up_to_the_root_and_unlock_undoes_it():
    cache, allocator = new_cache()
    cache_prompt(cache, allocator, A)
    cache_prompt(cache, allocator, A[:4] + [40, 41, 42, 43])
    head, a_tail, b_tail = find(cache, A[:4]), find(cache, A), find(cache, A[:4] + [40, 41, 42, 43])
    cache.lock(a_tail)
    cache.lock(b_tail)
    cache.lock(head)
    assert (head.lock_ref, a_tail.lock_ref, b_tail.lock_ref, cache.root.lock_ref) == (3, 1, 1, 0)
    assert cache.evictable_pages == 0 and cache.cached_pages == 4
    cache.unlock(a_tail)
    assert (head.lock_ref, a_tail.lock_ref, cache.evictable_pages) == (2, 0, 2), "A's own two pages are evictable"
    cache.unlock(b_tail)
    cache.unlock(head)
    assert head.lock_ref == 0 and cache.evictable_pages == 4
    with pytest.raises(ValueError, match="no request holds"):
        cache.unlock(head)
    cache.lock(cache.root)  # a request that matched nothing holds the root: nothing to count
    assert cache.root.lock_ref == 0 and cache.evictable_pages == 4


def lru_tree() -> tuple[RadixCache, PageAllocator, str]:
    """Three prompts on pages: A=[1..8] on [1, 2], B=[101..108] on [3, 4], C=[201..204] on [5]; inserted in
    that order, then A again, so B is the least recently used, then C, then A."""
    cache, allocator = new_cache(num_pages=9)  # 8 usable pages
    for tokens in (A[:8], list(range(101, 109)), list(range(201, 205)), A[:8]):
        cache_prompt(cache, allocator, tokens)
    story = ("page_size 4; prompt A=[1..8] cached on pages [1, 2], B=[101..108] on [3, 4], C=[201..204] on [5], "
             "inserted in that order, then A inserted again (so B is the least recently used, then C)")
    return cache, allocator, story


def evicted(allocator: PageAllocator, free_before: list[int]) -> list[int]:
    return sorted(set(allocator.free_pages) - set(free_before))


@pytest.mark.exercise("evict", focused=True)
def test_evict_frees_the_least_recently_used_leaf_first():
    cache, allocator, story = lru_tree()
    steps = [(1, [3, 4], "B's leaf, the least recently used (a leaf goes whole, even if fewer pages were asked)"),
             (1, [5], "C's leaf, used before A was inserted again"),
             (5, [1, 2], "A's leaf, the only one left: fewer pages than asked, since nothing else is cached")]
    for num_pages, expected, why in steps:
        free_before = list(allocator.free_pages)
        freed = cache.evict(num_pages)
        got = evicted(allocator, free_before)
        assert got == expected, (
            f"{story}. evict({num_pages}) gave back pages {got} to the allocator, expected {expected}: {why}. "
            f"The tree now:\n{cache.render()}"
        )
        assert freed == len(expected), f"{story}. evict({num_pages}) freed {expected} but returned {freed}"
        assert cache.cached_pages == sum(len(n.pages) for _, n in cache.nodes()), (
            f"{story}. After evict({num_pages}), cached_pages is {cache.cached_pages}, but the tree holds "
            f"{sum(len(n.pages) for _, n in cache.nodes())} pages: subtract what you free"
        )
        assert cache.evictable_pages == cache.cached_pages, (
            f"{story}. Nothing is locked, so every cached page is evictable; after evict({num_pages}) "
            f"evictable_pages is {cache.evictable_pages}, cached_pages {cache.cached_pages}"
        )
    assert shape(cache) == [] and allocator.num_free == 8 and cache.evict(1) == 0


@pytest.mark.exercise("evict")
def test_evict_cascades_to_a_parent_that_becomes_a_leaf():
    cache, allocator = new_cache(num_pages=9)
    cache_prompt(cache, allocator, A[:8])  # pages 1, 2
    cache_prompt(cache, allocator, A[:4] + [50, 51, 52, 53])  # splits A: head [1], tails [2] and [4]
    cache_prompt(cache, allocator, [60, 61, 62, 63])  # page 3 (freed by the line above), used last
    order = []
    while cache.cached_pages:
        before = list(allocator.free_pages)
        cache.evict(1)
        order.append(evicted(allocator, before))
    assert order == [[2], [4], [1], [3]], (
        "once both tails are gone, A's head [1] is a leaf, used before [60..63] (page 3): it goes first"
    )


@pytest.mark.exercise("evict")
def test_one_evict_call_goes_on_to_a_parent_that_becomes_a_leaf():
    cache, allocator = new_cache(num_pages=9)
    cache_prompt(cache, allocator, A[:8])  # pages 1, 2
    cache_prompt(cache, allocator, A[:4] + [50, 51, 52, 53])  # splits A: head [1], tails [2] and [4]
    cache_prompt(cache, allocator, [60, 61, 62, 63])  # page 3 (freed by the line above), used last
    free_before = list(allocator.free_pages)
    assert cache.evict(3) == 3
    assert evicted(allocator, free_before) == [1, 2, 4], (
        "with both tails gone, the head [1] becomes a leaf older than page 3's: the same call must consider it"
    )


@pytest.mark.exercise("evict")
def test_evict_never_frees_a_locked_node():
    cache, allocator = new_cache(num_pages=9)
    cache_prompt(cache, allocator, A[:8])  # pages 1, 2
    cache_prompt(cache, allocator, A[:4] + [50, 51, 52, 53])  # page 4 (its page 3 duplicated page 1: freed)
    cache_prompt(cache, allocator, [60, 61, 62, 63])  # page 3
    cache.lock(find(cache, A[:8]))  # a running request reads pages 1, 2
    free_before = list(allocator.free_pages)
    assert cache.evict(100) == 2
    assert evicted(allocator, free_before) == [3, 4]
    assert shape(cache) == [(1, A[:4], [1]), (2, A[4:8], [2])]
    assert cache.evictable_pages == 0 and cache.cached_pages == 2 and cache.evict(1) == 0
    cache.unlock(find(cache, A[:8]))
    assert cache.evictable_pages == 2 and cache.evict(2) == 2 and allocator.num_free == 8


def test_a_request_shares_its_pages_and_frees_its_duplicates():
    """The scheduler's protocol: two requests with one prompt run side by side; neither matched the other."""
    cache, allocator = new_cache()
    prompt = list(range(100, 114))  # 14 tokens: three whole pages and a partial one
    first_pages, first = allocator.allocate(4), cache.root  # room for 16 tokens; matched nothing
    second_pages, second = allocator.allocate(4), cache.root  # admitted before the first one's prefill ended
    first_pages, first = cache.cache_unfinished(prompt, first_pages, first)
    assert first_pages == [1, 2, 3, 4] and first.lock_ref == 1 and prefix_pages(first) == [1, 2, 3]
    assert cache.cached_pages == 3 and cache.evictable_pages == 0
    second_pages, second = cache.cache_unfinished(prompt, second_pages, second)
    assert second_pages == [1, 2, 3, 8], "its pages 5, 6, 7 duplicate the tree's 1, 2, 3: freed and replaced"
    assert second is first and first.lock_ref == 2 and allocator.num_free == 32 - 5
    cache.cache_finished(prompt + [7, 8], first_pages, first)  # 16 tokens computed: page 4 joins the tree
    assert shape(cache) == [(1, prompt[:12], [1, 2, 3]), (2, prompt[12:] + [7, 8], [4])]
    assert first.lock_ref == 1 and cache.evictable_pages == 1
    cache.cache_finished(prompt + [9], second_pages, second)  # 15 tokens: its partial page 8 is freed
    assert cache.cached_pages == cache.evictable_pages == 4 and allocator.num_free == 32 - 4
    pages, node = cache.match_prefix(prompt + [7, 8, 0])
    assert pages == [1, 2, 3, 4]


def test_an_aborted_request_keeps_nothing_it_had_not_computed():
    cache, allocator = new_cache()
    cache_prompt(cache, allocator, A)
    pages, node = cache.match_prefix(A + [50, 51, 52, 53, 54])
    cache.lock(node)
    pages += allocator.allocate(2)  # room for the rest, never computed: aborted before its prefill
    cache.cache_finished(A, pages, node)
    assert node.lock_ref == 0 and cache.cached_pages == 3 and allocator.num_free == 32 - 3


def test_the_naive_cache_keeps_nothing():
    allocator = PageAllocator(9)
    cache = NaiveCache(4, allocator)
    pages, node = cache.match_prefix(A)
    assert pages == [] and cache.insert(A, [1, 2, 3]) == 0
    own = allocator.allocate(3)
    cache.lock(node)
    assert cache.cache_unfinished(A, own, node) == (own, node)
    cache.cache_finished(A, own, node)
    assert allocator.num_free == 8 and cache.cached_pages == cache.evictable_pages == 0 and cache.evict(5) == 0


def test_render_draws_the_tree():
    cache, allocator = new_cache()
    cache_prompt(cache, allocator, A)
    cache_prompt(cache, allocator, A[:4] + [40, 41, 42, 43])
    cache.lock(find(cache, A))
    assert cache.render() == (
        "root (4 pages cached, 1 of them evictable)\n"
        "  [1, 2, 3, 4] pages=[1] lock=1 used=2\n"
        "    [5, 6, 7, 8, 9, 10, 11, 12] pages=[2, 3] lock=1 used=1\n"
        "    [40, 41, 42, 43] pages=[5] lock=0 used=2"
    )
    assert "'abcd'" in cache.render(decode=lambda ids: "abcd")


# The random run: requests with shared prefixes arrive, are admitted by pages, prefill in chunks, decode,
# finish or are aborted, while the pool is small enough that eviction is frequent.
class Request:
    def __init__(self, prompt: list[int], max_tokens: int):
        self.tokens, self.prompt_len, self.max_tokens = list(prompt), len(prompt), max_tokens
        self.pages: list[int] = []
        self.node: RadixNode | None = None
        self.computed = 0  # tokens whose keys and values are in its pages

    def __repr__(self) -> str:
        return f"Request(tokens={self.tokens}, computed={self.computed}, pages={self.pages})"


def check_every_page_is_accounted_for(cache, allocator, running, contents, when):
    size = cache.page_size
    tree = [page for _, node in cache.nodes() for page in node.pages]
    own = []
    for request in running:
        shared = prefix_pages(request.node)
        assert request.pages[: len(shared)] == shared, f"{when}: {request} does not read its locked prefix"
        assert path_tokens(request.node) == request.tokens[: len(shared) * size], f"{when}: {request}"
        own += request.pages[len(shared) :]
    owners = Counter(tree + own + allocator.free_pages)
    assert len(tree) + len(own) + allocator.num_free == allocator.num_total, (
        f"{when}: {len(tree)} cached + {len(own)} held by running requests + {allocator.num_free} free pages, "
        f"of {allocator.num_total}"
    )
    assert sorted(owners) == list(range(1, allocator.num_total + 1)), (
        f"{when}: pages with two owners (tree, running, free): {[p for p, n in owners.items() if n > 1]}"
    )
    assert cache.cached_pages == len(tree), f"{when}: cached_pages {cache.cached_pages}, tree holds {len(tree)}"
    unlocked = sum(len(node.pages) for _, node in cache.nodes() if node.lock_ref == 0)
    assert cache.evictable_pages == unlocked, f"{when}: evictable_pages {cache.evictable_pages}, unlocked {unlocked}"
    locks = Counter()
    for request in running:
        node = request.node
        while node is not cache.root:
            locks[id(node)] += 1
            node = node.parent
    for _, node in cache.nodes():
        assert node.lock_ref == locks[id(node)], f"{when}: {node} is locked by {locks[id(node)]} running requests"
        assert len(node.key) == len(node.pages) * size and node.parent.children[tuple(node.key[:size])] is node
        expected = path_tokens(node)[-len(node.key) :]
        assert [t for page in node.pages for t in contents[page]] == expected, (
            f"{when}: {node}'s pages hold the keys and values of other tokens"
        )


@pytest.mark.exercise("radix-match")
@pytest.mark.exercise("evict")
@pytest.mark.parametrize("page_size", [1, 4])
def test_random_requests_keep_every_page_accounted_for(page_size):
    rng = random.Random(page_size)
    allocator = PageAllocator(160 // page_size + 1)
    cache = RadixCache(page_size, allocator)
    contents = {page: [None] * page_size for page in range(1, allocator.num_total + 1)}  # the "KV" of each slot
    families = [[rng.randrange(50) for _ in range(rng.randrange(24))] for _ in range(5)]  # shared prefixes
    waiting: list[Request] = []
    running: list[Request] = []
    seen = Counter()

    def take(n: int) -> list[int]:
        if allocator.num_free < n:
            seen["evicted"] += cache.evict(n - allocator.num_free)
        return allocator.allocate(n)  # admission promised these: eviction must have found them

    def future_pages(request: Request) -> int:
        return pages_for(request.prompt_len + request.max_tokens, page_size) - len(request.pages)

    def compute(request: Request, upto: int) -> None:
        tree = {page for _, node in cache.nodes() for page in node.pages}
        for position in range(request.computed, upto):
            page = request.pages[position // page_size]
            assert page not in tree, f"{request} writes position {position} into page {page}, which the tree shares"
            contents[page][position % page_size] = request.tokens[position]
        request.computed = upto

    def admit() -> None:
        request = waiting[0]
        pages, node = cache.match_prefix(request.tokens)
        cache.lock(node)
        need = pages_for(request.prompt_len + request.max_tokens, page_size) - len(pages)
        if allocator.num_free + cache.evictable_pages - sum(map(future_pages, running)) < need:
            cache.unlock(node)
            return
        waiting.pop(0)
        seen["reused"] += len(pages)
        request.pages, request.node, request.computed = pages, node, len(pages) * page_size
        request.pages += take(pages_for(request.prompt_len, page_size) - len(pages))
        running.append(request)

    def prefill(request: Request) -> None:
        compute(request, min(request.prompt_len, request.computed + rng.randint(1, 3 * page_size)))
        before = list(request.pages)
        request.pages, request.node = cache.cache_unfinished(
            request.tokens[: request.computed], request.pages, request.node
        )
        seen["deduplicated"] += sum(a != b for a, b in zip(before, request.pages))
        if request.computed == request.prompt_len:
            sample(request)  # the first output token

    def decode(request: Request) -> None:
        if request.computed == len(request.pages) * page_size:
            request.pages += take(1)
        compute(request, request.computed + 1)
        sample(request)

    def sample(request: Request) -> None:
        request.tokens.append(rng.randrange(50))
        if len(request.tokens) - request.prompt_len == request.max_tokens:
            finish(request)

    def finish(request: Request) -> None:
        running.remove(request)
        cache.cache_finished(request.tokens[: request.computed], request.pages, request.node)

    for step in range(3000):
        action = rng.choices(["arrive", "admit", "prefill", "decode", "abort"], [5, 4, 4, 6, 1])[0]
        prefilling = [r for r in running if r.computed < r.prompt_len]
        decoding = [r for r in running if r.computed >= r.prompt_len]
        if action == "arrive" and len(waiting) < 6:
            prompt = rng.choice(families)[: rng.randrange(30)] + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
            waiting.append(Request(prompt, rng.randint(1, 8)))
        elif action == "admit" and waiting:
            admit()
        elif action == "prefill" and prefilling:
            prefill(rng.choice(prefilling))
        elif action == "decode" and decoding:
            decode(rng.choice(decoding))
        elif action == "abort" and (running or waiting):
            request = rng.choice(running + waiting)
            if request in waiting:
                waiting.remove(request)
            else:
                finish(request)
        check_every_page_is_accounted_for(cache, allocator, running, contents, f"step {step} ({action})")

    for request in list(running):  # the server goes idle
        finish(request)
    check_every_page_is_accounted_for(cache, allocator, [], contents, "idle")
    assert allocator.num_free + cache.cached_pages == allocator.num_total
    assert cache.evictable_pages == cache.cached_pages
    assert seen["evicted"] and seen["reused"] and seen["deduplicated"], f"the run never exercised all paths: {seen}"
    cached = cache.cached_pages
    assert cache.evict(allocator.num_total) == cached and allocator.num_free == allocator.num_total
