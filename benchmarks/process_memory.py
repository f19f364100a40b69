"""Resident memory of each process of a running server, and which of them map libtorch.

Starts ``python -m minisgl`` from the folder that holds a given ``minisgl/`` (the top level, a frozen
chapter, or any checkout), waits until it serves, answers one request so that every process has done
real work, then reads ``VmRSS`` and the mapped libraries of every process of the tree from /proc
(Linux), and stops the server.

    python benchmarks/process_memory.py                      # the top-level package
    python benchmarks/process_memory.py --root /tmp/old-checkout --label before --output /tmp/before.md
"""

import argparse
import json
import sys
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "kit"))  # the shared test kit: its server-process helper
from server_process import ServerProcess, descendants  # noqa: E402


def describe(pid: int) -> tuple[str, int, bool]:
    """(process name, resident MiB, whether it maps libtorch)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    name = "multiprocessing's resource tracker" if "resource_tracker" in " ".join(cmdline) else cmdline[0]
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    maps_torch = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return name, rss_kb // 1024, maps_torch


def measure(root: Path, server_args: list[str]) -> list[tuple[str, int, bool]]:
    with ServerProcess(root, *server_args, ready_timeout=600) as server:
        body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}).encode()
        headers = {"content-type": "application/json"}
        request = urllib.request.Request(server.url + "/v1/chat/completions", body, headers)
        urllib.request.urlopen(request, timeout=300).read()  # every process has done real work
        api_server = ("API server",) + describe(server.pid)[1:]
        return [api_server] + [describe(pid) for pid in descendants(server.pid)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the folder that holds minisgl/")
    parser.add_argument("--label", default="top level")
    parser.add_argument("--output", type=Path, help="also write the table here (markdown)")
    parser.add_argument("server_args", nargs="*", default=["--dtype", "bfloat16"], help="passed to the server")
    args = parser.parse_args()
    rows = measure(args.root.resolve(), args.server_args)
    lines = [f"| process ({args.label}) | resident MiB | maps libtorch |", "|---|---:|---|"]
    lines += [f"| {name} | {rss} | {'yes' if torch else 'no'} |" for name, rss, torch in rows]
    lines.append(f"| all processes | {sum(rss for _, rss, _ in rows)} | |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.write_text(table)


if __name__ == "__main__":
    main()
