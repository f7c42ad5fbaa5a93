"""Join state at production volume (``streamrec bench joinstate [--quick]``): memory of one partition's join.

A simulated day (event time compressed: as fast as the join takes it) of ``--impressions`` impressions
(default 50M; ``--quick`` 1.5M) spread evenly over ``--hours`` of event time (default 26: a day of window, then
two hours in which windows close, compacted blocks leave and are purged), with clicks (2% of impressions,
delays up to the 15 min click window) and conversions (0.3%, 1 in 10 of them view-through; delays up to the
24 h conversion window, mean 3 h), fed in batches of 20,000 raw messages (plus watermarks) through
``join.step`` of one JoinState: no broker, no Bytewax; a snapshot (what Bytewax recovery takes every epoch)
every 50 batches.

Rows: over event time, resident memory of this process (/proc/self/status VmRSS), the join state's own
estimate of its bytes in memory (``JoinState.memory_bytes``), the cold tier's bytes on disk, impressions in
the window and per impression in window. The baseline: today's all-in-memory state (no cold tier), run in a
child process on a prefix of the same stream (``--baseline-impressions``, default 2M; quick 200k) in which no
window closes; its bytes per impression in window (state estimate, and RSS growth / impressions) times the
impressions in the window at this run's peak, plus the child's RSS before the stream, is its extrapolated peak
RSS (the state grows linearly with the window's impressions: one entry per impression, same sizes).

Last line: value = peak RSS (GB) with the cold tier (goal: flat, <= 2 GB), baseline = the extrapolated peak
RSS of the all-in-memory state; ``bytes_per_impression`` (state in memory / impressions in window at the
end), ``disk_bytes_per_impression``, ``events_per_s`` (join step only).
"""

from __future__ import annotations

import heapq
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import parser, report
from streams import schema
from streams.flows import join

T0 = 1_760_000_000_000
HOUR = 3_600_000
TOPICS = ("impressions", "clicks", "conversions")
BATCH = 20_000
SNAPSHOT_EVERY = 50
CLICK_RATE, CONV_RATE, VIEW_THROUGH = 0.02, 0.003, 0.1
_IMP = (b'{"type":"impression","event_id":"imp-%010d","ts":%d,"user_id":%d,"ad_id":%d,"campaign_id":%d,'
        b'"advertiser_id":%d,"domain":"%b","position":%d,"device":"%b","country":"us","cat":[%d,%d,%d,%d],'
        b'"dense":%b,"history":%b,"arm":"","model_version":0}')
_CLK = b'{"type":"click","event_id":"clk-%010d","impression_id":"imp-%010d","ts":%d,"user_id":%d}'
_CNV = b'{"type":"conversion","event_id":"cnv-%010d","impression_id":"imp-%010d","ts":%d,"user_id":%d}'
_DOMAINS, _DEVICES = (b"feed", b"stories", b"video", b"search"), (b"ios", b"android", b"web")


def config(store_dir: str | None) -> join.JoinConfig:
    """The defaults of labels (click window 15 min, conversion window 24 h, window policy)."""
    return join.JoinConfig(TOPICS, 15 * 60_000, 24 * HOUR, future_tolerance_ms=None, store_dir=store_dir)


