"""A prefix cache over KV pages: the radix tree of SGLang's RadixAttention (introduced in chapter 05).

Many prompts start alike: the same system prompt, the same few-shot examples, the conversation so far.
The keys and values of a token depend only on the tokens before it, so a prefix computed once can serve
every later prompt that starts with it. This tree remembers, for each cached prefix, the KV pages that
hold it. The path from the root to a node spells token ids; the node holds the pages of its own stretch.

- Keys are cut in whole pages: a page is shared whole or not at all, so a node's key is a multiple of
  ``page_size`` tokens long, and a node's children are told apart by the tokens of their first page.
- ``match_prefix`` finds the longest cached prefix of a new prompt (always leaving at least one token to
  compute: the model must run on the last token to sample the next one). Where the match ends inside a
  node, the node is split in two at that page boundary.
- ``insert`` puts a request's pages into the tree when its prefill is done and when it finishes.
  Insert follows a convention: it returns how many leading tokens the tree already held, and the
  *caller* frees its own pages for that stretch (the tree keeps its copy). ``cache_unfinished`` and
  ``cache_finished`` are that protocol written once; the scheduler calls them, not ``insert``.
- A running request locks the node its prefix ends at: ``lock_ref`` counts, on that node and every
  node above it, the requests that read those pages. A locked node is never evicted.
- When pages run short, ``evict`` frees unlocked leaves, least recently used first; a parent whose last
  child went becomes a leaf and may follow.
- A tenant's salt (``cache_salt``, the epilogue) keeps its prefixes to itself: its tokens' first page is keyed
  by ``(salt, token)`` pairs (``salted``), which equal no other tenant's tokens, nor a request's without a salt.
  Every path starts at the root, so the root's child for that page, and everything under it, is the tenant's
  own: matching, locking and inserting work as they did, and eviction still frees the least recently used
  leaves of every tenant together.

Every choice here is deterministic (dicts keep insertion order, ``last_access`` is a counter and not a
clock): under tensor parallelism each rank runs its own scheduler, and they must all keep and evict the
same pages.

``NaiveCache`` has the same interface and keeps nothing (``--cache-type naive``): the baseline.
"""

import heapq
from collections.abc import Callable, Iterator

from .pages import PageAllocator


# --8<-- [start:radix-node]
class RadixNode:
    def __init__(self, key: list[int], pages: list[int], parent: "RadixNode | None", last_access: int = 0):
        self.key = key  # token ids, a whole number of pages (a salted first page: (salt, token) pairs)
        self.pages = pages  # the pages that hold their keys and values: len(key) // page_size of them
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}  # by the tokens of the child's first page
        self.lock_ref = 0  # running requests whose prefix runs through this node
        self.last_access = last_access  # the cache's step counter when a request last used it

    def __repr__(self) -> str:
        return f"RadixNode(key={self.key}, pages={self.pages}, lock_ref={self.lock_ref})"
# --8<-- [end:radix-node]


def common_length(key: list[int], token_ids: list[int], page_size: int) -> int:
    """How many leading tokens ``key`` and ``token_ids`` share, counted in whole pages."""
    n = 0
    while n < len(key) and key[n : n + page_size] == token_ids[n : n + page_size]:
        n += page_size
    return n


def prefix_pages(node: RadixNode) -> list[int]:
    """The pages on the path from the root down to ``node``: the cached prefix that ends at ``node``."""
    parts = []
    while node.parent is not None:
        parts.append(node.pages)
        node = node.parent
    return [page for part in reversed(parts) for page in part]


# --8<-- [start:salted]
def salted(token_ids: list[int], salt: str | None, page_size: int) -> list:
    """The tokens as the tree keys them: without a salt, as they are; with one, the first page's tokens paired
    with the salt, so that the tenant's prefixes hang under root children of its own (SGLang keys every
    child by its ``extra_key`` and first page; here the first page is enough, since every path starts there)."""
    if salt is None:
        return token_ids
    return [(salt, token) for token in token_ids[:page_size]] + list(token_ids[page_size:])
# --8<-- [end:salted]


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


