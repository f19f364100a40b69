"""minisgl: an LLM serving engine built chapter by chapter.

This package is the tip of the course: the code as of the newest chapter. Each earlier chapter keeps
a frozen copy under ``chapters/NN/minisgl``.

Chapter 03 (this stage) splits the server into processes that talk over ZMQ:

- ``server/``      the API server process: FastAPI app, its end of the sockets, process launch
- ``tokenizer/``   tokenizer and detokenizer worker processes (text <-> token ids, stop strings)
- ``scheduler/``   the scheduler process: requests, KV cache slots, continuous batching, one message out per step
- ``messages.py``  every message that crosses a process boundary; ``ipc.py``: the sockets
- ``core.py``      SamplingParams, Request and Batch: the scheduler/engine contract (no torch)
- ``config.py``    start-up facts resolved once and handed to every process (no torch)
- ``engine/``      runs a batch through the model and samples the next tokens; owns the KV cache's tensors
- ``attention/``   the attention computation over the KV cache, behind a backend interface
- ``models/``, ``layers/``, ``kv_cache.py``, ``sampling.py``  the model, its blocks, the cache's storage, sampling
- ``args.py``      the command line; ``__main__.py``: ``python -m minisgl``

Only the scheduler process imports torch; the API server and the tokenizers never load it.
"""

__version__ = "0.3.0"
