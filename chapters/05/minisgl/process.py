"""Starting the server's child processes, and what every child does first (introduced in chapter 03)."""

import ctypes
import importlib
import os
import signal
import sys


def start_child(context, name: str, target: str, *args):
    """Start ``target`` ("package.module:function") in a fresh ``spawn``ed process named ``name``.

    The target is named by a string, not passed as a function, so that the parent never imports the
    child's module: the API server would otherwise load torch just to start the scheduler.
    """
    process = context.Process(target=run_target, name=name, args=(target, *args), daemon=True)
    process.start()
    return process


def scheduler_name(rank: int, tp_size: int) -> str:
    """The scheduler process's name: one per tensor-parallel rank, numbered when there are several."""
    return "minisgl-scheduler" if tp_size == 1 else f"minisgl-scheduler-{rank}"


def run_target(target: str, *args) -> None:
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(*args)


def become_child(name: str) -> None:
    """Name the process for ps/pstree, ignore Ctrl-C (the API server orchestrates shutdown), and die
    with the parent even if the parent is killed outright."""
    try:
        from setproctitle import setproctitle

        setproctitle(name)
    except ImportError:  # naming is a convenience, not a requirement
        pass
    # Ctrl-C in a terminal reaches the whole process group; only the API server should act on it,
    # and then it stops the children itself, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            sys.exit(1)
