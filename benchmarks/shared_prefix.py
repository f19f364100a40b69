"""Prefix sharing: chapter 05's radix prefix cache against no sharing (``--cache-type naive``), one workload.

Many real requests begin alike: every request of an application carries the same long system prompt, and
every turn of a chat resends the whole conversation so far. With ``--cache-type radix`` the server keeps
the KV cache pages of prompts it has computed and a request whose prompt starts the same way reuses them:
only the rest of its prompt is prefilled. With ``naive`` every request prefills its whole prompt. This
script measures what that is worth, in one run on one machine:

1. **system prompt**: ``--requests`` (32) requests that share one system prompt of about
   ``--system-tokens`` (600) tokens, each with its own short question;
2. **multi-turn**: ``--conversations`` (8) chats of ``--turns`` (4) turns; the first turn sends a
   document of about ``--document-tokens`` (400) tokens and a question, each later turn a short
   follow-up, and every turn resends the conversation so far, the server's earlier replies included
   (what a chat client does).

The chapter 05 server (the top-level package) is started once per ``--cache-types`` (radix, then naive),
with the same options, and runs both parts on the same workload at the same ``--concurrency`` (8
clients; a client runs one conversation's turns one after the other). Every request streams, with
``temperature: 0``, ``ignore_eos: true`` and the same ``--max-tokens`` (32), so each one generates
exactly that many tokens. Per part and cache type it reports

- time to first token (TTFT) p50 and p99: from sending a request to its first piece of text; the
  prefill a cache hit skips is here;
- output tokens/s: all generated tokens / wall time of the part;
- prefix hit rate: of all prompt tokens, those the server found in its cache, from each response's
  ``usage.prompt_tokens_details.cached_tokens``; the server's own count (``/state``'s ``cached_tokens``
  and ``prompt_tokens``, the difference over the part) is beside it as a check.

The targets: with radix, TTFT p50 at least 3x lower and output tokens/s at least 1.5x higher than naive,
on each part. Requests that arrive together before the shared prefix is computed all miss (the first
``--concurrency`` of the system-prompt part, and every chat's first turn): that is part of the workload.

The multi-turn replies are the model's own (greedy), so the two runs' later prompts can differ by a few
tokens where bfloat16 batching changes a greedy choice; the table gives each row's prompt tokens.

Run it from the repository root:

    python benchmarks/shared_prefix.py [--requests 32] [--conversations 8] [--turns 4] [--concurrency 8]

The result goes to ``benchmarks/results/shared_prefix.md`` (``--output`` to change) and ``.json`` beside
it; ``plot_results.render`` then draws the chapter 05 plot.
"""

import argparse
import asyncio
import os
from dataclasses import dataclass

import httpx
from benchkit import record, serving
from tqdm import tqdm

TITLE = "Prefix sharing: radix prefix cache vs none (naive), chapter 05 server"
TTFT_TARGET, TOK_S_TARGET = 3.0, 1.5  # radix against naive: TTFT p50 this many times lower, tok/s this many higher

FOLLOW_UPS = [
    "Can you say that more briefly?",
    "Why is that?",
    "Give me one example.",
    "What else should I know?",
    "How would you explain it to a child?",
    "Is there anything surprising about it?",
    "Say it again as a list.",
    "What is the most important part?",
]


@dataclass
class Conversation:
    opening: list[dict]  # messages before the first user turn (a system prompt), maybe none
    turns: list[str]  # the user's messages, sent one at a time, each after the reply to the last


def system_prompt_workload(tokenizer, requests: int, system_tokens: int) -> list[Conversation]:
    system = (
        "You are the visitor desk assistant of the town of Eastmere. Answer in a friendly tone, using these "
        f"notes about the town:\n{serving.notes(tokenizer, system_tokens, 0)}"
    )
    opening = [{"role": "system", "content": system}]
    return [
        Conversation(opening, [f"Visitor {i + 1} asks: {serving.question(i)}"]) for i in range(requests)
    ]


def multi_turn_workload(tokenizer, conversations: int, turns: int, document_tokens: int) -> list[Conversation]:
    chats = []
    for c in range(conversations):
        # Each chat starts from another sentence, so the documents differ from their first words on.
        document = serving.notes(tokenizer, document_tokens, start=c * 7 + 3)
        first = f"Read these notes:\n\n{document}\n\n{serving.question(c)}"
        follow = [FOLLOW_UPS[(c + t) % len(FOLLOW_UPS)] for t in range(turns - 1)]
        chats.append(Conversation([], [first, *follow]))
    return chats


