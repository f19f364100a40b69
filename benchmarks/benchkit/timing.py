"""Timing several calls fairly on a shared machine: shuffled rounds, medians (chapter 05 on).

Nothing here imports torch: a call is any function of no arguments.
"""

import random
import statistics
import time
from collections.abc import Callable


def shuffled_medians(calls: dict, repeats: int, rng: random.Random,
                     after_round: Callable[[], None] = lambda: None) -> dict:
    """Median ms of each call. In each of ``repeats`` rounds every call runs once, in a shuffled order, so that
    a busy spell of the machine slows every call alike rather than one of them. Each call runs twice first,
    unmeasured: first calls pay for allocator growth, oneDNN's kernel choice, a compilation."""
    for call in calls.values():
        call()
        call()
    times = {key: [] for key in calls}
    order = list(calls)
    for _ in range(repeats):
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - start)
        after_round()
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}
