"""Labels dataflow throughput under hostile input (``streamrec bench hostile [--quick]``).

One embedded broker, two sets of input topics holding the same generated good events in the same order:
- clean: the good events only;
- hostile: the same with 5% of the input hostile (one bad record per 19 good ones), cycling through the
  corpus of streams/sources/hostile.py: every malformed kind that travels in a log (49) and the 6 kinds of
  valid events the join refuses (duplicates, orphans, feedback outside its window, far future), each kind
  as often as the others, placed as :func:`streams.sources.hostile.interleave` places them; one of them is
  the 3 MB record.
The labels flow runs on each in turn (clean, hostile, clean, ...: drift of a shared machine hits both), in a
child process as ``streamrec bench labels`` runs it (bounded, 1 process, fresh output topics each run). Its
rate is good events per second, steady, from its own ServiceStats (events in minus dead letters, first to
last report); good events per CPU-second of the child too (start-up included: the figure that moves least
when other work shares the cores). Each run must give one example per impression and one dead letter per
hostile record, or the benchmark fails. Best of 3 each. Last line: JSON with value = hostile / clean (goal
>= 0.9), baseline = 1.0 (clean), and both rates.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks._common import parser, report
from benchmarks.labels import _labels, _topics
from streams import schema
from streams.bus import kafka_io
from streams.bus.broker import EmbeddedBroker
from config import Config, load_config, replace
from streams.sources import generate, hostile
from streams.sources.replay import Publisher

BAD_SHARE = 0.05  # of all input records
LOG_DEFECTS = sum(d.where == "log" for d in hostile.DEFECTS)
UNJOINABLE_KINDS = 6


def _fill(clean: Config, bad: Config, n: int, chunk: int = 250_000) -> tuple[int, int, int]:
    """Generate ``n`` impressions (+ feedback) in chunks into both topic sets; returns (good records, malformed,
    unjoinable) produced into the hostile set."""
    rng = np.random.default_rng(5)
    big = replace(bad, kafka={"client": {"message.max.bytes": str(8 << 20)}})  # the 3 MB record (Tansu takes it)
    n_good = n_mal = n_unj = 0
    start, k = generate.START_TS_MS, 0
    with Publisher(clean, progress=False) as pc, Publisher(big, progress=False) as pb:
        while k < n:
            m = min(chunk, n - k)
            g = generate.GeneratorConfig(n_impressions=m, seed=2000 + k, start_ts=start, impressions_per_s=100,
                                         max_click_delay_s=300, max_conversion_delay_s=3000)
            good = generate.simulate(g).records
            n_bad = round(len(good) * BAD_SHARE / (1 - BAD_SHARE))
            unj = n_bad * UNJOINABLE_KINDS // (LOG_DEFECTS + UNJOINABLE_KINDS)
            malformed = hostile.make_bad_records(good, n_bad - unj, rng)
            if k == 0:
                malformed[0] = hostile.make_bad_records(good, 1, rng, where=("heavy",))[0]
            now = int(time.time() * 1000)  # far-future impressions: two days past the wall clock
            refused = hostile.unjoinable(good, clean.labels.click_window_s * 1000, now, unj, rng)
            for rec in good:
                pc.send(rec)
            for rec in hostile.interleave(good, malformed, refused, rng):
                pb.send(rec.event if isinstance(rec, hostile.Unjoinable) else rec)
            n_good, n_mal, n_unj = n_good + len(good), n_mal + len(malformed), n_unj + len(refused)
            start = max(r.ts for r in good) + 1
            k += m
        pc.finish(timeout_s=600)
        pb.finish(timeout_s=600)
    return n_good, n_mal, n_unj


def _good_rate(stats: list[schema.ServiceStats]) -> float:
    """Good events/s between the first and the last report of each instance, summed over instances."""
    rate = 0.0
    for inst in {s.instance for s in stats}:
        ss = sorted((s for s in stats if s.instance == inst), key=lambda s: s.ts)
        if len(ss) >= 2 and ss[-1].ts > ss[0].ts:
            good = [s.values["events_in"] - s.values.get("dead_letters", 0.0) for s in ss]
            rate += (good[-1] - good[0]) / ((ss[-1].ts - ss[0].ts) / 1000)
    return rate


def _outputs(cfg: Config, tag: str, bootstrap: str) -> Config:
    """``cfg`` reading its input topics, writing to fresh output topics named by ``tag``."""
    out = _topics(cfg, tag)
    cfg = replace(cfg, topics={k: getattr(out.topics, k) for k in ("examples", "dead_letters", "service_stats")})
    kafka_io.ensure_topics(bootstrap, cfg.topics.all(), cfg.topics.partitions)
    return cfg


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each, alternating (default 3)")
    args = p.parse_args()
    n = 200_000 if args.quick else 1_000_000
    runs = args.runs
    with EmbeddedBroker() as b:
        # as `bench labels`: windows well inside the log's event-time span (100 impressions/s)
        base = load_config(env={}, kafka={"bootstrap_servers": b.bootstrap_servers},
                           labels={"batch_size": 20_000, "click_window_s": 900, "conversion_window_s": 3600})
        clean, bad = _topics(base, "clean"), _topics(base, "hostile")
        for c in (clean, bad):
            kafka_io.ensure_topics(b.bootstrap_servers, c.topics.all(), c.topics.partitions)
        n_good, n_mal, n_unj = _fill(clean, bad, n)
        results: dict[str, list[dict]] = {"clean": [], "hostile": []}
        for i in range(runs):
            for name, cfg in (("clean", clean), ("hostile", bad)):
                r = _labels(_outputs(cfg, f"{name}{i}", b.bootstrap_servers), 1)
                if r["rc"] != 0:
                    raise SystemExit(f"bench hostile: the labels flow exited with code {r['rc']} ({name}, run {i})")
                last = max(r["stats"], key=lambda s: s.ts).values
                r.update(rate=_good_rate(r["stats"]), dead=int(last.get("dead_letters", 0)),
                         examples=int(last.get("examples_out", 0)))
                want = (n, n_mal + n_unj if name == "hostile" else 0)
                if (r["examples"], r["dead"]) != want:  # a run that lost or invented records measures nothing
                    raise SystemExit(f"bench hostile: {name} run {i}: {r['examples']:,} examples and {r['dead']:,} "
                                     f"dead letters, expected {want[0]:,} and {want[1]:,}")
                results[name].append(r)
    best = {name: max(rs, key=lambda r: r["rate"]) for name, rs in results.items()}
    clean_rate, bad_rate = best["clean"]["rate"], best["hostile"]["rate"]
    rows = []
    for name in ("clean", "hostile"):
        for i, r in enumerate(results[name]):
            inp = n_good + (n_mal + n_unj if name == "hostile" else 0)
            rows.append((f"{name} run {i + 1}" + (" (best)" if r is best[name] else ""), f"{inp:,}",
                         f"{r['dead']:,}", f"{r['examples']:,}", f"{r['wall']:.1f}", f"{r['rate']:,.0f}",
                         f"{n_good / r['cpu']:,.0f}", f"{r['rate'] / clean_rate:.3f}" if clean_rate else "-"))
    print(f"input: {n_good:,} good records; hostile set: + {n_mal:,} malformed (the 3 MB one included) and "
          f"{n_unj:,} unjoinable = {(n_mal + n_unj) / (n_good + n_mal + n_unj):.1%} of its input")
    cpu = {k: (n_good / v["cpu"]) for k, v in best.items()}  # good events per CPU-second of the best runs
    report("hostile", rows, ("run", "input records", "dead letters", "examples", "wall s",
                             "good events/s (steady)", "good/CPU-s", "x clean (best)"),
           value=bad_rate / clean_rate if clean_rate else 0.0, unit="x clean throughput", baseline=1.0,
           clean_events_per_s=round(clean_rate), hostile_events_per_s=round(bad_rate),
           bad_share=round((n_mal + n_unj) / (n_good + n_mal + n_unj), 4), good_records=n_good,
           runs=runs, cpu_ratio=round(cpu["hostile"] / cpu["clean"], 3))


if __name__ == "__main__":
    main()
