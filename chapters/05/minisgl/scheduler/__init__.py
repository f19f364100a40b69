"""The scheduler: its queues, KV cache pages, the prefix cache and the loop (introduced in chapter 02)."""

from .scheduler import Scheduler

__all__ = ["Scheduler"]
