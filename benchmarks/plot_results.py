"""The book's numbers: chapter plots (PNG) and short markdown fragments, made from the benchmarks' JSON results.

Every benchmark writes its result twice: ``benchmarks/results/NAME.md`` for people to read, and
``NAME.json`` beside it for programs: the table's rows (the same rounded numbers) and how they were
measured (date, machine, cores, load averages, versions, command, commit). For each result that a
chapter page shows (``FIGURES``) this script draws ``docs/assets/benchmarks/chNN-*.png`` and writes
``benchmarks/results/NAME.book.md``: one line on where and how the numbers were measured, a table of
the few columns that make the chapter's point, and the plot. The chapter page includes that fragment
(``--8<-- "benchmarks/results/NAME.book.md"``), so it always shows what the last run measured.

The benchmark scripts call ``render`` right after writing their result; ``make bench`` runs this script
after them. By hand, from the repository root:

    python benchmarks/plot_results.py                   # every figure and fragment, from results/NAME.json

(Two results measured before the benchmarks wrote JSON were converted from their markdown once; their
JSON says ``converted_from``. The converter is in the repository's history.)
"""

import argparse
import itertools
import json
from pathlib import Path

from benchkit.plots import (
    BLUE,
    CAPTION_GREY,
    GREEN,
    ORANGE,
    PURPLE,
    SKY,
    VERMILLION,
    bar_panel,
    footer,
    fragment,
    grouped_panel,
    heading,
    measured,
    panels,
    save,
    verdict_words,
)
from benchkit.record import REPO_ROOT, RESULTS, markdown_table
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

# ---------------------------------------------------------------- chapter 01: one request, decode speed


def decode_figure(result: dict):
    rows = result["rows"]
    fig, ax = panels()
    width, x = 0.36, range(len(rows))
    ours = [r["minisgl_tok_s"] for r in rows]
    theirs = [r["transformers_tok_s"] for r in rows]
    for offset, values, color in [(-width / 2, ours, BLUE), (width / 2, theirs, ORANGE)]:
        bars = ax.bar([i + offset for i in x], values, width, color=color)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=10)
    ticks = [f"{r['dtype']}\nminisgl / transformers: {r['ratio_ours_transformers']:.2f}x" for r in rows]
    ax.set_xticks(x, ticks)
    ax.tick_params(axis="x", length=0)
    ax.set_ylim(0, max(ours + theirs) * 1.2)
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"One request, greedy, {result['new_tokens']} new tokens ({result['model']})")
    handles = [
        Patch(color=BLUE, label="minisgl, chapter 01 (Generator)"), Patch(color=ORANGE, label="transformers generate")
    ]
    heading(fig, "Chapter 01: decoding one request, minisgl vs transformers", handles)
    footer(fig, result)
    return fig


def decode_fragment(result: dict, png: str) -> str:
    lead = (
        f"{measured(result)}; {result['torch_threads']} torch threads, {result['model']}, one request with a "
        f"{result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, greedy, median of "
        f"{result['repeats']} runs: `{result['command']}`."
    )
    lead += (f" Of the floor: the time the weights take to stream at the memory bandwidth measured in the same run "
             f"({result['bandwidth_gb_s']:.1f} GB/s), over the time a token took.")
    header = ["dtype", "minisgl tok/s", "transformers tok/s", "minisgl / transformers", "same greedy tokens",
              "minisgl, of the floor", "transformers, of the floor"]
    rows = [
        [
            r["dtype"], f"{r['minisgl_tok_s']:.1f}", f"{r['transformers_tok_s']:.1f}",
            f"{r['ratio_ours_transformers']:.2f}x", f"{r['tokens_equal_prefix']}/{result['new_tokens']}",
            f"{r['minisgl_of_floor']}%", f"{r['transformers_of_floor']}%",
        ]
        for r in result["rows"]
    ]
    alt = "Decode tokens per second of one request: minisgl chapter 01 and transformers, in float32 and bfloat16"
    return fragment(lead, header, rows, "lrrrrrr", png, alt)


# ---------------------------------------------------------------- chapters 02 on: the server under a workload


def engine_colors(rows: list[dict]) -> dict[str, str]:
    """transformers in orange, each of our engines in its own colour, in the order of the table."""
    ours = itertools.cycle([BLUE, GREEN, VERMILLION, PURPLE, SKY, "#000000"])
    engines = dict.fromkeys(r["engine"] for r in rows)
    return {engine: ORANGE if engine == "transformers" else next(ours) for engine in engines}


# A serving result's panels: (column key, panel title, y label, decimals).
THROUGHPUT = ("output_tok_s", "Throughput (tok/s)", "output tokens / s", 1)
TTFT_P50 = ("ttft_p50_s", "TTFT p50 (s)", "seconds", 2)
TTFT_P99 = ("ttft_p99_s", "TTFT p99 (s)", "seconds", 2)
ITL_P50 = ("itl_p50_ms", "Inter-token p50 (ms)", "milliseconds", 0)


def serve_figure(result: dict, title: str, charts: list[tuple], tick, legend=None):
    """One bar per table row in each of the ``charts`` (panels as ``THROUGHPUT`` is one)."""
    rows = result["rows"]
    colors = engine_colors(rows)
    fig, axes = panels(len(charts))
    for ax, (key, name, ylabel, decimals) in zip(axes, charts):
        ticks, values = [tick(result, r) for r in rows], [r[key] for r in rows]
        bar_panel(ax, ticks, values, [colors[r["engine"]] for r in rows], name, ylabel, decimals)
    handles = [Patch(color=color, label=legend(result, engine)) for engine, color in colors.items()] if legend else None
    heading(fig, title, handles)
    workload = result["workload"]
    footer(
        fig, result,
        f"{result['model']}, {result['dtype']}, {workload['requests']} streamed chat requests, "
        f"{workload['max_tokens_total']} output tokens",
    )
    return fig