class RadixCache:
    def __init__(self, page_size: int, allocator: PageAllocator):
        self.page_size = page_size
        self.allocator = allocator  # evicted pages go back here
        self.root = RadixNode([], [], None)  # the empty prefix: no key, no pages, never locked or evicted
        self.clock = 0
        self.cached_pages = 0  # every page in the tree
        self.evictable_pages = 0  # the pages of unlocked nodes: what evict() could free right now

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # --8<-- [start:match-prefix]
    def match_prefix(self, token_ids: list[int], salt: str | None = None) -> tuple[list[int], RadixNode]:
        """The pages of the longest cached prefix of ``token_ids``, in whole pages, and the node it ends at.

        At most ``(len(token_ids) - 1) // page_size`` pages: at least one token is left for the model to
        compute. A match that ends inside a node splits it there, so the node returned ends exactly where
        the match does (the request locks it). Every node on the way is marked as used now. ``salt``: only
        the prefixes cached with the same salt match (``salted``).
        """
        token_ids = salted(token_ids, salt, self.page_size)
        # --8<-- [start:ex-radix-match]
        size = self.page_size
        usable = max(len(token_ids) - 1, 0) // size * size
        key = list(token_ids[:usable])
        node, pages, now = self.root, [], self.tick()
        while len(pages) * size < len(key):
            start = len(pages) * size
            child = node.children.get(tuple(key[start : start + size]))
            if child is None:
                break
            matched = common_length(child.key, key[start:], size)
            if matched < len(child.key):
                child = self.split(child, matched)  # the match ends inside child: it ends at the head now
            child.last_access = now
            pages += child.pages
            node = child
        return pages, node
        # --8<-- [end:ex-radix-match]
    # --8<-- [end:match-prefix]

    # --8<-- [start:split]
    def split(self, node: RadixNode, num_tokens: int) -> RadixNode:
        """Cut ``node`` after ``num_tokens`` tokens (whole pages): a new node takes the head and goes in
        between ``node`` and its parent. Returns the head.

        ``node`` keeps the tail and stays the same object, so a request that locked it still holds the
        end of its own prefix. Every lock through ``node`` also passes through the head: it inherits them.
        """
        size = self.page_size
        head = RadixNode(node.key[:num_tokens], node.pages[: num_tokens // size], node.parent, node.last_access)
        head.lock_ref = node.lock_ref
        head.parent.children[tuple(head.key[:size])] = head
        node.key, node.pages, node.parent = node.key[num_tokens:], node.pages[num_tokens // size :], head
        head.children[tuple(node.key[:size])] = node
        return head
    # --8<-- [end:split]

    # --8<-- [start:insert]
    def insert(self, token_ids: list[int], pages: list[int], salt: str | None = None) -> int:
        """Put the whole pages of ``token_ids`` into the tree, held by ``pages`` (the request's page table).

        Returns how many leading tokens the tree already held. The tree keeps its own pages for them:
        the caller frees its pages for that stretch, except those it got from the tree (its matched
        prefix). The partial last page, if any, is not inserted and stays the caller's.
        """
        return self.insert_node(token_ids, pages, salt)[0]

    def insert_node(self, token_ids: list[int], pages: list[int], salt: str | None = None) -> tuple[int, RadixNode]:
        """``insert``, also returning the node where the inserted prefix ends."""
        token_ids = salted(token_ids, salt, self.page_size)
        size = self.page_size
        key = list(token_ids[: len(token_ids) // size * size])
        if len(pages) < len(key) // size:
            raise ValueError(f"{len(key)} tokens need {len(key) // size} pages; got {len(pages)}: {pages}")
        node, start, now = self.root, 0, self.tick()
        while start < len(key):
            child = node.children.get(tuple(key[start : start + size]))
            if child is None:  # the rest is new: one leaf holds all of it
                child = RadixNode(key[start:], list(pages[start // size : len(key) // size]), node, now)
                node.children[tuple(key[start : start + size])] = child
                self.cached_pages += len(child.pages)
                self.evictable_pages += len(child.pages)
                return start, child
            matched = common_length(child.key, key[start:], size)
            if matched < len(child.key):
                child = self.split(child, matched)  # the key branches off (or ends) inside child
            child.last_access = now
            node, start = child, start + matched
        return start, node
    # --8<-- [end:insert]

    # --8<-- [start:lock]
    def lock(self, node: RadixNode) -> None:
        """A running request reads the prefix that ends at ``node``: keep it, and every node above it."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """The request that locked ``node`` no longer reads it."""
        while node is not self.root:
            if node.lock_ref == 0:
                raise ValueError(f"unlocking {node}, which no request holds")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
            node = node.parent
    # --8<-- [end:lock]

    def nodes(self) -> Iterator[tuple[int, RadixNode]]:
        """Every node but the root, parents before children, with its depth (1: a child of the root)."""
        stack = [(1, child) for child in reversed(self.root.children.values())]
        while stack:
            depth, node = stack.pop()
            yield depth, node
            stack += [(depth + 1, child) for child in reversed(node.children.values())]

    # --8<-- [start:evict]
    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages from unlocked leaves, least recently used first; a parent left
        without children becomes a leaf and can go too. Returns how many pages were freed: fewer when
        nothing more is evictable, a few more when the last leaf held more than was still needed.
        """
        # --8<-- [start:ex-evict]
        # The traversal position breaks ties (a whole path shares one last_access), so no two entries
        # compare equal and every rank pops the same leaf.
        unlocked = [node for _, node in self.nodes() if not node.children and node.lock_ref == 0]
        leaves = [(node.last_access, order, node) for order, node in enumerate(unlocked)]
        heapq.heapify(leaves)
        freed, order = 0, len(leaves)
        while freed < num_pages and leaves:
            _, _, leaf = heapq.heappop(leaves)
            self.allocator.free(leaf.pages)
            freed += len(leaf.pages)
            parent = leaf.parent
            del parent.children[tuple(leaf.key[: self.page_size])]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, order, parent))
                order += 1
        self.cached_pages -= freed
        self.evictable_pages -= freed
        return freed
        # --8<-- [end:ex-evict]
    # --8<-- [end:evict]

    # --8<-- [start:cache-request]
    def cache_unfinished(self, token_ids: list[int], pages: list[int], node: RadixNode,
                         salt: str | None = None) -> tuple[list[int], RadixNode]:
        """A running request's prefill (or one chunk of it) is done: share what it has computed so far.

        ``token_ids``: the tokens whose keys and values are in ``pages`` (its page table); ``node``: the
        node it holds locked. Its whole pages go into the tree, its pages that duplicate the tree's are
        freed, and its lock moves down to the new end of its prefix. Returns the request's new page table
        (the tree's pages, then its own) and the node it now holds. ``salt``: the request's ``cache_salt``.
        """
        held = len(prefix_pages(node))
        if len(token_ids) // self.page_size <= held:
            return pages, node  # nothing new to share
        cached, end = self.insert_node(token_ids, pages, salt)
        self.allocator.free(pages[held : cached // self.page_size])
        self.lock(end)  # before unlocking the old node, so that the shared part is never evictable meanwhile
        self.unlock(node)
        shared = prefix_pages(end)
        return shared + pages[len(shared) :], end

    def cache_finished(self, token_ids: list[int], pages: list[int], node: RadixNode, salt: str | None = None) -> None:
        """A request is done, finished or aborted: the tree keeps what it computed, the rest is freed.

        ``token_ids``: the tokens whose keys and values are in ``pages`` (a finished request's last token
        has none: it was sampled, never run through the model). ``node``: the node it holds locked.
        """
        held = len(prefix_pages(node))
        cached, end = self.insert_node(token_ids, pages, salt)
        kept = max(len(prefix_pages(end)), held)  # pages[:kept] are the tree's now
        self.allocator.free(pages[held : cached // self.page_size] + pages[kept:])
        self.unlock(node)
    # --8<-- [end:cache-request]

    def render(self, decode: Callable[[list[int]], str] | None = None, width: int = 60) -> str:
        """The tree as indented text, one node a line: its tokens (as text, given ``decode``), its pages,
        how many requests lock it, and when it was last used."""
        lines = [f"root ({self.cached_pages} pages cached, {self.evictable_pages} of them evictable)"]
        for depth, node in self.nodes():
            key = [token[1] if isinstance(token, tuple) else token for token in node.key]  # without its salt
            salt = f"salt={node.key[0][0]!r} " if node.key and isinstance(node.key[0], tuple) else ""
            tokens = clip(repr(decode(key)) if decode else str(key), width)
            lines.append(f"{'  ' * depth}{salt}{tokens} pages={clip(str(node.pages), width)} "
                         f"lock={node.lock_ref} used={node.last_access}")
        return "\n".join(lines)


# --8<-- [start:naive-cache]
class NaiveCache:
    """No prefix sharing (``--cache-type naive``): nothing is matched, nothing is kept, and a request's pages
    are all freed when it finishes. The same interface as ``RadixCache``, so the scheduler needs no branch
    as long as it goes through ``cache_unfinished`` and ``cache_finished`` (``insert`` alone cannot tell
    the caller that nothing was kept)."""

    def __init__(self, page_size: int, allocator: PageAllocator):
        self.page_size = page_size
        self.allocator = allocator
        self.root = RadixNode([], [], None)
        self.cached_pages = 0
        self.evictable_pages = 0

    def match_prefix(self, token_ids: list[int], salt: str | None = None) -> tuple[list[int], RadixNode]:
        return [], self.root

    def insert(self, token_ids: list[int], pages: list[int], salt: str | None = None) -> int:
        return 0  # keeps nothing: every page stays the caller's

    def lock(self, node: RadixNode) -> None:
        pass

    def unlock(self, node: RadixNode) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0

    def cache_unfinished(self, token_ids: list[int], pages: list[int], node: RadixNode,
                         salt: str | None = None) -> tuple[list[int], RadixNode]:
        return pages, node

    def cache_finished(self, token_ids: list[int], pages: list[int], node: RadixNode, salt: str | None = None) -> None:
        self.allocator.free(pages)

    def render(self, decode: Callable[[list[int]], str] | None = None, width: int = 60) -> str:
        return "naive cache: keeps nothing"
# --8<-- [end:naive-cache]


CACHE_TYPES = {"radix": RadixCache, "naive": NaiveCache}  # --cache-type
