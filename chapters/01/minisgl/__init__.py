"""minisgl: an LLM serving engine built chapter by chapter.

This package is the tip of the course: the code as of the newest chapter. Each earlier chapter keeps
a frozen copy under ``chapters/NN/minisgl``.

Chapter 01 (this stage) holds one model serving one request:

- ``models/``      config, the decoder (Llama / Qwen2 / Qwen3) and weight loading
- ``layers/``      the building blocks: RMSNorm, rotary embedding, attention, the SwiGLU MLP
- ``kv_cache.py``  the contiguous key/value cache
- ``sampling.py``  greedy, temperature, top-k, top-p
- ``generate.py``  tokenizer, chat template, prefill + decode loop, stop conditions, streaming
- ``__main__.py``  ``python -m minisgl "prompt"``
"""

__version__ = "0.1.0"
