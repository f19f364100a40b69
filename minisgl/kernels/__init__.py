"""Triton kernels for attention over a paged KV cache (introduced in chapter 06).

Chapter 05 wrote attention over pages in plain PyTorch (``attention/paged.py``): obviously right, and
slow, because every layer gathers each request's keys and values into a padded copy before it can
attend. These kernels read the pages where they lie instead, one program per request (and KV head),
and they must give what the torch functions give: the tests compare them, case by case.

- ``store.py``: write each new token's key and value into its row of the cache;
- ``decode.py``: one new token per request, online softmax over its pages, split along the sequence
  for long requests, then a merge of the splits;
- ``extend.py``: several new tokens per request (a prompt, a chunk, a prompt after a cached prefix),
  causal with the mask aligned to the bottom right.

Triton compiles these for a GPU. On a CPU, ``TRITON_INTERPRET=1`` (set before this package is
imported) runs them in Triton's interpreter, on numpy: slow, and only for tests.
"""

from .decode import paged_decode
from .extend import paged_extend
from .store import store_kv

__all__ = ["paged_decode", "paged_extend", "store_kv"]
