"""The scheduler: requests, the waiting queue and running set, and the loop (introduced in chapter 02)."""

from .request import Request, RequestOutput
from .scheduler import Scheduler

__all__ = ["Request", "RequestOutput", "Scheduler"]
