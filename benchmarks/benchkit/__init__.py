"""What the benchmark scripts share, so that each script holds only what it measures.

- ``record``: what every result records (machine, load, versions, commit, command), its markdown table,
  and writing ``results/NAME.md`` with ``NAME.json`` beside it;
- ``serving``: the servers a serving benchmark starts (a chapter's ``python -m minisgl``, llama-cpp-python's),
  the chat workload, and the streaming client that times each request;
- ``timing``: several calls timed in shuffled rounds, their medians;
- ``plots``: the book's figure style and the pieces its plots and fragments are made of.

The scripts run as ``python benchmarks/NAME.py``, which puts ``benchmarks/`` first on ``sys.path``: that is
how they import this package.
"""
