"""This chapter's server as a process tree, for ``conftest.py``: the shared kit's ``ServerProcess``
(``tests/kit/server_process.py``) with the small test settings, and its /proc helpers."""

from server_process import TEST_SERVER_ARGS, descendants, is_alive, wait_until_gone
from server_process import ServerProcess as KitServerProcess

__all__ = ["ServerProcess", "descendants", "is_alive", "wait_until_gone"]


class ServerProcess(KitServerProcess):
    """``python -m minisgl --port 0`` from ``root`` with ``TEST_SERVER_ARGS`` and then ``args``."""

    def __init__(self, root, *args: str, **options):
        super().__init__(root, *TEST_SERVER_ARGS, *args, **options)