def clients(result: dict) -> str:
    """How many clients a one-concurrency comparison ran (its rows' mode is "concurrency 32")."""
    return result["rows"][0]["mode"].replace("concurrency ", "")


def one_after_the_other(result: dict) -> str:
    """A comparison fragment's opening words: when, where, and each row's load at its start."""
    loads = ", then ".join(f"{r['load_at_start']:.2f}" for r in result["rows"])
    return f"{measured(result)} ({loads} at the start of each row); the rows ran one after the other on the same " \
        "workload"


def versus(row: dict, base: dict) -> str:
    return f"{row['output_tok_s'] / base['output_tok_s']:.2f}x"


def chapter_of(row: dict) -> str:
    return row["chapter"] or "?"


def continuous_tick(result: dict, row: dict) -> str:
    if row["engine"] == "transformers":
        return row["mode"].replace("static batch ", "static\nbatch ")
    tick = row["mode"].replace("concurrency ", "c=")
    if row["requests"] < result["workload"]["requests"]:
        tick += f"\n({row['requests']} req.)"  # concurrency 1 runs only the first requests
    return tick


def continuous_legend(result: dict, engine: str) -> str:
    if engine == "transformers":
        return "transformers generate, static batches"
    row = next(r for r in result["rows"] if r["engine"] == engine)
    return f"minisgl chapter {chapter_of(row)}: c = clients in flight"


def continuous_figure(result: dict):
    return serve_figure(
        result,
        "Chapter 02: continuous batching vs transformers' static batching",
        [THROUGHPUT, ("ttft_p50_s", "Time to first token, p50 (s)", "seconds", 2)],
        continuous_tick,
        continuous_legend,
    )


def continuous_fragment(result: dict, png: str) -> str:
    workload = result["workload"]
    lead = (
        f"{measured(result)}; server and client share the cores. {result['model']}, "
        f"{result['dtype']}, {workload['requests']} streamed chat requests "
        f"(prompts {workload['prompt_tokens_min']}..{workload['prompt_tokens_max']} tokens, max_tokens "
        f"{workload['max_tokens_min']}..{workload['max_tokens_max']}): `{result['command']}`."
    )
    hf = next((r for r in result["rows"] if r["engine"] == "transformers"), None)
    header = ["engine", "batching", "requests", "output tok/s", "TTFT p50 s", "ITL p50 ms"]
    if hf:
        header.insert(4, "vs transformers")
    rows = []
    for r in result["rows"]:
        row = [
            r["engine"], r["mode"], r["requests"], f"{r['output_tok_s']:.1f}", f"{r['ttft_p50_s']:.2f}", r["itl_p50_ms"]
        ]
        if hf:
            row.insert(4, versus(r, hf))
        rows.append(row)
    alt = "Bar charts of the table: output tokens per second and median time to first token of each row"
    return fragment(lead, header, rows, "llrrrrr" if hf else "llrrrr", png, alt)


def split_tick(result: dict, row: dict) -> str:
    # Chapter 03 split the server into processes; the chapters after it keep the split.
    shape = "one process" if chapter_of(row) in ("01", "02") else "process tree"
    return f"chapter {chapter_of(row)}\n{shape}"


def split_figure(result: dict):
    title = f"Chapter 03: one process (chapter 02) vs the process tree, {clients(result)} clients"
    return serve_figure(result, title, [THROUGHPUT, TTFT_P50, ITL_P50], split_tick)


def split_fragment(result: dict, png: str) -> str:
    rows = result["rows"]
    lead = f"{one_after_the_other(result)}, server and client sharing the cores: `{result['command']}`."
    base = rows[0]
    header = ["server", "output tok/s", f"vs chapter {chapter_of(base)}", "TTFT p50 s", "ITL p50 ms", "tok / CPU s"]
    table_rows = [
        [
            split_tick(result, r).replace("\n", ", "), f"{r['output_tok_s']:.1f}", versus(r, base),
            f"{r['ttft_p50_s']:.2f}", r["itl_p50_ms"], f"{r['tok_cpu_s']:.1f}",
        ]
        for r in rows
    ]
    alt = "Bar charts of the table: output tokens per second, median time to first token and median inter-token latency"
    return fragment(lead, header, table_rows, "lrrrrr", png, alt)


# ---------------------------------------------------------------- chapter 05: pages and a prefix cache vs slots


def kv_tick(result: dict, row: dict) -> str:
    """ "chapter 03\nslots", "chapter 05\npages, radix": what the server's log said its KV cache was."""
    kv = row.get("kv_cache") or ""
    if "pages" in kv:
        kind = "pages, " + kv.split(", ")[-1].removesuffix(" cache") if ", " in kv else "pages"
    else:
        kind = "slots" if "slots" in kv else "?"
    return f"chapter {chapter_of(row)}\n{kind}"


def paged_figure(result: dict):
    title = f"Chapter 05: paged KV cache + prefix cache vs chapter 03's slots, {clients(result)} clients"
    return serve_figure(result, title, [THROUGHPUT, TTFT_P50, TTFT_P99, ITL_P50], kv_tick)


