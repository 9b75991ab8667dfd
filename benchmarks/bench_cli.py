"""How instant the CLI is: whole processes, medians of interleaved runs, against Python's own start-up.

Bars (issue 14):
  loratool --version            <= 5 x   `python -c pass`
  loratool inspect ADAPTER --json <= 0.3 x `python -c "import torch"`
and, for information, `--help`, `merge --help`, `inspect CHECKPOINT --json` and `inspect --check`.
Each round runs every command once, in turn, so that load from other users of the machine hits all
of them alike; medians over the rounds are reported. The console script next to this interpreter is
used when it is installed from this version (entry point `loratool.__main__:main`, as a user runs
it), else `python -m loratool`, which takes the same path.

Usage: python benchmarks/bench_cli.py [--repeat 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "fixtures" / "lora-llama"
CHECKPOINT = ROOT / "fixtures" / "tiny-llama"
BARS = {"--version": ("python -c pass", 5.0), "inspect ADAPTER --json": ('python -c "import torch"', 0.3)}


def loratool_argv() -> list[str]:
    script = Path(sys.executable).parent / "loratool"
    if script.is_file() and "loratool.__main__" in script.read_text(errors="replace"):
        return [str(script)]
    return [sys.executable, "-m", "loratool"]


def commands() -> dict[str, list[str]]:
    lt = loratool_argv()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "--version": [*lt, "--version"],
        "--help": [*lt, "--help"],
        "merge --help": [*lt, "merge", "--help"],
        "inspect ADAPTER --json": [*lt, "inspect", str(ADAPTER), "--json"],
        "inspect CHECKPOINT --json": [*lt, "inspect", str(CHECKPOINT), "--json"],
        "inspect CHECKPOINT --check": [*lt, "inspect", str(CHECKPOINT), "--check"],
    }


def run(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr.decode()[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=9, help="interleaved rounds (at least 5)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ, LORATOOL_NO_PROGRESS="1")
    table = commands()
    for argv in table.values():  # one untimed round: byte-compile, warm the page cache
        run(argv, env)
    walls: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(max(5, args.repeat)):
        for name, argv in table.items():
            walls[name].append(run(argv, env))
    medians = {name: statistics.median(values) for name, values in walls.items()}
    ratios = {name: medians[name] / medians[reference] for name, (reference, _) in BARS.items()}
    summary = {
        "command": " ".join(loratool_argv()),
        "rounds": max(5, args.repeat),
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "bars": {k: {"against": ref, "at_most": bar, "met": ratios[k] <= bar} for k, (ref, bar) in BARS.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['command']}: medians of {summary['rounds']} interleaved rounds")
    for name, seconds in medians.items():
        spread = f"{min(walls[name]):.3f}–{max(walls[name]):.3f}"
        print(f"  {name:<30}{seconds * 1000:>9.1f} ms   (range {spread} s)")
    for name, (reference, bar) in BARS.items():
        state = "met" if ratios[name] <= bar else "MISSED"
        print(f"{name} / {reference} = {ratios[name]:.3f}   (bar {bar}: {state})")


if __name__ == "__main__":
    main()