async def run_conversations(url: str, model: str, chats: list[Conversation], max_tokens: int, concurrency: int,
                            bar: tqdm) -> tuple[list[serving.RequestResult], float]:
    """``concurrency`` clients share the conversations; each runs a conversation's turns in order."""
    results: list[serving.RequestResult] = []
    async with serving.http_client(concurrency) as client:

        async def converse(chat: Conversation):
            messages = list(chat.opening)
            for turn in chat.turns:
                messages.append({"role": "user", "content": turn})
                result = await serving.send_one(client, url, model, messages, max_tokens)
                messages.append({"role": "assistant", "content": result.text})
                results.append(result)
                bar.update(1)

        wall = await serving.share_among_clients(chats, concurrency, converse)
    return results, wall


def server_counts(url: str) -> dict:
    return httpx.get(url + "/state", timeout=30).json()


COLUMNS = {
    "workload": None, "cache": None, "requests": None, "prompt tokens": None, "output tokens": None, "wall s": 1,
    "output tok/s": 1, "TTFT p50 s": 2, "TTFT p99 s": 2, "prefix hit %": 1, "/state hit %": 1, "load at start": 2,
}


def measure(cache_type: str, args, parts: dict[str, list[Conversation]]) -> list[dict]:
    """Start the chapter 05 server with ``cache_type``, run each part of the workload on it, stop it."""
    extra = ("--cache-type", cache_type)
    if args.chunked_prefill_size is not None:
        extra += ("--chunked-prefill-size", str(args.chunked_prefill_size))
    rows = []
    with serving.start_server("top", args, extra) as server:
        model = serving.served_model(server, cache_type)
        # Warm-up, not measured, and sharing nothing with the workload beyond the chat template's first tokens.
        warm = [Conversation([], [f"Count to {n}."]) for n in range(3, 7)]
        asyncio.run(run_conversations(server.url, model, warm, 8, 4, tqdm(disable=True)))
        for name, chats in parts.items():
            before, load = server_counts(server.url), os.getloadavg()[0]
            n = sum(len(chat.turns) for chat in chats)
            with tqdm(total=n, desc=f"{cache_type} {name}", unit="req") as bar:
                results, wall = asyncio.run(
                    run_conversations(server.url, model, chats, args.max_tokens, args.concurrency, bar)
                )
            after = server_counts(server.url)
            for r in results:
                if r.completion_tokens != args.max_tokens:
                    tqdm.write(f"warning: a request made {r.completion_tokens} tokens, asked for {args.max_tokens}")
            prompt = sum(r.prompt_tokens for r in results)
            cached = sum(r.cached_tokens or 0 for r in results)
            state_prompt = after["prompt_tokens"] - before["prompt_tokens"]
            ttft = serving.ttfts(results)
            output = sum(r.completion_tokens for r in results)
            values = [
                name, cache_type, len(results), prompt, output, wall, output / wall, serving.percentile(ttft, 50),
                serving.percentile(ttft, 99), 100 * cached / max(prompt, 1),
                100 * (after["cached_tokens"] - before["cached_tokens"]) / max(state_prompt, 1), load,
            ]
            row = record.table_row(COLUMNS, values)
            rows.append({**row, "cached_tokens": cached, "pages_cached_after": after["cached_pages"],
                         "total_pages": after["total_pages"]})
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per part, radix against naive: how many times lower TTFT p50, how many times higher tok/s."""
    found = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        by_cache = {r["cache"]: r for r in rows if r["workload"] == name}
        if not {"radix", "naive"} <= by_cache.keys():
            continue
        radix, naive = by_cache["radix"], by_cache["naive"]
        ttft = naive["ttft_p50_s"] / radix["ttft_p50_s"] if radix["ttft_p50_s"] else float("inf")
        tok_s = radix["output_tok_s"] / naive["output_tok_s"]
        found.append({
            "workload": name, "ttft_p50_ratio": round(ttft, 2), "tok_s_ratio": round(tok_s, 2),
            "ttft_target": TTFT_TARGET, "tok_s_target": TOK_S_TARGET,
            "met": ttft >= TTFT_TARGET and tok_s >= TOK_S_TARGET,
        })
    return found


def verdict_line(v: dict) -> str:
    met = "target met" if v["met"] else "target NOT met"
    return (
        f"**{v['workload']}: radix TTFT p50 {v['ttft_p50_ratio']:.2f}x lower (target {v['ttft_target']:g}x), "
        f"output tok/s {v['tok_s_ratio']:.2f}x higher (target {v['tok_s_target']:g}x): {met}**"
    )


def report(run: dict) -> str:
    """The markdown result, from the JSON's fields."""
    work = run["workload"]
    system, chats = work["system_prompt"], work["multi_turn"]
    lines = record.run_lines(run) + [
        f"- server (the top-level package, chapter 05), started once per cache type: `{run['server']}`"
        + serving.threads_note(run["threads"]),
        (
            f"- workload, at concurrency {run['concurrency']}: system prompt: {system['requests']} requests sharing a "
            f"system prompt ({system['system_prompt_tokens']} tokens templated), each its own question; multi-turn: "
            f"{chats['conversations']} chats of {chats['turns']} turns, each turn resending the conversation so far "
            f"(first turn {chats['first_turn_tokens']} tokens); max_tokens {work['max_tokens']}; temperature 0, "
            "ignore_eos, streamed"
        ),
        "",
        *record.columns_table(COLUMNS, run["rows"], left=2),
        "",
        *[line for v in run["verdicts"] for line in (verdict_line(v), "")],
        "TTFT: request sent to its first piece of text. output tok/s: generated tokens / wall time of the part.",
        "prefix hit %: of the part's prompt tokens, those found in the prefix cache (usage cached_tokens);",
        "/state hit %: the same from the server's own counters (/state, difference over the part).",
        "Numbers move with the machine's load (last column); compare rows of one run, not across runs.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests of the system-prompt part")
    parser.add_argument("--system-tokens", type=int, default=600, help="about how long the shared system prompt is")
    parser.add_argument("--conversations", type=int, default=8, help="chats of the multi-turn part")
    parser.add_argument("--turns", type=int, default=4, help="turns of each chat")
    parser.add_argument("--document-tokens", type=int, default=400, help="about how long each chat's document is")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens every request generates")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in flight, the same for every run")
    parser.add_argument("--cache-types", nargs="+", default=["radix", "naive"], choices=["radix", "naive"])
    parser.add_argument("--chunked-prefill-size", type=int, default=None,
                        help="passed to the server (default: the server's own default)")
    serving.add_server_options(parser, max_running_requests=16, context_length=1024, output="shared_prefix.md")
    args = parser.parse_args()
    serving.stop_on_sigterm()

    model_path, tokenizer = serving.model_and_tokenizer(args)
    parts = {
        "system prompt": system_prompt_workload(tokenizer, args.requests, args.system_tokens),
        "multi-turn": multi_turn_workload(tokenizer, args.conversations, args.turns, args.document_tokens),
    }
    system_len = len(serving.chat_prompt_ids(tokenizer, parts["system prompt"][0].opening))
    first_len = len(serving.chat_prompt_ids(tokenizer, [{"role": "user", "content": parts["multi-turn"][0].turns[0]}]))
    # The last turn of a chat: every earlier turn, each reply at most max_tokens, a follow-up of some 20 tokens.
    longest = max(system_len + 40, first_len + (args.turns - 1) * (args.max_tokens + 30)) + args.max_tokens
    if longest > args.context_length:
        parser.error(f"prompts may reach {longest} tokens, over --context-length {args.context_length}")

    start = record.start_run("minisgl")
    rows = []
    for cache_type in args.cache_types:
        rows += measure(cache_type, args, parts)

    run = record.run_info("shared_prefix", TITLE, start, model_path
    )
    chunks = ("--chunked-prefill-size", str(args.chunked_prefill_size)) if args.chunked_prefill_size is not None else ()
    run.update({
        "server": serving.server_command(args, "--cache-type", "radix|naive", *chunks), "dtype": args.dtype,
        "threads": args.threads or None, "concurrency": args.concurrency,
        "workload": {
            "system_prompt": {"requests": args.requests, "system_prompt_tokens": system_len},
            "multi_turn": {"conversations": args.conversations, "turns": args.turns,
                           "first_turn_tokens": first_len},
            "max_tokens": args.max_tokens,
        },
        "rows": rows, "verdicts": verdicts(rows),
    })
    record.write_result(args.output, report(run), run)


if __name__ == "__main__":
    main()
