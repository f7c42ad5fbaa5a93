"""``streamrec bench soak``: a fresh durable stack under a steady live stream for a long time; resident memory
of every process, lag of every stage, disk use and fetch latency over time (deploy/soak.py).

    streamrec bench soak --quick          45 s of stream at 500 impressions/s (about a minute in all)
    streamrec bench soak                  30 minutes
    streamrec bench soak --minutes 120    any length

Per process: RSS after warm-up (the first third of the run) and at the end, and its least-squares slope after
warm-up in MB per 10 minutes and relative to the post-warm-up RSS. Per stage: the largest and the final lag
(messages produced but not yet consumed, from the components' counters). ``value`` is the largest
post-warm-up RSS slope over the stack's processes in MB per 10 min (goal: no upward trend, 0), with
``max_lag`` and the per-process figures.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from pathlib import Path

from benchmarks._common import parser, report
from deploy.soak import run_soak, summary
from config import load_config


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None, help="minutes of stream (default 30, quick 0.75)")
    p.add_argument("--rate", type=float, default=500.0, help="impressions per second (default 500)")
    p.add_argument("--tick-s", type=float, default=1.0,
                   help="the stream sends what is due every this many seconds (default 1): each send makes one "
                        "batch per partition, and the embedded broker keeps one object per batch")
    p.add_argument("--sample-s", type=float, default=None, help="seconds between samples (default 5, quick 2)")
    p.add_argument("--data-dir", default=None, help="keep the stack's data here (default: a temporary directory)")
    a = p.parse_args()
    minutes = a.minutes or (0.75 if a.quick else 30.0)
    sample_s = a.sample_s or (2.0 if a.quick else 5.0)
    if minutes <= 0 or a.rate <= 0 or sample_s <= 0 or a.tick_s <= 0:
        p.error("--minutes, --rate, --tick-s and --sample-s must be positive")
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="streamrec-soak-") as tmp:
        d = Path(a.data_dir).resolve() if a.data_dir else Path(tmp)
        res = run_soak(load_config(), d, minutes=minutes, rate=a.rate, sample_s=sample_s, tick_s=a.tick_s,
                       progress=lambda m: print(m, file=sys.stderr))
    s = summary(res)
    tot = res.totals
    print(f"soak: {minutes:g} min at {a.rate:,.0f} impressions/s, as last reported: {tot['impressions']:,.0f} impressions "
          f"({tot['events']:,.0f} events) produced, {tot['examples_out']:,.0f} examples labelled, "
          f"{tot['trained']:,.0f} trained, {tot['stored_rows']:,.0f} prediction rows stored; {len(res.t_s)} samples "
          f"every {sample_s:g} s, warm-up = the first {res.t_s[res.warm()]:.0f} s (the first third, and 15 s of "
          "training); restarts: "
          + (", ".join(f"{k} {v}" for k, v in res.restarts.items() if v) or "none"))
    print()
    lag_rows = [(stage, f"{v['max']:,.0f}", f"{v['p50_after_warmup']:,.0f}", f"{v['final']:,.0f}",
                 "no" if v["behind_since_s"] is None else f"from {v['behind_since_s'] / 60:.1f} min to the end")
                for stage, v in s["stages"].items()]
    _table(("stage lag (messages)", "max", "median after warm-up", "final", "a minute of input behind"), lag_rows)
    stalled = [(v["behind_since_s"], k) for k, v in s["stages"].items() if v["behind_since_s"] is not None]
    if stalled:
        t, k = min(stalled)
        print(f"NOT KEEPING UP: {k} fell more than a minute of input behind at {t / 60:.1f} min and never caught up; "
              "memory figures after that are those of a stack that is mostly waiting")
    print()
    disk, lat = s["disk"], s["latency"]
    disk_rows = [(name, _mb(v["warm"]), _mb(v["end"]), _mb(v["per_10min"]))
                 for name, v in disk.items() if name != "objects"]
    obj = disk["objects"]
    disk_rows.append(("storage objects (batches)", f"{obj['warm']:,.0f}", f"{obj['end']:,.0f}",
                      f"{obj['per_10min']:,.0f}"))
    _table(("disk (MB)", "after warm-up", "end", "growth per 10 min"), disk_rows)
    d0, d1 = lat["delivery_p50_ms"]
    t0, t1 = lat["trainer_p50_ms"]
    if math.isnan(d1):
        grows = "grows: no service_stats message arrived in the last tenth of the run"
    else:
        grows = "grows" if d1 > 1.5 * d0 + 20 else "does not grow"
    print(f"\nfetch latency {grows} (service_stats delivery p50: {d0:.0f} ms just after warm-up, {d1:.0f} ms at the "
          f"end, slope {lat['delivery_slope_ms_per_10min']:+.0f} ms per 10 min; the trainer's labelled-to-trained p50 "
          f"{t0:.0f} ms -> {t1:.0f} ms). Tansu 0.6 keeps every batch object (no retention) and lists a partition's "
          "objects on each fetch.\n")
    procs = s["processes"]
    rows = []
    for name, v in procs.items():
        rows.append((name, f"{v['rss_warm_mb']:,.0f}", f"{v['rss_end_mb']:,.0f}", f"{v['rss_peak_mb']:,.0f}",
                     f"{v['slope_mb_per_10min']:+.1f}", f"{v['slope_pct_per_10min']:+.1f}%", f"{v['cpu_cores']:.2f}"))
    stack_slopes = [v["slope_mb_per_10min"] for k, v in procs.items() if not k.startswith("(")]
    max_lag = max((v["max"] for v in s["stages"].values() if not math.isnan(v["max"])), default=float("nan"))
    if res.t_s[-1] - res.t_s[res.warm()] < 300:
        print("(under 5 minutes after warm-up: the slopes below extrapolate seconds to 10 minutes; a trend needs a "
              "longer run)")
    report("soak", rows, ("process (RSS MB, children summed)", "after warm-up", "end", "peak", "slope MB/10 min",
                          "relative", "CPU cores"),
           value=max(stack_slopes), unit="MB per 10 min (largest post-warm-up RSS slope of the stack's processes)",
           baseline=0, minutes=minutes, rate=a.rate, max_lag=_num(max_lag),
           lag={k: {"max": _num(v["max"]), "final": _num(v["final"]), "behind_since_s": v["behind_since_s"] and round(v["behind_since_s"])}
                for k, v in s["stages"].items()},
           processes={k: {x: v[x] for x in ("rss_warm_mb", "rss_end_mb", "slope_mb_per_10min", "slope_pct_per_10min")}
                      for k, v in procs.items()},
           storage_mb_per_10min=round(disk["storage"]["per_10min"] / 2**20, 2),
           storage_objects_per_10min=round(obj["per_10min"]), delivery_p50_ms=[_num(d0), _num(d1)])
    return 0


def _num(x: float) -> float | None:
    """JSON has no NaN: None where a figure could not be measured."""
    return None if x is None or math.isnan(x) else round(x)


def _table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    sys.exit(main())
