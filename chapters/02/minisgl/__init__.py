"""minisgl: an LLM serving engine built chapter by chapter.

This package is the tip of the course: the code as of the newest chapter. Each earlier chapter keeps
a frozen copy under ``chapters/NN/minisgl``.

Chapter 02 (this stage) serves many requests at once, in one process:

- ``models/``, ``layers/``  the decoder from chapter 01; attention now runs a batch of requests
- ``batch.py``             one forward pass's tokens, requests laid end to end
- ``kv_cache.py``          the KV cache, one slot per running request
- ``sampling.py``          per-request sampling parameters, applied to a whole batch at once
- ``engine/``              runs a batch through the model and samples the next tokens
- ``scheduler/``           requests, the waiting queue and running set, continuous batching
- ``server/``              the OpenAI-compatible FastAPI app and the process that runs it all
- ``args.py``              the command line; ``__main__.py``: ``python -m minisgl``
"""

__version__ = "0.2.0"