def paged_fragment(result: dict, png: str) -> str:
    rows = result["rows"]
    defaults = result.get("top_defaults") or {}
    knobs = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in defaults.items() if name != "num_pages")
    lead = (
        f"{one_after_the_other(result)}, server and client sharing the cores, both servers `{result['server']}` "
        f"(chapter 05 at its defaults: {knobs}; its pages hold as many tokens as chapter 03's slots): "
        f"`{result['command']}`."
    )
    base = rows[0]
    header = [
        "server", "KV cache", "output tok/s", f"vs chapter {chapter_of(base)}", "TTFT p50 s", "TTFT p99 s",
        "ITL p50 ms", "prompt cached",
    ]
    table_rows = [
        [
            f"chapter {chapter_of(r)}", r.get("kv_cache") or "?", f"{r['output_tok_s']:.1f}", versus(r, base),
            f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}", r["itl_p50_ms"],
            "n/a" if r.get("prompt_cached") is None else f"{r['prompt_cached']}%",
        ]
        for r in rows
    ]
    alt = (
        "Bar charts of the table: output tokens per second, time to first token p50 and p99, and median "
        "inter-token latency of chapter 03 and chapter 05"
    )
    return fragment(lead, header, table_rows, "llrrrrrr", png, alt)


def shared_prefix_figure(result: dict):
    rows = result["rows"]
    parts = list(dict.fromkeys(r["workload"] for r in rows))
    caches = list(dict.fromkeys(r["cache"] for r in rows))
    colors = [BLUE if c == "radix" else VERMILLION for c in caches]
    by = {(r["workload"], r["cache"]): r for r in rows}
    fig, axes = panels(3)
    charts = [
        ("ttft_p50_s", "TTFT p50 (s)", "seconds", 2, ""),
        ("output_tok_s", "Throughput (tok/s)", "output tokens / s", 1, ""),
        ("prefix_hit", "Prefix hit rate (%)", "% of prompt tokens", 0, "%"),
    ]
    for ax, (key, title, ylabel, decimals, suffix) in zip(axes, charts):
        series = [(c, [by[p, c][key] for p in parts]) for c in caches]
        grouped_panel(ax, [p.replace(" ", "\n", 1) for p in parts], series, colors, title, ylabel, decimals, suffix)
    names = {"radix": "--cache-type radix (prefix cache)", "naive": "--cache-type naive (no sharing)"}
    handles = [Patch(color=color, label=names[c]) for c, color in zip(caches, colors)]
    heading(fig, f"Chapter 05: shared prefixes, radix cache vs none, {result['concurrency']} clients", handles)
    work = result["workload"]
    footer(
        fig, result,
        f"{work['system_prompt']['requests']} requests sharing a "
        f"{work['system_prompt']['system_prompt_tokens']}-token system prompt; {work['multi_turn']['conversations']} "
        f"chats × {work['multi_turn']['turns']} turns; max_tokens {work['max_tokens']}",
    )
    return fig


def shared_prefix_fragment(result: dict, png: str) -> str:
    work = result["workload"]
    lead = (
        f"{measured(result)}; the chapter 05 server once per cache type, server and client sharing the cores; "
        f"{result['model']}, {result['dtype']}, {result['concurrency']} clients: "
        f"{work['system_prompt']['requests']} requests sharing a {work['system_prompt']['system_prompt_tokens']}-token "
        f"system prompt, then {work['multi_turn']['conversations']} chats of {work['multi_turn']['turns']} turns "
        f"resending the conversation, max_tokens {work['max_tokens']}: `{result['command']}`."
    )
    header = ["workload", "cache", "prompt tokens", "TTFT p50 s", "TTFT p99 s", "output tok/s", "prefix hit"]
    rows = [
        [
            r["workload"], r["cache"], r["prompt_tokens"], f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}",
            f"{r['output_tok_s']:.1f}", f"{r['prefix_hit']:.0f}%",
        ]
        for r in result["rows"]
    ]
    verdicts = [
        f"**{v['workload']}**: radix TTFT p50 {v['ttft_p50_ratio']:.2f}x lower (target {v['ttft_target']:g}x), "
        f"output tok/s {v['tok_s_ratio']:.2f}x higher (target {v['tok_s_target']:g}x): {verdict_words(v['met'])}."
        for v in result["verdicts"]
    ]
    alt = "Bar charts of the table: TTFT p50, output tokens per second and prefix hit rate, radix against naive"
    return fragment(lead, header, rows, "llrrrrr", png, alt) + "\n" + "\n\n".join(verdicts) + "\n"


def capacity_tick(row: dict) -> str:
    """ "slots\ncomputed", "pages, radix\nseen in /state"."""
    kind = row["kv_cache"].split(" ")[0]
    if ", " in row["kv_cache"]:
        kind += ", " + row["kv_cache"].split(", ")[-1].removesuffix(" cache")
    return f"{kind}\n{row['how']}"


def repeats(n: int) -> str:
    return f"{n} repeat" + ("" if n == 1 else "s")


def capacity_figure(result: dict):
    rows = result["rows"]
    fig, ax = panels()
    colors = [ORANGE if r["kv_cache"].startswith("slots") else BLUE if r["how"] == "computed" else GREEN for r in rows]
    labels = [capacity_tick(r) for r in rows]
    bar_panel(ax, labels, [r["requests_at_once"] for r in rows], colors,
              f"Requests of the workload at once in {result['budget_tokens']} tokens of KV cache "
              f"({result['slots']} slots of {result['context_length']}, or pages of {result['page_size']})",
              "requests at once", 0)
    ax.axhline(result["workload"]["requests"], color=CAPTION_GREY, linestyle=":", linewidth=1)
    ax.set_ylim(0, max(ax.get_ylim()[1], result["workload"]["requests"] * 1.1))
    handles = [
        Patch(color=ORANGE, label="chapter 03: one slot of --context-length per request"),
        Patch(color=BLUE, label="chapter 05: pages, computed"),
        Patch(color=GREEN, label="chapter 05: pages, seen in /state under load"),
    ]
    heading(fig, "Chapter 05: capacity, pages against slots, one KV memory budget", handles, ncols=2)
    work = result["workload"]
    footer(
        fig, result,
        f"{work['requests']} requests of the serving workload (prompt + max_tokens "
        f"{work['tokens_min']}..{work['tokens_max']}, mean {work['tokens_mean']}); dotted: all of them",
    )
    return fig


