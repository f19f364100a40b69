"""The scheduler: the waiting queue and running set, KV cache slots, and the loop (introduced in chapter 02)."""

from .scheduler import Scheduler

__all__ = ["Scheduler"]
