"""Labels dataflow throughput (``streamrec bench labels [--quick]``).

One run, one embedded broker, the same generated topics for every row:
- raw: one confluent-kafka consumer reading the three input topics (the ceiling);
- naive: Bytewax's KafkaSource, one item per event, decode + per-impression-id stateful join;
- ours: the labels dataflow (batch per partition) in 1 process, then a 2-process cluster;
- ours, 5% bad input: the same with 5% malformed records of every kind.
Each labels run is a child process (``python -m streams.flows.labels``) whose RSS is sampled every 0.2 s; its
events/s is the steady rate from its own ServiceStats (first to last report), the wall rate from process
start to exit (start-up included), and events per CPU-second of the process(es) (user + system, all threads:
the number that does not move when other work shares the cores). Last line: JSON with value = ours (1 process, steady) events/s,
baseline = raw consumer events/s.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import yaml

from benchmarks._common import parser, report
from streams import schema
from streams.bus import kafka_io
from streams.bus.broker import EmbeddedBroker
from config import Config, load_config, replace
from streams.sources import generate

ROOT = Path(__file__).resolve().parents[1]
# windows: click 15 min, conversion 1 h (generator delays below them); 100 impressions/s of event time


def _fill(cfg: Config, n: int, bad_rate: float, chunk: int = 500_000) -> int:
    """Generate ``n`` impressions (+ feedback, + bad records) in chunks; returns the number of input records."""
    total, start, k = 0, generate.START_TS_MS, 0
    while k < n:
        m = min(chunk, n - k)
        g = generate.GeneratorConfig(n_impressions=m, seed=1000 + k, start_ts=start, impressions_per_s=100,
                                     bad_rate=bad_rate, max_click_delay_s=300, max_conversion_delay_s=3000)
        recs = generate.simulate(g).records
        generate.produce(cfg, recs, progress=False, watermark=k + m >= n)
        total += len(recs)
        start = max(r.ts for r in recs if hasattr(r, "ts")) + 1
        k += m
    return total


def _raw(cfg: Config) -> tuple[int, float]:
    c = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "bench-raw", **{"enable.partition.eof": True})
    c.assign(kafka_io.topic_partitions(cfg.topics.input_topics(), cfg.topics.partitions))
    n, eof, t0 = 0, 0, None
    want = 3 * cfg.topics.partitions
    while eof < want:
        batch = c.consume(20_000, 0.05)
        if t0 is None and batch:  # from the first message: connection set-up excluded, as in the steady rates
            t0 = time.perf_counter()
        for m in batch:
            if m.error() is None:
                n += len(m.value()) > 0
            else:
                eof += 1
    dt = time.perf_counter() - t0
    c.close()
    return n, dt


def _naive(cfg: Config) -> tuple[int, float]:
    """One item per event: KafkaSource -> decode -> key by impression id -> stateful join -> count."""
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    flow = Dataflow("naive")
    src = op.input("in", flow, KafkaSource([cfg.kafka.bootstrap_servers], list(cfg.topics.input_topics()),
                                             tail=False, batch_size=5000))
    evs = op.map("decode", src, lambda m: schema.decode(m.value))
    good = op.filter("valid", evs, lambda e: isinstance(e, (schema.Impression, schema.Click, schema.Conversion)))
    keyed = op.key_on("by_imp", good, lambda e: e.event_id if isinstance(e, schema.Impression) else e.impression_id)

    def join(state, ev):
        imp, click, conv = state or (None, 0, 0)
        if isinstance(ev, schema.Impression):
            imp = ev
        elif isinstance(ev, schema.Click):
            click = 1
        else:
            conv = 1
        return (imp, click, conv), [1]

    counted: list = []
    joined = op.stateful_flat_map("join", keyed, join)
    op.output("out", op.count_final("n", op.map("one", joined, lambda kv: "all"), lambda k: k), TestingSink(counted))
    t0 = time.perf_counter()
    run_main(flow)
    dt = time.perf_counter() - t0
    return (counted[0][1] if counted else 0), dt


def _labels(cfg: Config, processes: int) -> dict:
    """Run the labels flow in child processes; returns wall s, steady events/s, RSS samples (MiB) of child 0."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp, "c.yaml")
        conf.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "deploy.cli", "--config", str(conf), "labels", "--bounded"]
        if processes > 1:
            cmd += ["--local-processes", str(processes)]
        t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        rss = []
        try:
            while proc.poll() is None:
                rss.append(_rss_tree(proc.pid))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant: the cluster's processes too
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    stats = _service_stats(cfg)
    return {"wall": wall, "cpu": cpu, "rss": [r for r in rss if r], "stats": stats, "rc": proc.returncode}


def _rss_tree(pid: int) -> float:
    """RSS (MiB) of ``pid`` plus its direct children (the cluster launcher's processes)."""
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    total = 0.0
    for p in pids:
        try:
            line = next(ln for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ln.startswith("VmRSS"))
            total += int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            pass
    return total


