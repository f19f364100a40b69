"""Which KV cache pages are free: the scheduler's side of the page pool (introduced in chapter 05).

Chapter 03 gave each request one slot sized for the longest sequence we accept. Now the cache is a pool
of pages, each holding the keys and values of ``page_size`` consecutive tokens, and a request holds a
list of pages (its page table). The scheduler takes them all when it admits the request: enough for its
prompt and its ``max_tokens`` (less the pages of a prefix the cache already holds), so a running request
never runs out of pages halfway through its reply, and nothing has to be taken from it to let another go
on. Memory follows what a request may need, not the longest sequence we accept, and two requests that
start alike share the pages of their common prefix (``radix.py``). The price: a request that stops early
held pages it never filled. Engines that chase the last page (vLLM, SGLang) let the table grow a page at
a time instead, and preempt a request (free its pages, run it again later) when the pool runs dry.

Page 0 is never handed out. It is the spare page: a batch padded to a fixed shape (CUDA graphs, chapter
06) points its padding at page 0, so whatever the padding writes lands where no request reads.

The free list is a list, never a set, and it is used in one fixed order: under tensor parallelism every
rank runs its own scheduler, and all of them must hand a request the same page numbers.
"""

from ..core import SPARE_PAGE, pages_for

__all__ = ["SPARE_PAGE", "OutOfPages", "PageAllocator", "pages_for"]


class OutOfPages(RuntimeError):
    """More pages were asked for than are free: admission or eviction let the scheduler overcommit."""


# --8<-- [start:page-allocator]
class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is the spare page, never handed out)")
        self.num_total = num_pages - 1  # the usable pages, 1 .. num_pages - 1
        # Taken from the end: reversed, so that a fresh pool hands out 1, 2, 3, ... (easy to read in a test).
        self.free_pages = list(range(num_pages - 1, SPARE_PAGE, -1))
        # A flag per page, only to catch a page freed twice: it would later go to two requests at once, and
        # each would silently overwrite the other's keys and values.
        self.is_free = [False] + [True] * self.num_total

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free pages; raises ``OutOfPages`` (taking none) when fewer are free."""
        if n > len(self.free_pages):
            raise OutOfPages(
                f"asked for {n} pages, {len(self.free_pages)} of {self.num_total} are free: evict from the prefix "
                "cache first, or admit fewer requests"
            )
        split = len(self.free_pages) - n
        pages = self.free_pages[split:][::-1]
        del self.free_pages[split:]
        for page in pages:
            self.is_free[page] = False
        return pages

    def free(self, pages: list[int]) -> None:
        """Give pages back; the next ``allocate`` of as many pages returns them in the same order."""
        wrong = [page for page in pages if page == SPARE_PAGE or self.is_free[page]]
        if wrong or len(set(pages)) < len(pages):
            raise ValueError(
                f"freeing pages {pages}: {wrong or 'a page listed twice'} already free or the spare page, so some "
                "page has two owners (nothing was freed)"
            )
        for page in pages:
            self.is_free[page] = True
        self.free_pages.extend(reversed(pages))
# --8<-- [end:page-allocator]