def stream(n: int, hours: float, seed: int = 0):
    """Batches of raw messages (impressions, their feedback at its time, watermarks) and the batch's time."""
    rng = random.Random(seed)
    dense = [b"[" + b",".join(b"%.4f" % rng.random() for _ in range(8)) + b"]" for _ in range(997)]
    hist = [b"[" + b",".join(b"%d" % rng.randrange(200_000) for _ in range(8)) + b"]" for _ in range(991)]
    step_ms = hours * HOUR / n
    fb: list[tuple[int, int, bytes]] = []  # (arrival ts, seq, raw) of feedback not yet due
    msgs, off, seq = [], 0, 0
    for k in range(n):
        ts = T0 + int(k * step_ms)
        while fb and fb[0][0] <= ts:
            at, _, raw = heapq.heappop(fb)
            msgs.append((TOPICS[1] if raw[10] == 108 else TOPICS[2], 0, off, raw))  # b'{"type":"cl' or "co"
            off += 1
        u = rng.randrange(1_000_000)
        ad = rng.randrange(50_000)
        msgs.append((TOPICS[0], 0, off, _IMP % (k, ts, u, ad, ad // 10, ad // 100, _DOMAINS[k & 3], k % 7,
                                                 _DEVICES[u % 3], u % 101, ad % 997, k % 13, u % 31,
                                                 dense[k % 997], hist[u % 991])))
        off += 1
        r = rng.random()
        if r < CLICK_RATE:
            d = min(int(rng.expovariate(1 / 60_000)), 15 * 60_000)
            seq += 1
            heapq.heappush(fb, (ts + d, seq, _CLK % (k, k, ts + d, u)))
            if rng.random() < CONV_RATE * (1 - VIEW_THROUGH) / CLICK_RATE:
                d = min(int(rng.expovariate(1 / (3 * HOUR))), 24 * HOUR)
                seq += 1
                heapq.heappush(fb, (ts + d, seq, _CNV % (k, k, ts + d, u)))
        elif r < CLICK_RATE + CONV_RATE * VIEW_THROUGH:  # view-through: no click
            d = min(int(rng.expovariate(1 / (3 * HOUR))), 24 * HOUR)
            seq += 1
            heapq.heappush(fb, (ts + d, seq, _CNV % (k, k, ts + d, u)))
        if len(msgs) >= BATCH or k == n - 1:
            wm = schema.encode(schema.Watermark(ts=ts))
            msgs += [(t, 0, off, wm) for t in TOPICS]
            yield tuple(msgs), ts
            msgs = []


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run(n: int, hours: float, store_dir: str | None, samples: int = 12, quiet: bool = False) -> dict:
    """Feed the stream through one JoinState; rows over time and the peaks."""
    cfg = config(store_dir)
    state, rss0, rows, t_join, events = join.JoinState(cfg), rss(), [], 0.0, 0
    per_ms = n / (hours * HOUR)
    every = max(1, n // BATCH // samples)
    peak_rss, batches, t0 = rss0, 0, time.perf_counter()
    last = None
    for msgs, ts in stream(n, hours):
        c = time.perf_counter()
        state, _ = join.step(state, join.SourceBatch(0, msgs, frozenset()), now_ms=ts)
        t_join += time.perf_counter() - c
        events += len(msgs) - 3
        batches += 1
        if batches % SNAPSHOT_EVERY == 0:
            c = time.perf_counter()
            state.snapshot()
            t_join += time.perf_counter() - c
        if batches % every == 0 or ts >= T0 + hours * HOUR - HOUR * hours / n * BATCH:
            r = rss()
            peak_rss = max(peak_rss, r)
            in_window = min(int((ts - T0) * per_ms) + 1, int(24 * HOUR * per_ms))
            mem, disk, cold = state.gauges()
            last = dict(hours=(ts - T0) / HOUR, rss=r, mem=mem, disk=disk, cold=cold, in_window=in_window,
                        hot=len(state.pending), eps=events / max(t_join, 1e-9))
            rows.append(last)
            if not quiet:
                print(f"  {last['hours']:5.1f} h  RSS {r / 1e9:6.3f} GB  state {mem / 2**20:8.1f} MiB  disk "
                      f"{disk / 2**20:8.1f} MiB  in window {in_window:>11,}  ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    return dict(rows=rows, rss0=rss0, peak_rss=peak_rss, events=events, join_s=t_join,
                wall_s=time.perf_counter() - t0, last=last)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--impressions", type=int, default=None, help="impressions of the run (default 50M, quick 1.5M)")
    p.add_argument("--hours", type=float, default=26.0, help="event time they span (default 26)")
    p.add_argument("--baseline-impressions", type=int, default=None,
                   help="prefix for the all-in-memory baseline (default 2M, quick 200k)")
    p.add_argument("--baseline-child", type=int, default=None, help=argparse_suppress())
    a = p.parse_args()
    n = a.impressions or (1_500_000 if a.quick else 50_000_000)
    if a.baseline_child is not None:  # the child: the prefix of the same stream (same rate) without a cold tier
        total = a.impressions or n
        frac = a.baseline_child / total
        r = run(a.baseline_child, a.hours * frac, None, samples=2, quiet=True)
        last = r["last"]
        print(json.dumps({"rss0": r["rss0"], "rss": last["rss"], "mem": last["mem"], "in_window": last["in_window"],
                          "eps": last["eps"]}))
        return
    nb = a.baseline_impressions or (200_000 if a.quick else 2_000_000)
    out = subprocess.run([sys.executable, "-m", "benchmarks.joinstate", "--baseline-child", str(nb), "--impressions",
                          str(n), "--hours", str(a.hours)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    base = json.loads(out.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="bench-joinstate-") as d:
        r = run(n, a.hours, d)
    rows = [(f"{x['hours']:.1f}", f"{x['in_window']:,}", f"{x['hot']:,}", f"{x['cold']:,}",
             f"{x['rss'] / 1e9:.3f}", f"{x['mem'] / 2**20:.1f}", f"{x['disk'] / 2**20:.0f}",
             f"{x['mem'] / max(x['in_window'], 1):.1f}", f"{x['disk'] / max(x['in_window'], 1):.1f}",
             f"{x['eps']:,.0f}") for x in r["rows"]]
    last = r["last"]
    peak_window = max(x["in_window"] for x in r["rows"])
    b_state = base["mem"] / base["in_window"]  # bytes per impression in window, all in memory
    b_rss = (base["rss"] - base["rss0"]) / base["in_window"]
    b_peak = base["rss0"] + b_rss * peak_window
    rows.append((f"baseline: all in memory, {nb:,} impressions, extrapolated to {peak_window:,} in window", "",
                 "", "", f"{b_peak / 1e9:.3f}", f"{b_state * peak_window / 2**20:.0f}", "0", f"{b_state:.1f}",
                 "0", f"{base['eps']:,.0f}"))
    bpi = last["mem"] / max(last["in_window"], 1)
    report("joinstate", rows, ("event time h", "in window", "hot", "compacted", "RSS GB", "state MiB",
                               "disk MiB", "state B/imp", "disk B/imp", "join events/s"),
           value=r["peak_rss"] / 1e9, unit="GB", baseline=b_peak / 1e9, peak_rss_gb=round(r["peak_rss"] / 1e9, 3),
           bytes_per_impression=round(bpi, 1), baseline_bytes_per_impression=round(b_state, 1),
           baseline_rss_bytes_per_impression=round(b_rss, 1),
           disk_bytes_per_impression=round(last["disk"] / max(last["in_window"], 1), 1),
           events_per_s=round(r["events"] / r["join_s"]), impressions=n, in_window_peak=peak_window,
           wall_s=round(r["wall_s"], 1))


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
