"""Structured output under load: the complete server's output tokens/s at concurrency 8 with and without a
JSON schema (``response_format``), and whether every constrained reply is what the schema says.

The top-level package's server (``python -m minisgl``, default dtype ``auto``) is started once with the
serving benchmarks' helper (``benchkit.serving.start_server``, the test kit's ``ServerProcess``), warmed up
(a few unconstrained requests, and two with the schema, which compile its grammar: the measured run pays
only the lookup; ``grammar_cost.py`` times the compile), and sent the same ``--requests`` (32) chat requests
twice, through the openai client, ``--concurrency`` (8) at a time, each streamed with ``temperature: 0`` and
``max_tokens`` ``--max-tokens`` (64), each prompt its own ("Describe person number 5 as JSON."):

1. **no constraint**: the model answers as it likes;
2. **json_schema**: ``response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": S}}``
   with S an object of a name, an age, an occupation and a free-text description, so that most replies run
   to ``max_tokens``; the grammar masks the logits of every step (``minisgl/grammar.py``).

The prefix cache is flushed before each run (``POST /flush_cache``), so neither finds the other's prompts.
No request sets ``ignore_eos``: a reply ends where the model (or the grammar) ends it, so the two runs need
not make the same number of tokens. The table gives, per run: output tokens/s (all completion tokens / the
run's wall time), the mean completion tokens and how many replies ended by ``stop`` and by ``length``, the
time to first token (TTFT) p50 and the inter-token latency (ITL) p50, CPU seconds of the server and client,
and how many replies that ended by ``stop`` parse with ``json.loads`` and validate against S
(``jsonschema``). A constrained reply cut by ``length`` is a prefix of valid JSON, not JSON: it is counted
apart. Then the ratio of the constrained run's tok/s to the unconstrained one's.

Run it from the repository root on a quiet machine (about 2 minutes on 2 CPU cores):

    python benchmarks/structured_output.py [--requests 32] [--concurrency 8] [--max-tokens 64]
    python benchmarks/structured_output.py --requests 4 --concurrency 2 --max-tokens 8 \\
        --output /tmp/structured_output.md                    # a quick try

The result goes to ``benchmarks/results/structured_output.md`` (``--output`` to change) and ``.json`` beside it.
"""

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass

import httpx
import jsonschema
import openai
from benchkit import record, serving
from tqdm import tqdm

TITLE = "Structured output: the complete server with and without a JSON schema"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "occupation": {"type": "string"},
        "description": {"type": "string"},
    },
    "required": ["name", "age", "occupation", "description"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
MODES = {"no constraint": None, "json_schema": SCHEMA_FORMAT}
COLUMNS = {
    "mode": None, "requests": None, "output tokens": None, "mean completion tokens": 1, "stop": None,
    "length": None, "wall s": 1, "output tok/s": 1, "TTFT p50 s": 2, "ITL p50 ms": 0, "CPU s": 0,
    "tok / CPU s": 1, "stop replies valid": None, "load at start": 2,
}


@dataclass
class Reply(serving.RequestResult):
    finish_reason: str | None = None


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Describe person number {i} as JSON."}]


async def send(client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int,
               response_format: dict | None) -> Reply:
    """One streamed chat request through the openai client: the arrival time of each piece of text, the text,
    the usage and how it finished."""
    extra = {"response_format": response_format} if response_format else {}
    reply = Reply(sent=time.perf_counter())
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra,
    )
    async for chunk in stream:
        if chunk.usage:
            reply.completion_tokens, reply.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                reply.chunk_times.append(time.perf_counter())
                reply.text += choice.delta.content
            if choice.finish_reason:
                reply.finish_reason = choice.finish_reason
    return reply


async def run_requests(url: str, model: str, prompts: list[list[dict]], max_tokens: int, concurrency: int,
                       response_format: dict | None, bar: tqdm) -> tuple[list[Reply], float]:
    """``concurrency`` clients share the requests in order; returns the replies and the wall time."""
    replies: list[Reply] = []
    openai_client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="none", max_retries=0, http_client=serving.http_client(concurrency)
    )
    async with openai_client as client:

        async def one(messages: list[dict]):
            replies.append(await send(client, model, messages, max_tokens, response_format))
            bar.update(1)

        wall = await serving.share_among_clients(prompts, concurrency, one)
    return replies, wall


