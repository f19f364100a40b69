"""The scheduler: requests, the waiting queue and running set, and the loop (chapter 02; a process in 03)."""

from .request import Request
from .scheduler import Scheduler

__all__ = ["Request", "Scheduler"]
