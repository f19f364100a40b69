"""minisgl: an LLM serving engine built chapter by chapter.

This package is the tip of the course: the code as of the newest chapter. Each earlier chapter keeps
a frozen copy under ``chapters/NN/minisgl``.

Chapter 03 (this stage) splits the server into processes that talk over ZMQ:

- ``server/``      the API server process: FastAPI app, its end of the sockets, process launch
- ``tokenizer/``   tokenizer and detokenizer worker processes (text <-> token ids, stop strings)
- ``scheduler/``   the scheduler process: requests, continuous batching, one message out per step
- ``messages.py``  every message that crosses a process boundary; ``ipc.py``: the sockets
- ``engine/``      runs a batch through the model and samples the next tokens
- ``models/``, ``layers/``, ``batch.py``, ``kv_cache.py``, ``sampling.py``  as in chapter 02
- ``args.py``      the command line; ``__main__.py``: ``python -m minisgl``
"""

__version__ = "0.3.0"