def valid(reply: Reply) -> bool:
    """Whether the reply's text is JSON that the schema accepts."""
    try:
        jsonschema.validate(json.loads(reply.text), PERSON)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def measure(server, model: str, mode: str, args) -> tuple[dict, list[Reply]]:
    httpx.post(server.url + "/flush_cache", timeout=30).raise_for_status()  # no prompt cached by the other run
    load = os.getloadavg()[0]
    cpu_before = serving.server_and_client_cpu(server)
    with tqdm(total=args.requests, desc=mode, unit="req") as bar:
        prompts = [prompt(i) for i in range(args.requests)]
        replies, wall = asyncio.run(run_requests(server.url, model, prompts, args.max_tokens, args.concurrency,
                                                 MODES[mode], bar))
    cpu = serving.server_and_client_cpu(server) - cpu_before
    tokens = sum(r.completion_tokens for r in replies)
    ends = [r.finish_reason for r in replies]
    stopped = [r for r in replies if r.finish_reason == "stop"]
    values = [
        mode, len(replies), tokens, tokens / len(replies), ends.count("stop"), ends.count("length"), wall,
        tokens / wall, serving.percentile(serving.ttfts(replies), 50),
        1000 * serving.percentile(serving.itls(replies), 50), cpu,
        tokens / cpu if cpu else float("nan"), f"{sum(valid(r) for r in stopped)}/{len(stopped)}", load,
    ]
    other_finishes = len(replies) - ends.count("stop") - ends.count("length")
    return {**record.table_row(COLUMNS, values), "other_finishes": other_finishes}, replies


def report(run: dict) -> str:
    """The markdown result, from the JSON's fields."""
    work, (base, constrained) = run["workload"], run["rows"]
    ratio = "n/a" if run["tok_s_ratio"] is None else f"{run['tok_s_ratio']:.2f}x"
    lines = record.run_lines(run) + [
        f"- server (the top-level package), one for both runs, its prefix cache flushed before each: `{run['server']}`"
        + serving.threads_note(run["threads"]),
        (
            f"- workload, each run: {work['requests']} chat requests at concurrency {run['concurrency']}, each prompt "
            f"its own (\"Describe person number i as JSON.\"); max_tokens {work['max_tokens']}; temperature 0, "
            "streamed (openai client); no ignore_eos"
        ),
        f"- schema S: `{json.dumps(work['schema'])}`",
        "",
        *record.columns_table(COLUMNS, run["rows"]),
        "",
        f"**json_schema / no constraint: {ratio} output tokens/s** (ITL p50 {constrained['itl_p50_ms']} ms "
        f"against {base['itl_p50_ms']} ms)",
        "",
        "Constrained replies that ended by stop and parse with json.loads and validate against S: "
        f"{constrained['stop_replies_valid']}. The {constrained['length']} that ended by length are cut JSON (a "
        "prefix of a valid reply), not checked.",
        "",
        "output tok/s: completion tokens (usage) / wall time of the run; the runs need not make the same number",
        "of tokens (mean completion tokens, stop / length). TTFT: request sent to its first text. ITL: gaps",
        "between successive pieces of streamed text of one request. CPU s: CPU time of the server's processes",
        "and of this client during the run. stop replies valid: of the replies that ended by stop, those that",
        "are JSON valid against S. Numbers move with the machine's load (last column); compare rows of one run.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests of each run, each with its own prompt")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in flight")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    serving.add_server_options(parser, max_running_requests=16, context_length=1024, output="structured_output.md",
                               dtype="auto")
    args = parser.parse_args()
    serving.stop_on_sigterm()

    model_path, _ = serving.model_and_tokenizer(args)
    start = record.start_run("minisgl")
    rows, samples = [], {}
    with serving.start_server("top", args) as server:
        model = serving.served_model(server, "structured output")
        # Warm-up, not measured: lazy initialization, allocator growth, and the schema's grammar compiled. Its
        # prompts share nothing with the measured ones beyond the chat template's opening.
        for response_format, count in ((None, 4), (SCHEMA_FORMAT, 2)):
            warm = [[{"role": "user", "content": f"(warm-up) Name {n + 2} colours."}] for n in range(count)]
            asyncio.run(run_requests(server.url, model, warm, 8, count, response_format, tqdm(disable=True)))
        for mode in MODES:
            row, replies = measure(server, model, mode, args)
            rows.append(row)
            samples[mode] = [r.text for r in replies[:2]]
    base, constrained = rows
    ratio = constrained["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else float("nan")

    packages = (*record.SERVING_PACKAGES, "openai", "xgrammar", "jsonschema")
    run = record.run_info("structured_output", TITLE, start, model_path, packages)
    run.update({
        "server": serving.server_command(args), "dtype": args.dtype, "threads": args.threads or None,
        "concurrency": args.concurrency,
        "workload": {"requests": args.requests, "max_tokens": args.max_tokens, "schema": PERSON},
        "rows": rows, "tok_s_ratio": record.rounded(ratio, 2), "samples": samples,
    })
    record.write_result(args.output, report(run), run)


if __name__ == "__main__":
    main()
