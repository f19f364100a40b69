"""Routing between replicas: SGLang's Model Gateway in front of two servers, ``cache_aware`` against
``round_robin``, on a multi-tenant workload, and one server alone as the baseline.

A service with several tenants sends each tenant's requests with that tenant's long system prompt. Behind
one server, every tenant's prefix lives in one radix cache (chapter 05). Behind two replicas, a request
finds its prefix only if it lands where that tenant's earlier requests went: ``round_robin`` alternates
workers whatever the prompt, so each tenant's prefix is computed on both; ``cache_aware`` keeps an
approximate radix tree of what it sent where and routes a request to the worker with the longest match,
unless the workers' loads are too uneven. This script measures what that changes, one configuration after
the other, each with fresh servers (empty caches):

1. ``1 server``: the chapter 06 server alone;
2. ``2 replicas, round_robin`` and ``2 replicas, cache_aware``: two servers with the same options, and
   ``smg launch --worker-urls A B --policy ...`` in front of them.

The workload: ``--tenants`` (4) system prompts of about ``--system-tokens`` (400) tokens each, all
different from their first line on, and ``--users`` (8) users per tenant, each with a question of its
own; the requests in a seeded shuffled order, ``--concurrency`` (4) clients, ``--max-tokens`` (16) new
tokens each, greedy, streamed. Per configuration: the prefix hit rate (``cached_tokens`` over prompt
tokens, from each response's usage), TTFT p50 and p99, output tokens/s, and each worker's share of the
prompt tokens (from its ``/state``).

On a machine with a few cores, two replicas share the cores one server would use alone (each gets its
share of torch's threads, ``--threads`` unless given): they cannot be faster than one, and the first row
says how much slower they are. What routing changes, on any machine, is how much prefill the replicas
repeat.

    python benchmarks/routing.py [--tenants 4] [--users 8] [--concurrency 4]

Needs ``sglang-router`` (``pip install sglang-router``: wheels for x86-64 Linux).
"""

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import httpx
from benchkit import record, serving
from tqdm import tqdm

TITLE = "Routing between replicas: SGLang's Model Gateway, cache_aware against round_robin, multi-tenant prompts"
COLUMNS = {
    "configuration": None, "threads per server": None, "requests": None, "prompt tokens": None, "prefix hit %": 1,
    "TTFT p50 s": 2, "TTFT p99 s": 2, "output tok/s": 1, "prompt tokens per worker": None, "load at start": 2,
}
TENANT_NAMES = ["a bakery", "a bicycle repair shop", "a lighthouse museum", "a ferry company", "a library",
                "a weather station", "a vineyard", "a football club"]