def _service_stats(cfg: Config) -> list[schema.ServiceStats]:
    c = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "bench-stats", **{"enable.partition.eof": True})
    c.assign(kafka_io.topic_partitions([cfg.topics.service_stats], cfg.topics.partitions))
    out, eof = [], 0
    while eof < cfg.topics.partitions:
        for m in c.consume(10_000, 0.5):
            if m.error():
                eof += 1
            else:
                s = schema.decode(m.value(), schema.ServiceStats)
                if isinstance(s, schema.ServiceStats) and s.component == "labels":
                    out.append(s)
    c.close()
    return out


def _steady(stats: list[schema.ServiceStats]) -> float:
    """Events/s between the first and the last report of each instance, summed over instances."""
    rate = 0.0
    for inst in {s.instance for s in stats}:
        ss = sorted((s for s in stats if s.instance == inst), key=lambda s: s.ts)
        if len(ss) >= 2 and ss[-1].ts > ss[0].ts:
            rate += (ss[-1].values["events_in"] - ss[0].values["events_in"]) / ((ss[-1].ts - ss[0].ts) / 1000)
    return rate


def _rss_profile(rss: list[float]) -> str:
    """RSS at a quarter, half, three quarters and the end of the run: flat means bounded state."""
    return "/".join(f"{rss[min(len(rss) - 1, len(rss) * q // 4)]:.0f}" for q in (1, 2, 3, 4))


def _topics(cfg: Config, tag: str) -> Config:
    names = ("impressions", "clicks", "conversions", "examples", "dead_letters", "predictions", "service_stats")
    return replace(cfg, topics={n: f"bench_{tag}_{n}" for n in names})


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    n = 200_000 if args.quick else 5_000_000
    with EmbeddedBroker() as b:
        # windows well inside the log's event-time span (100 impressions/s): the join state, and so RSS, must
        # stay flat once the first hour is read, whatever the log length
        base = load_config(env={}, kafka={"bootstrap_servers": b.bootstrap_servers},
                           labels={"batch_size": 20_000, "click_window_s": 900, "conversion_window_s": 3600})
        good, bad = _topics(base, "good"), _topics(base, "bad")
        for c in (good, bad):
            kafka_io.ensure_topics(b.bootstrap_servers, c.topics.all(), c.topics.partitions)
        n_good = _fill(good, n, 0.0)
        # quick: as long as the clean run, or it ends within one stats interval and has no steady rate
        n_bad = _fill(bad, n if args.quick else n // 5, 0.05)
        rows = []
        raw_n, raw_s = _raw(good)
        raw_rate = raw_n / raw_s
        rows.append(("raw confluent-kafka consumer", raw_n, f"{raw_s:.1f}", f"{raw_rate:,.0f}", "1.00", "-", "-",
                     "-"))
        runs = {}
        for name, cfg, procs, events in (("labels flow, 1 process", good, 1, n_good),
                                         ("labels flow, 5% bad input", bad, 1, n_bad)):
            runs[name] = r = _labels(cfg, procs)
            steady = _steady(r["stats"])
            rss = r["rss"] or [0.0]
            rows.append((name, events, f"{r['wall']:.1f}", f"{steady:,.0f}", f"{steady / raw_rate:.2f}",
                         f"{events / r['wall']:,.0f}", f"{events / r['cpu']:,.0f}", _rss_profile(rss)))
        two = _topics(good, "two")
        two = replace(good, topics={k: getattr(two.topics, k) for k in ("examples", "dead_letters", "service_stats")})
        kafka_io.ensure_topics(b.bootstrap_servers, two.topics.all(), two.topics.partitions)
        r2 = _labels(two, 2)
        steady2 = _steady(r2["stats"])
        rss2 = r2["rss"] or [0.0]
        rows.append(("labels flow, 2 processes (sum)", n_good, f"{r2['wall']:.1f}", f"{steady2:,.0f}",
                     f"{steady2 / raw_rate:.2f}", f"{n_good / r2['wall']:,.0f}", f"{n_good / r2['cpu']:,.0f}",
                     _rss_profile(rss2)))
        if args.quick or n <= 1_000_000:
            naive_n, naive_s = _naive(good)
            rows.append(("naive per-event Bytewax join", n_good, f"{naive_s:.1f}", f"{naive_n / naive_s:,.0f}",
                         f"{naive_n / naive_s / raw_rate:.2f}", "-", "-", "-"))
        else:  # the naive join's memory grows with the log (no expiry): measured on the first 1M only
            rows.append(("naive per-event Bytewax join", "skipped (> 1M)", "-", "-", "-", "-", "-", "-"))
    one = _steady(runs["labels flow, 1 process"]["stats"])
    report("labels", rows, ("run", "events", "wall s", "events/s (steady)", "x raw", "events/s (wall)",
                            "events/CPU-s", "RSS MiB at 25/50/75/100% of run"),
           value=one, unit="events/s", baseline=raw_rate, n_events=n_good,
           two_process_speedup=round(steady2 / one, 3) if one else None,
           bad_input_ratio=round(_steady(runs["labels flow, 5% bad input"]["stats"]) / one, 3) if one else None)


if __name__ == "__main__":
    main()
