"""``streamrec bench NAME``: run one benchmark script from ``benchmarks/``.

Each benchmark prints a table, then as its last line one JSON object
``{"bench", "value", "unit", "baseline", "ratio", ...}``. ``--quick`` finishes within a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def run(args, cfg) -> int:
    names = available()
    if args.name not in names:
        print(f"streamrec bench: unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'}",
              file=sys.stderr)
        return 2
    from trainer.service import runtime_env

    # run as a module from the project root, so `benchmarks/trainer.py` cannot shadow the `trainer` package
    module = "benchmarks." + args.name.replace("-", "_")
    cmd = [sys.executable, "-m", module, *(["--quick"] if args.quick else []), *args.extra]
    env = {**os.environ, **runtime_env()}
    return subprocess.call(cmd, env=env, cwd=BENCH_DIR.parent)


def add_cli(sub: argparse._SubParsersAction) -> None:
    names = available()
    p = sub.add_parser("bench", help="run a benchmark (" + ", ".join(names) + ")",
                       description="Run benchmarks/NAME.py: prints a table with the baseline measured in the same "
                                   "run, then one JSON line {bench, value, unit, baseline, ratio, ...}.")
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join(names))
    p.add_argument("--quick", action="store_true", help="small sizes; finishes within a minute")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for the benchmark script")
    p.set_defaults(func=run)
