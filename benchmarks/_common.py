"""Shared benchmark plumbing: argument parsing, machine description, the table, the closing JSON line.

Every benchmark prints a table (its own numbers and the baseline measured in the same run), then as its
last line one JSON object: {"bench", "value", "unit", "baseline", "ratio", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from contextlib import contextmanager


def parser(description: str) -> argparse.ArgumentParser:
    """The benchmark's argument parser, named as users call it (``streamrec bench quality``, not ``quality.py``)."""
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0].replace("_", "-")
    p = argparse.ArgumentParser(prog=f"streamrec bench {name}", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes; finishes within a minute")
    return p


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    malloc = ",".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "default"
    omp = os.environ.get("OMP_WAIT_POLICY", "default")
    return (f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, malloc: {malloc}, "
            f"OMP_WAIT_POLICY: {omp}")


def sparse_step(opt) -> None:
    """``opt.step()`` without the warning torch's Adagrad raises on every sparse update (it builds the update
    tensor without invariant checks, on purpose) that would otherwise top every benchmark table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        opt.step()


@contextmanager
def timer():
    """Wall seconds ``s``, this process's CPU seconds ``cpu_s`` and the cores it got meanwhile, ``cores``
    (CPU / wall, as text): on shared cores a rate is only comparable with the cores it ran on."""
    box = {}
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0
        box["cpu_s"] = time.process_time() - c0
        box["cores"] = f"{box['cpu_s'] / max(box['s'], 1e-9):.2f}"


def report(bench: str, rows: list[tuple[str, ...]], header: tuple[str, ...], *, value: float, unit: str,
           baseline: float, **extra) -> None:
    """Print the table, the machine line and the closing JSON line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print(f"machine: {machine()}")
    ratio = value / baseline if baseline else None  # no ratio to a baseline of 0 (JSON has no NaN)
    print(json.dumps({"bench": bench, "value": round(value, 3), "unit": unit, "baseline": round(baseline, 3),
                      "ratio": None if ratio is None else round(ratio, 3), **extra}))