def workload(tokenizer, tenants: int, users: int, system_tokens: int, seed: int) -> list[list[dict]]:
    """Each tenant's system prompt (its own notes about the town, from a different sentence on) and each
    user's question, in a shuffled order."""
    conversations = []
    for t in range(tenants):
        system = (f"You are the assistant of {TENANT_NAMES[t % len(TENANT_NAMES)]} (tenant {t}). Answer from "
                  f"these notes:\n{serving.notes(tokenizer, system_tokens, start=11 * t + 1)}")
        for u in range(users):
            conversations.append([{"role": "system", "content": system},
                                  {"role": "user", "content": serving.question(t * users + u)}])
    random.Random(seed).shuffle(conversations)
    return conversations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(worker_urls: list[str], policy: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """``smg launch`` in front of the workers; returns it and its URL once its /health answers 200."""
    smg = shutil.which("smg") or os.path.join(os.path.dirname(sys.executable), "smg")
    port = free_port()
    process = subprocess.Popen([smg, "launch", "--worker-urls", *worker_urls, "--policy", policy, "--host",
                                "127.0.0.1", "--port", str(port), "--log-level", "warn"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"smg exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the gateway did not answer /health within {timeout:.0f} s")


async def run_requests(url: str, model: str, conversations: list, max_tokens: int, concurrency: int, bar: tqdm):
    results = []
    async with serving.http_client(concurrency) as client:

        async def one(messages):
            results.append(await serving.send_one(client, url, model, messages, max_tokens))
            bar.update(1)

        wall = await serving.share_among_clients(conversations, concurrency, one)
    return results, wall


def prompt_tokens_seen(server) -> int:
    return httpx.get(server.url + "/state", timeout=30).json()["prompt_tokens"]


def measure(name: str, args, conversations: list, replicas: int, policy: str | None) -> dict:
    # The replicas share the machine's cores: each gets its share of torch's threads, as one server gets them
    # all. (Two servers of two threads each on two cores slowed to a tenth of one server: their OpenMP workers
    # spin for cores the other server's workers hold.)
    threads = args.threads or max(1, (os.cpu_count() or 1) // replicas)
    args = argparse.Namespace(**{**vars(args), "threads": threads})
    servers, gateway = [], None
    try:
        for _ in range(replicas):
            servers.append(serving.start_server("top", args))
        model = serving.served_model(servers[0], name)
        url = servers[0].url
        if policy is not None:
            gateway, url = start_gateway([server.url for server in servers], policy, args.health_timeout)
        # Warm-up, straight to each worker: shares nothing with the workload beyond the chat template.
        for server in servers:
            warm = [[{"role": "user", "content": f"Count to {n}."}] for n in range(3, 5)]
            asyncio.run(run_requests(server.url, model, warm, 4, 2, tqdm(disable=True)))
        before, load = [prompt_tokens_seen(s) for s in servers], os.getloadavg()[0]
        with tqdm(total=len(conversations), desc=name, unit="req") as bar:
            results, wall = asyncio.run(run_requests(url, model, conversations, args.max_tokens, args.concurrency,
                                                     bar))
        per_worker = [prompt_tokens_seen(s) - b for s, b in zip(servers, before)]
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=30)
        for server in servers:
            server.stop()
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens or 0 for r in results)
    ttft = serving.ttfts(results)
    output = sum(r.completion_tokens for r in results)
    values = [name, threads, len(results), prompt, 100 * cached / max(prompt, 1), serving.percentile(ttft, 50),
              serving.percentile(ttft, 99), output / wall, " / ".join(map(str, per_worker)), load]
    return record.table_row(COLUMNS, values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=4, help="distinct system prompts")
    parser.add_argument("--users", type=int, default=8, help="requests per tenant, each its own question")
    parser.add_argument("--system-tokens", type=int, default=400, help="about how long each system prompt is")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    parser.add_argument("--seed", type=int, default=0, help="fixes the order of the requests")
    serving.add_server_options(parser, max_running_requests=8, context_length=1024, output="routing.md",
                               dtypes=("bfloat16", "float32"))
    args = parser.parse_args()
    serving.stop_on_sigterm()
    model_path, tokenizer = serving.model_and_tokenizer(args)
    conversations = workload(tokenizer, args.tenants, args.users, args.system_tokens, args.seed)
    start = record.start_run("minisgl")
    rows = [
        measure("1 server", args, conversations, 1, None),
        measure("2 replicas, round_robin", args, conversations, 2, "round_robin"),
        measure("2 replicas, cache_aware", args, conversations, 2, "cache_aware"),
    ]
    run = record.run_info("routing", TITLE, start, model_path)
    result = {**run, "server": serving.server_command(args), "workload": {
        "tenants": args.tenants, "users": args.users, "system_tokens": args.system_tokens,
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "seed": args.seed}, "rows": rows}
    lines = [
        *record.run_lines(run, [
            f"- servers: `{result['server']}`, each; the gateway: `smg launch --worker-urls A B --policy P` "
            f"(sglang-router {version('sglang-router')})",
            f"- workload: {args.tenants} tenants x {args.users} users, system prompts of about {args.system_tokens} "
            f"tokens, {args.max_tokens} new tokens each, greedy, streamed, {args.concurrency} clients, shuffled "
            f"(seed {args.seed})",
        ]),
        "",
        *record.columns_table(COLUMNS, rows),
        "",
        "prefix hit %: prompt tokens found in a worker's prefix cache (usage cached_tokens) over all prompt tokens.",
        "prompt tokens per worker: what each worker's /state counted during the row.",
    ]
    record.write_result(args.output, "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    main()