def capacity_fragment(result: dict, png: str) -> str:
    work = result["workload"]
    lead = (
        f"{measured(result)}; {work['requests']} requests of the serving workload (seed {work['seed']}, prompt + "
        f"max_tokens {work['tokens_min']}..{work['tokens_max']} tokens, mean {work['tokens_mean']}), KV memory for "
        f"{result['budget_tokens']} tokens ({result['budget_mib']} MiB in {result['dtype']} for {result['model']}): "
        f"`{result['command']}`."
    )
    header = ["KV cache", "how", "requests at once", "vs slots"]
    slots = next(r for r in result["rows"] if r["kv_cache"].startswith("slots"))["requests_at_once"]
    rows = [
        [r["kv_cache"], r["how"], r["requests_at_once"], f"{r['requests_at_once'] / slots:.2f}x"]
        for r in result["rows"]
    ]
    alt = "Bar chart of the table: requests that fit at once with slots and with pages"
    text = fragment(lead, header, rows, "llrr", png, alt) + "\n" + result["verdict"] + "\n"
    ceiling = [r["kv_cache"] for r in result["rows"] if r["requests_at_once"] == work["requests"]]
    if ceiling:  # every request of the workload got in: the cache could have held more, how many is unmeasured
        text += (f"\n{', '.join(ceiling)}: all {work['requests']} requests of the workload fit, so that row is the "
                 "workload's ceiling, not the cache's: how many more would fit, this run does not say.\n")
    return text


