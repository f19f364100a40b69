"""The page pool's free list: page 0 kept back, a fixed order, and no page handed out twice."""

import pytest

from minisgl.scheduler.pages import OutOfPages, PageAllocator, pages_for


def test_pages_for_rounds_up():
    assert [pages_for(n, 4) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [pages_for(n, 1) for n in range(4)] == [0, 1, 2, 3]


def test_page_0_is_the_spare_page_and_never_handed_out():
    allocator = PageAllocator(5)
    assert allocator.num_total == 4 and allocator.num_free == 4
    pages = allocator.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4], f"a pool of 5 pages hands out pages 1..4, got {pages}"
    assert allocator.num_free == 0
    with pytest.raises(ValueError, match="spare page"):
        allocator.free([0])


def test_the_order_is_fixed_so_every_rank_hands_out_the_same_pages():
    def run() -> list[list[int]]:
        allocator, got = PageAllocator(9), []
        got.append(allocator.allocate(3))
        got.append(allocator.allocate(2))
        allocator.free(got[0])
        got.append(allocator.allocate(4))
        return got

    first = run()
    assert first[0] == [1, 2, 3] and first[1] == [4, 5], f"a fresh pool hands out 1, 2, 3, ...: {first}"
    assert first[2][:3] == [1, 2, 3], f"freed pages come back first, in the order they were freed: {first}"
    assert run() == first


def test_asking_for_too_many_pages_raises_and_takes_none():
    allocator = PageAllocator(4)
    allocator.allocate(2)
    with pytest.raises(OutOfPages, match="asked for 2 pages, 1 of 3 are free"):
        allocator.allocate(2)
    assert allocator.num_free == 1
    assert allocator.allocate(0) == [] and allocator.num_free == 1


def test_freeing_a_free_page_raises_and_frees_nothing():
    allocator = PageAllocator(6)
    pages = allocator.allocate(3)
    allocator.free(pages[:1])
    with pytest.raises(ValueError, match="two owners"):
        allocator.free(pages)  # pages[0] is free already
    with pytest.raises(ValueError, match="two owners"):
        allocator.free([pages[1], pages[1]])
    assert allocator.num_free == 3
    allocator.free(pages[1:])
    assert sorted(allocator.allocate(5)) == [1, 2, 3, 4, 5]
