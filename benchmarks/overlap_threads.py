"""Why overlap scheduling loses on a 2-core CPU: one request decoded through the offline API, overlap off and on,
under OpenMP's default wait policy and its passive one.

Each setting runs in a fresh process (the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, at start): the default
model in bfloat16, a warm-up, then ``--runs`` times one greedy request of ``--tokens`` tokens (``ignore_eos``).
For each run it reports the time per token and how many cores the process kept busy (its CPU time over the wall
time). Without overlap torch's OpenMP workers spin between the forward pass's parallel regions and both cores
stay busy; the question this answers is what a second Python thread (the forward thread) does to that.

    python benchmarks/overlap_threads.py [--tokens 150] [--runs 3]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchkit import record

TITLE = "Overlap scheduling on a 2-core CPU: one request through the offline API, OpenMP wait policies"
SETTINGS = [("off", "default"), ("on", "default"), ("off", "passive"), ("on", "passive")]


def measure(overlap: str, tokens: int, runs: int) -> list[dict]:
    """In this process: the offline API, overlap as asked; ms per token and cores kept busy, per run."""
    from minisgl import LLM, SamplingParams

    flag = "enable_overlap_schedule" if overlap == "on" else "disable_overlap_schedule"
    llm = LLM(dtype="bfloat16", max_running_requests=4, context_length=1024, **{flag: True})
    llm.generate(["A warm-up."], SamplingParams(max_tokens=16))
    results = []
    for _ in range(runs):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        llm.generate(["Write a long story about a dragon."], SamplingParams(max_tokens=tokens, ignore_eos=True))
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        results.append({"ms_per_token": 1000 * wall / tokens, "cores_busy": cpu / wall})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=150, help="tokens of the one request, each run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each setting")
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)  # overlap off/on: measure, print JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.tokens, args.runs)))
        return

    from minisgl.default_model import require_default_model

    start = record.start_run("minisgl")
    rows = []
    for overlap, policy in SETTINGS:
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        command = [sys.executable, __file__, "--child", overlap, "--tokens", str(args.tokens), "--runs", str(args.runs)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        runs = json.loads(output.strip().splitlines()[-1])
        rows.append({
            "overlap": overlap, "omp_wait_policy": policy,
            "ms_per_token": round(statistics.median(r["ms_per_token"] for r in runs), 1),
            "ms_per_token_runs": [round(r["ms_per_token"], 1) for r in runs],
            "cores_busy": round(statistics.median(r["cores_busy"] for r in runs), 2),
        })
        print(rows[-1], flush=True)
    run = record.run_info("overlap_threads", TITLE, start, require_default_model(), ("torch",))
    result = {**run, "tokens": args.tokens, "runs": args.runs, "rows": rows}
    header = ["overlap", "OMP_WAIT_POLICY", "ms per token (median)", "each run", "cores kept busy"]
    table = [[r["overlap"], r["omp_wait_policy"], r["ms_per_token"], ", ".join(map(str, r["ms_per_token_runs"])),
              r["cores_busy"]] for r in rows]
    lines = [
        *record.opening_lines(run),
        f"- {record.versions_text(run['versions'])}; minisgl commit {run['commit']} (at the start)",
        f"- model: {run['model']}, bfloat16, the offline API; one greedy request of {args.tokens} tokens, "
        f"{args.runs} runs per setting, each setting in a fresh process",
        f"- command: `{run['command']}`",
        "",
        *record.markdown_table(header, table, "llrrr"),
        "",
        "cores kept busy: the process's CPU time (user + system) over the run's wall time; 2 is both cores.",
    ]
    record.write_result(record.RESULTS / "overlap_threads.md", "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    main()