def chunked_figure(result: dict):
    rows = result["rows"]
    fig, (left, right) = panels(2, width_ratios=[1, 1.3])
    names = [f"chunk {r['chunked_prefill_size']}" if r["chunked_prefill_size"] else "no chunking" for r in rows]
    colors = [BLUE if r["chunked_prefill_size"] else VERMILLION for r in rows]
    series = [(n, [r[k] or 0 for k in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms")]) for n, r in zip(names, rows)]
    grouped_panel(left, ["p50", "p99", "max"], series, colors, "Inter-token gaps during the prefill",
                  "milliseconds", 0)
    for name, r, color in zip(names, rows, colors):
        t, gap = zip(*r["timeline"]) if r["timeline"] else ((), ())
        right.plot(t, gap, "o", markersize=2.5, color=color, label=name, alpha=0.8)
        right.axvline(r["timeline_long_ttft_s"], color=color, linestyle="--", linewidth=1)
    right.axvline(0, color=CAPTION_GREY, linewidth=1)
    right.set_title("One repeat: each gap, at its end")
    right.set_xlabel("s (0: long prompt sent; dashed: its first token)")
    right.set_ylabel("gap, ms")
    handles = [Patch(color=c, label=n) for n, c in zip(names, colors)]
    heading(fig, f"Chapter 05: a {result['long_prompt_tokens']}-token prompt arrives while "
            f"{result['streams']} requests stream", handles)
    footer(
        fig, result,
        f"{result['model']}, {result['dtype']}; gaps of the running streams while the long "
        f"prompt is prefilled, {repeats(result['repeats'])}",
    )
    return fig


def chunked_fragment(result: dict, png: str) -> str:
    lead = (
        f"{measured(result)}; the chapter 05 server once per setting, server and client sharing the cores; "
        f"{result['model']}, {result['dtype']}, {result['streams']} streamed requests decoding when a "
        f"{result['long_prompt_tokens']}-token prompt arrives, {repeats(result['repeats'])}: `{result['command']}`."
    )
    header = ["--chunked-prefill-size", "gaps", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "ITL before p50 ms",
              "long prompt TTFT s"]
    shown = lambda value: "n/a" if value is None else value
    rows = [
        [
            r["chunked_prefill_size"] or "0 (off)", r["gaps"], shown(r["itl_p50_ms"]), shown(r["itl_p99_ms"]),
            shown(r["itl_max_ms"]), shown(r["itl_before_p50_ms"]), f"{r['long_ttft_s']:.2f}",
        ]
        for r in result["rows"]
    ]
    alt = "Inter-token gaps of running requests during a long prefill, with and without chunked prefill"
    return fragment(lead, header, rows, "rrrrrrr", png, alt) + "\n" + result["verdict"] + "\n"


# ---------------------------------------------------------------- chapter 04: tensor parallelism on this machine


def tp_pairs(rows: list[dict], dtype: str) -> list[tuple[dict, dict]]:
    """(TP 1 row, TP n row) per batch size: the table lists them one after the other."""
    mine = [r for r in rows if r["dtype"] == dtype]
    return list(zip(mine[::2], mine[1::2]))


def tp_figure(result: dict):
    tp, rows = result["tp"], result["rows"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = panels(len(dtypes), squeeze=False)
    width = 0.36
    for ax, dtype in zip(axes[0], dtypes):
        pairs = tp_pairs(rows, dtype)
        x = range(len(pairs))
        one = [a["step_ms"] for a, _ in pairs]
        many = [b["step_ms"] for _, b in pairs]
        comm = [min(b["collective_ms"], b["step_ms"]) for _, b in pairs]  # count x latency, within the step
        left = ax.bar([i - width / 2 for i in x], one, width, color=BLUE)
        ax.bar_label(left, labels=[f"{v:.1f}" for v in one], padding=2, fontsize=10)
        ax.bar([i + width / 2 for i in x], comm, width, color=VERMILLION)
        right = ax.bar([i + width / 2 for i in x], [m - c for m, c in zip(many, comm)], width, bottom=comm, color=GREEN)
        labels = [f"{b['step_ms']:.1f}\n{b['collective_share']}% collectives" for _, b in pairs]
        ax.bar_label(right, labels=labels, padding=2, fontsize=9.5)
        waited = [b["in_collectives_ms"] for _, b in pairs]  # measured inside the step, waits included
        ax.hlines(waited, [i + 0.02 for i in x], [i + width - 0.02 for i in x], colors="black", linestyles="--")
        ticks = [f"batch {a['batch']}\nTP {tp}: {b['speed_vs_tp1']:.2f}x speed" for a, b in pairs]
        ax.set_xticks(x, ticks)
        ax.tick_params(axis="x", length=0)
        ax.set_xlim(-0.7, len(pairs) - 0.3)  # one batch size or several: bars of the same width
        ax.set_ylim(0, max(one + many) * 1.3)
        ax.set_title(f"{dtype}: median decode step")
        ax.set_ylabel("ms per decode step")
    count = sum(result["collectives"].values())
    handles = [
        Patch(color=BLUE, label=f"TP 1 ({result['threads']['1']} threads)"),
        Patch(color=GREEN, label=f"TP {tp}: rest of the step"),
        Patch(color=VERMILLION, label=f"TP {tp}: {count} collectives, count × latency"),
        Line2D([], [], color="black", linestyle="--", label=f"TP {tp} rank 0: time inside them, waits included"),
    ]
    heading(fig, f"Chapter 04: a decode step at TP 1 and TP {tp} on {result['cores']} CPU cores", handles, ncols=2)
    footer(
        fig, result,
        f"{result['model']}, {result['prompt_len']}-token prompts, median of {result['steps']} "
        f"steps; TP {tp}: {tp} processes × {result['threads'][str(tp)]} thread, gloo",
    )
    return fig


def tp_fragment(result: dict, png: str) -> str:
    tp, threads = result["tp"], result["threads"]
    lead = (
        f"{measured(result)}; {result['model']}, TP 1 with {threads['1']} threads against TP {tp} as {tp} processes "
        f"of {threads[str(tp)]} thread (gloo on one machine), {result['prompt_len']}-token prompts, greedy, median "
        f"of {result['steps']} decode steps: `{result['command']}`."
    )
    header = [
        "dtype", "batch", "TP 1 step ms", f"TP {tp} step ms", f"TP {tp} speed", "collectives per step",
        "all-reduce µs", "count × latency ms", f"share of TP {tp} step",
    ]
    rows = [
        [
            a["dtype"], a["batch"], f"{a['step_ms']:.1f}", f"{b['step_ms']:.1f}", f"{b['speed_vs_tp1']:.2f}x",
            b["collectives_per_step"], b["all_reduce_us"], f"{b['collective_ms']:.1f}", f"{b['collective_share']}%",
        ]
        for dtype in dict.fromkeys(r["dtype"] for r in result["rows"])
        for a, b in tp_pairs(result["rows"], dtype)
    ]
    alt = f"Bar chart of the table: median decode step at TP 1 and TP {tp}, with the collectives' share of TP {tp}"
    paper = [
        [
            p["link"], p["dtype"], p["batch"], f"{p['latency_us'][0]}-{p['latency_us'][1]}", p["bandwidth_gb_s"],
            f"{p['total_ms'][0]:.2f}-{p['total_ms'][1]:.2f}", f"{p['here_ms']:.1f}",
        ]
        for p in result["paper"]
    ]
    here = f"here ms (gloo, {result['cores']} cores)"
    paper_header = ["link", "dtype", "batch", "latency µs each", "GB/s", "collectives per step ms", here]
    return "\n".join([
        fragment(lead, header, rows, "lrrrrrrrr", png, alt),
        f"On paper, the same TP {tp} step's collectives elsewhere: count × latency + bytes each GPU sends / "
        "bandwidth (compute not included; latencies approximate). Sources: "
        + "; ".join(f"{link['link']}: {link['source']}" for link in result["links"]) + ".",
        "",
        *markdown_table(paper_header, paper, "llrrrrr"),
        "",
    ])


# ---------------------------------------------------------------- chapter 06: the complete server against its peers

PEERS = ("minisgl", "llama-cpp-python", "transformers")


def concurrency_of(row: dict) -> int:
    return int(row["mode"].split()[-1])


def peer_row(rows: list[dict], engine: str, concurrency: int | None = None) -> dict | None:
    wanted = [r for r in rows if r["engine"] == engine and concurrency in (None, concurrency_of(r))]
    return wanted[0] if wanted else None


def peers_figure(result: dict):
    """Throughput and TTFT p99 per concurrency, one bar per engine (transformers: its static batch, at 32)."""
    rows = result["rows"]
    levels = sorted({concurrency_of(r) for r in rows if r["engine"] != "transformers"})
    colors = {"minisgl": BLUE, "llama-cpp-python": GREEN, "transformers": ORANGE}
    fig, axes = panels(2)
    for ax, (key, name, ylabel, log) in zip(axes, [("output_tok_s", "Throughput (tok/s)", "output tokens / s", False),
                                                   ("ttft_p99_s", "TTFT p99 (s, log scale)", "seconds", True)]):
        width = 0.8 / len(PEERS)
        for k, engine in enumerate(PEERS):
            xs, values = [], []
            for i, level in enumerate(levels):
                row = peer_row(rows, engine, level) if engine != "transformers" else (
                    peer_row(rows, engine) if level == max(levels) else None)
                if row is not None and row[key] is not None:
                    xs.append(i + (k - 1) * width)
                    values.append(row[key])
            bars = ax.bar(xs, values, width=width, color=colors[engine])
            ax.bar_label(bars, labels=[f"{v:.1f}" if v >= 10 else f"{v:.2f}" for v in values], padding=2, fontsize=8.5)
        ax.set_xticks(range(len(levels)), [f"c={level}" for level in levels])
        ax.tick_params(axis="x", length=0)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(r[key] for r in rows) * 1.2)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
    labels = {"minisgl": "minisgl (chapter 06)", "llama-cpp-python": "llama-cpp-python (Q4_1)",
              "transformers": "transformers (static batches)"}
    heading(fig, "Chapter 06: the complete server against its peers",
            [Patch(color=colors[e], label=labels[e]) for e in PEERS if peer_row(rows, e)])
    workload = result["workload"]
    footer(fig, result, f"{result['model']}, {result['dtype']}, {workload['requests']} streamed chat requests (c=1: "
           "the first 16)")
    return fig


def peers_fragment(result: dict, png: str) -> str:
    rows = result["rows"]
    lead = (
        f"{measured(result)}; the rows ran one after the other on the same workload, server (or transformers) "
        f"and client sharing the cores. minisgl `{result['server']}` at its defaults; llama-cpp-python's server "
        f"on the GGUF file the default model comes from: `{result['command']}`."
    )
    header = ["engine", "mode", "requests", "output tok/s", "vs llama-cpp-python", "TTFT p50 s", "TTFT p99 s",
              "ITL p50 ms"]
    table_rows = []
    for r in rows:
        peer = peer_row(rows, "llama-cpp-python", concurrency_of(r)) if r["engine"] != "transformers" else None
        table_rows.append([
            r["engine"], r["mode"], r["requests"], f"{r['output_tok_s']:.1f}",
            versus(r, peer) if peer else "",
            f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}", r["itl_p50_ms"],
        ])
    alt = "Bar charts: output tokens per second and TTFT p99 of minisgl, llama-cpp-python and transformers"
    text = fragment(lead, header, table_rows, "llrrrrrr", png, alt)
    return text + "\n".join(peer_targets(rows)) + "\n"


def peer_targets(rows: list[dict]) -> list[str]:
    """The course's targets for the complete server, each with what this run measured."""
    ours, theirs, hf = (lambda c: peer_row(rows, "minisgl", c)), (lambda c: peer_row(rows, "llama-cpp-python", c)), \
        peer_row(rows, "transformers")
    checks = []
    if ours(32) and theirs(32):
        ratio = ours(32)["output_tok_s"] / theirs(32)["output_tok_s"]
        checks.append(("at concurrency 32, at least 3x llama-cpp-python's output tok/s", f"{ratio:.2f}x", ratio >= 3))
        ttft = ours(32)["ttft_p99_s"] / theirs(32)["ttft_p99_s"]
        checks.append(("at concurrency 32, TTFT p99 under a tenth of llama-cpp-python's", f"{ttft:.3f} of it",
                       ttft < 0.1))
    if ours(32) and hf:
        ratio = ours(32)["output_tok_s"] / hf["output_tok_s"]
        checks.append(("at concurrency 32, at least 2x transformers' static batching", f"{ratio:.2f}x", ratio >= 2))
    if ours(1) and theirs(1):
        ratio = ours(1)["output_tok_s"] / theirs(1)["output_tok_s"]
        checks.append(("at concurrency 1, at least 0.5x llama-cpp-python", f"{ratio:.2f}x", ratio >= 0.5))
    return ["", *markdown_table(["target", "measured", ""], [[t, m, verdict_words(ok)] for t, m, ok in checks], "lrl")]


def chapters_tick(result: dict, row: dict) -> str:
    return f"ch. {chapter_of(row)}"  # five bars a panel: a short label


def chapters_figure(result: dict):
    title = f"The course's progress: every chapter's server, {clients(result)} clients"
    return serve_figure(result, title, [THROUGHPUT, TTFT_P50, ITL_P50], chapters_tick)


def chapters_fragment(result: dict, png: str) -> str:
    rows = result["rows"]
    lead = (
        f"{one_after_the_other(result)}, each chapter's server at its own defaults with `{result['server']}`: "
        f"`{result['command']}`."
    )
    base = rows[0]
    header = ["server", "KV cache", "output tok/s", f"vs chapter {chapter_of(base)}", "TTFT p50 s", "TTFT p99 s",
              "ITL p50 ms"]
    table_rows = [
        [
            f"chapter {chapter_of(r)}", r.get("kv_cache") or "n/a", f"{r['output_tok_s']:.1f}", versus(r, base),
            f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}", r["itl_p50_ms"],
        ]
        for r in rows
    ]
    alt = "Bar charts of the table: output tokens per second, median time to first token and inter-token latency"
    return fragment(lead, header, table_rows, "llrrrrr", png, alt)


def overlap_tick(result: dict, row: dict) -> str:
    return f"{row['engine'].split('(')[-1].rstrip(')')}\n{row['mode'].replace('concurrency ', 'c=')}"


def overlap_figure(result: dict):
    return serve_figure(result, "Overlap scheduling on this CPU: off against on", [THROUGHPUT, ITL_P50],
                        overlap_tick, legend=lambda result, engine: engine)


def overlap_fragment(result: dict, png: str) -> str:
    rows = result["rows"]
    lead = f"{one_after_the_other(result)}: `{result['command']}`."
    header = ["server", "mode", "requests", "output tok/s", "on vs off", "TTFT p50 s", "ITL p50 ms", "CPU s"]
    table_rows = []
    for r in rows:
        off = next(o for o in rows if o["mode"] == r["mode"] and "off" in o["engine"])
        table_rows.append([r["engine"], r["mode"], r["requests"], f"{r['output_tok_s']:.1f}",
                           versus(r, off) if r is not off else "", f"{r['ttft_p50_s']:.2f}", r["itl_p50_ms"],
                           r["cpu_s"]])
    alt = "Bar charts: output tokens per second and inter-token latency, overlap off and on, 1 and 32 clients"
    return fragment(lead, header, table_rows, "llrrrrrr", png, alt)


def routing_figure(result: dict):
    """Prefix hit rate and TTFT p50 per configuration: one server, then two replicas behind the gateway."""
    rows = result["rows"]
    fig, axes = panels(2)
    ticks = [r["configuration"].replace(", ", ",\n") for r in rows]
    colors = [GREEN if "cache_aware" in r["configuration"] else ORANGE if "round_robin" in r["configuration"] else BLUE
              for r in rows]
    bar_panel(axes[0], ticks, [r["prefix_hit"] for r in rows], colors, "Prefix hit rate (%)", "% of prompt tokens", 1)
    bar_panel(axes[1], ticks, [r["ttft_p50_s"] for r in rows], colors, "TTFT p50 (s)", "seconds", 2)
    heading(fig, "Replicas behind SGLang's Model Gateway: which worker holds a tenant's prefix?")
    workload = result["workload"]
    footer(fig, result, f"{result['model']}, {workload['tenants']} tenants x {workload['users']} users, system prompts "
           f"of about {workload['system_tokens']} tokens, {workload['concurrency']} clients")
    return fig


def routing_fragment(result: dict, png: str) -> str:
    rows = result["rows"]
    lead = f"{one_after_the_other(result)}, each configuration with fresh servers: `{result['command']}`."
    header = ["configuration", "threads each", "prefix hit %", "TTFT p50 s", "TTFT p99 s", "output tok/s",
              "prompt tokens per worker"]
    table_rows = [[r["configuration"], r["threads_per_server"], f"{r['prefix_hit']:.1f}", f"{r['ttft_p50_s']:.2f}",
                   f"{r['ttft_p99_s']:.2f}", f"{r['output_tok_s']:.1f}", r["prompt_tokens_per_worker"]] for r in rows]
    alt = "Bar charts: prefix hit rate and median time to first token, one server and two replicas per policy"
    return fragment(lead, header, table_rows, "lrrrrrl", png, alt)


# The results that chapter pages show: result name -> (PNG, figure, fragment).
# ---------------------------------------------------------------- chapter 06: one request, decode only


def single_stream_fragment(result: dict) -> str:
    """A table without a plot: three numbers need no chart."""
    lead = (
        f"{measured(result)}: one request, greedy, {result['new_tokens']} new tokens, decode tokens/s between "
        f"the first and the last streamed piece (prefill left out), the median of {result['repeats']} runs; "
        f"minisgl through HTTP, llama-cpp-python in-process. `{result['command']}` at commit {result['commit']}."
    )
    bandwidth = max(result["bandwidth_gb_s"].values())
    lead += (f" The floor: the weights a token reads over the memory bandwidth measured in the same run "
             f"({bandwidth:.1f} GB/s).")
    rows = [[r["engine"], f"{r['decode_tok_s']:.1f}", f"{r['vs_llama_cpp_python']:.2f}x", f"{r['ms_per_token']:.1f}",
             f"{r['weights_mb']:.0f}", f"{r['of_floor']:.0f}%"] for r in result["rows"]]
    header = ["engine", "decode tok/s", "vs llama-cpp-python", "ms per token", "weights read, MB", "of the floor"]
    return "\n".join([lead, "", *markdown_table(header, rows, "lrrrrr"), ""])


def int8_weights_fragment(result: dict) -> str:
    """A decode step's products per kernel and batch size, against the floor the bandwidth sets."""
    bandwidth = result["bandwidth_gb_s"]
    lead = (
        f"{measured(result)}; {result['threads']} threads. Memory bandwidth: copy {bandwidth['copy']:.1f} GB/s, "
        f"triad {bandwidth['triad']:.1f} GB/s. Each cell: one decode step's products (30 layers and the LM head, "
        f"every matrix distinct, so none is in cache), the median of {result.get('repeats', 5)} steps; the floor is "
        f"the weights' bytes over the bandwidth. `{result['command']}` at commit {result['commit']}."
    )
    kernels = list(dict.fromkeys(r["kernel"] for r in result["rows"]))
    by_rows = {}
    for r in result["rows"]:
        by_rows.setdefault(r["rows"], {})[r["kernel"]] = r
    header = ["rows", *(f"{k}, ms (% of floor)" for k in kernels)]
    rows = [[n, *(f"{cells[k]['step_ms']:.1f} ({cells[k]['of_floor_pct']}%)" for k in kernels)]
            for n, cells in by_rows.items()]
    return "\n".join([lead, "", *markdown_table(header, rows, "r" * len(header)), ""])


def int8_accuracy_fragment(result: dict) -> str:
    lead = (
        f"{measured(result)}. Perplexity over {result['scored_tokens']} tokens of this course's chapter pages "
        f"({result['windows']} windows of {result['window']}); greedy agreement: how many of "
        f"{result['new_tokens']} greedy tokens agree with the float32 run (transformers' output), over "
        f"{len(next(iter(result['agreeing'].values())))} chat and code prompts. `{result['command']}` at commit "
        f"{result['commit']}."
    )
    header = ["weights", "perplexity", "vs float32", "agreeing tokens, median", "fewest", "prompts agreeing to the end"]
    rows = [[r["weights"], f"{r['perplexity']:.2f}", f"{r['vs_float32']:.3f}x", r["agreeing_tokens_median"],
             r["agreeing_tokens_min"], r["prompts_all_agreeing"]] for r in result["rows"]]
    base = result["rows"][0]["perplexity"]
    by_kind = ("With the activations quantized (w8a8) in one kind of matrix only, every other product "
               "weight-only, the perplexity is: " + "; ".join(
                   f"{kind} {p:.2f} ({p / base:.3f}x)" for kind, p in result["w8a8_by_kind"].items()) + ".")
    parts = [lead, "", *markdown_table(header, rows, "lrrrrr"), "", by_kind, ""]
    errors = result.get("rounding_error_pct")
    if errors:
        ways = list(next(iter(errors.values())))
        parts += ["How far each way of rounding moves the float32 checkpoint's own weights (the norm of the "
                  "difference over the norm of the weights, the mean over the layers):", "",
                  *markdown_table(["matrix", *ways], [[kind, *(f"{errors[kind][w]:.3f}%" for w in ways)]
                                                      for kind in errors], "l" + "r" * len(ways)), ""]
    return "\n".join(parts)


def step_profile_fragment(result: dict) -> str:
    parts = ("matmuls", "attention", "other tensor ops", "Python in the model", "sampling", "scheduler")
    lead = (
        f"{measured(result)}. {result['new_tokens']} greedy decode steps of "
        f"{' and of '.join(map(str, result['requests']))} requests (more than one: prompts of 320 to 790 tokens) "
        f"through the offline API, prompts prefilled before the clock starts, under torch's "
        f"profiler, which makes every step slower: the unprofiled step is the first time column. Attention "
        f"*compiled*: `--enable-torch-compile`. `{result['command']}` at commit {result['commit']}."
    )
    header = ["requests", "weights", "attention", "step, ms", "profiled step, ms", *parts]
    rows = [[r["requests"], r["quantization"], r["attention"], f"{r['unprofiled_ms_per_step']:.1f}",
             f"{r['profiled_ms_per_step']:.1f}", *(f"{r[p + '_ms']:.1f}" for p in parts)] for r in result["rows"]]
    return "\n".join([lead, "", *markdown_table(header, rows, "l" + "r" * (len(header) - 1)), ""])


def decode_attention_table(rows: list[dict], digits: int) -> list[str]:
    """``benchmarks/decode_attention.py``'s table, for its result file and the book's fragment alike."""
    def cells(r: dict) -> list:
        eager, compiled = r["eager (gather + SDPA)"], r.get("compiled formula")
        return [r["requests"], f"{r['tokens']} ({r['longest']})", f"{r['gather alone']:.{digits}f}",
                f"{eager:.{digits}f}", "not used: one length, SDPA unmasked" if compiled is None
                else f"{compiled:.{digits}f}", "" if compiled is None else f"{eager / compiled:.2f}x"]
    header = ["requests", "cached tokens (longest)", "gather alone", "eager: gather + SDPA", "compiled formula",
              "eager / compiled"]
    return markdown_table(header, [cells(r) for r in rows], "r" * len(header))


def decode_attention_fragment(result: dict) -> str:
    """One layer's decode attention: eager (gather + SDPA) against the compiled formula, per batch."""
    lead = (
        f"{measured(result)}; {result['rows'][0]['threads']} threads. One layer of the default model (9 query heads "
        f"on 3 KV heads of 64, bfloat16, pages of 16), a batch of decodes whose cached lengths are drawn between "
        f"{result['shortest']} and {result['longest']} tokens; the median ms of {result['repeats']} rounds. "
        f"`{result['command']}` at commit {result['commit']}."
    )
    return "\n".join([lead, "", *decode_attention_table(result["rows"], digits=2), ""])


FIGURES = {
    "generate_single": ("ch01-single-decode.png", decode_figure, decode_fragment),
    "serve_workload": ("ch02-continuous-vs-static.png", continuous_figure, continuous_fragment),
    "serve_ch02_vs_ch03": ("ch03-process-split.png", split_figure, split_fragment),
    "tp_decode": ("ch04-tensor-parallel.png", tp_figure, tp_fragment),
    "serve_ch03_vs_ch05": ("ch05-vs-ch03.png", paged_figure, paged_fragment),
    "shared_prefix": ("ch05-shared-prefix.png", shared_prefix_figure, shared_prefix_fragment),
    "capacity": ("ch05-capacity.png", capacity_figure, capacity_fragment),
    "chunked_prefill": ("ch05-chunked-prefill.png", chunked_figure, chunked_fragment),
    "serve_ch06_peers": ("ch06-peers.png", peers_figure, peers_fragment),
    "serve_chapters_c32": ("ch06-chapters.png", chapters_figure, chapters_fragment),
    "serve_overlap_cpu": ("ch06-overlap-cpu.png", overlap_figure, overlap_fragment),
    "routing": ("ch06-routing.png", routing_figure, routing_fragment),
}
# Results a page shows as a table alone: name -> its fragment.
TABLES = {"single_stream": single_stream_fragment, "int8_weights": int8_weights_fragment,
          "int8_accuracy": int8_accuracy_fragment, "step_profile": step_profile_fragment,
          "decode_attention": decode_attention_fragment}


def render(result_path: Path) -> list[Path]:
    """The plot and fragment made from one JSON result, if a chapter page shows it; returns what it wrote."""
    result_path = Path(result_path).resolve()
    fragment_path = RESULTS / f"{result_path.stem}.book.md"
    if result_path.parent == RESULTS and result_path.stem in TABLES:
        fragment_path.write_text(TABLES[result_path.stem](json.loads(result_path.read_text())))
        print(f"written {fragment_path.relative_to(REPO_ROOT)}")
        return [fragment_path]
    if result_path.parent != RESULTS or result_path.stem not in FIGURES:
        print(f"{result_path.name}: no chapter page shows this result, so no plot")  # a trial run, say
        return []
    png, figure, make_fragment = FIGURES[result_path.stem]
    result = json.loads(result_path.read_text())
    written = [save(figure(result), png)]
    fragment_path.write_text(make_fragment(result, png))
    written.append(fragment_path)
    for path in written:
        print(f"written {path.relative_to(REPO_ROOT)}")
    return written


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    missing = []
    for name in [*FIGURES, *TABLES]:
        result = RESULTS / f"{name}.json"
        if result.exists():
            render(result)
        else:
            missing.append(name)
    if missing:
        raise SystemExit(f"no JSON result for {', '.join(missing)}: run its benchmark")


if __name__ == "__main__":
    main()
