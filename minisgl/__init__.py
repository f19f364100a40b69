"""minisgl: an LLM serving engine built chapter by chapter.

This package is the tip of the course: the code as of the newest chapter. Each earlier chapter keeps
a frozen copy under ``chapters/NN/minisgl``.

Chapter 06 (this stage, the complete server) adds Triton kernels for attention over the paged KV cache
(chapter 05: pages shared through a radix prefix cache, chunked prefill), CUDA graphs for decode steps,
an offline API and an interactive shell; the model is split over tensor-parallel ranks as in chapter 04:

- ``server/``      the API server process: FastAPI app, its end of the sockets, process launch (on every node)
- ``tokenizer/``   tokenizer and detokenizer worker processes (text <-> token ids, stop strings)
- ``scheduler/``   a scheduler process per rank: requests, pages (``pages.py``), the radix prefix cache
                   (``radix.py``), continuous batching with chunked prefill; rank 0 relays each step's messages
- ``distributed.py`` the process group, this rank's place in it, all-reduce, all-gather and the relay
- ``messages.py``  every message that crosses a process boundary; ``ipc.py``: the sockets
- ``core.py``      SamplingParams, Request and Batch: the scheduler/engine contract (no torch)
- ``config.py``    start-up facts resolved once and handed to every process (no torch)
- ``engine/``      runs a batch through the model and samples the next tokens; owns the KV cache's tensors
- ``attention/``   attention over the paged KV cache behind a backend: plain torch (``paged.py``, the kernels'
                   oracle) or Triton (``triton_backend.py``), chosen by ``--attention-backend``
- ``kernels/``     the Triton kernels: storing keys and values, paged decode (split-KV), paged extend
- ``engine/graphs.py`` CUDA graphs of decode steps, replayed for batches padded to a captured size
- ``llm.py``       the offline API (``from minisgl import LLM``); ``shell.py``: ``python -m minisgl --shell``
- ``models/``, ``layers/``, ``kv_cache.py``, ``sampling.py``  the model, its blocks (column- and row-parallel
                   linear layers, a vocabulary-parallel embedding), the cache's storage (this rank's KV heads), sampling
- ``args.py``      the command line; ``__main__.py``: ``python -m minisgl``

Only the scheduler processes import torch (and Triton); the API server and the tokenizers never load it.
"""

__version__ = "0.6.0"


def __getattr__(name: str):
    """``from minisgl import LLM, SamplingParams`` (chapter 06), loaded on first use: importing the package
    must not load torch, or the API server and the tokenizers would."""
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .core import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'minisgl' has no attribute {name!r}")
