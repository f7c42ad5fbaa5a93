"""Replay and generate throughput against a raw confluent-kafka producer, on a fresh embedded broker.

In one run, each on its own fresh topics (4 partitions):

* ``raw producer`` (baseline): the same messages as the replay sends (value = the log line, key = user id,
  explicit partition), encoded *before* the clock starts, produced by a bare ``Producer`` with the same
  settings (``kafka_io.make_producer``) and flushed;
* ``replay JSONL``: ``streams.sources.replay.replay_file`` of the log (read, decode + validate, route, produce, flush),
  with its default decoder: a worker process for logs of ``WORKER_MIN_BYTES`` or more (this one is);
* ``replay JSONL, one process``: the same with ``parallel=False`` (decoding in the producing process);
* ``generate+produce``: ``streams.sources.generate.simulate`` + ``streams.sources.replay.produce`` (simulation included).

Each producing phase runs ``--repeat`` times (alternating) and the best is kept, so one slow pass of the
shared 2-core machine does not decide the ratio. Last line: JSON with value = replay events/s,
baseline = raw producer events/s.

    streamrec bench replay [--quick]
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import tempfile
from pathlib import Path

from benchmarks._common import parser, report, timer
from streams import schema
from streams.bus import kafka_io
from streams.bus.broker import EmbeddedBroker
from config import load_config
from streams.sources.generate import GeneratorConfig, simulate
from streams.sources.logfile import write_jsonl
from streams.sources.replay import produce, replay_file

PARTITIONS = 4
_ids = itertools.count()


def fresh_config(bootstrap: str):
    n = next(_ids)
    topics = {k: f"bench{os.getpid()}_{n}_{k}" for k in ("impressions", "clicks", "conversions", "examples",
                                                          "dead_letters", "predictions", "service_stats")}
    cfg = load_config(env={}, kafka={"bootstrap_servers": bootstrap}, topics={**topics, "partitions": PARTITIONS})
    kafka_io.ensure_topics(bootstrap, cfg.topics.all(), PARTITIONS)
    return cfg


def messages(cfg, records) -> list[tuple[str, bytes, bytes, int]]:
    """(topic, value, key, partition) of every event, as the Publisher places them."""
    t = cfg.topics
    topic = {schema.Impression: t.impressions, schema.Click: t.clicks, schema.Conversion: t.conversions}
    out = []
    for r in records:
        key = schema.user_key(r)
        out.append((topic[type(r)], schema.encode(r), key, kafka_io.partition_for(key, PARTITIONS)))
    return out


def raw_produce(cfg, msgs) -> float:
    """Seconds to produce and flush ``msgs`` with a bare producer."""
    p = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    produce_ = p.produce
    with timer() as t:
        for topic, value, key, part in msgs:
            try:
                produce_(topic, value, key, part)
            except BufferError:
                p.poll(0.05)
                produce_(topic, value, key, part)
        left = p.flush(60)
    if left:
        raise RuntimeError(f"raw producer: {left} messages not delivered")
    return t["s"]


def main() -> int:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=None, help="impressions (default 300k, --quick 100k)")
    ap.add_argument("--repeat", type=int, default=None, help="passes per phase (default 3, --quick 2)")
    args = ap.parse_args()
    n = args.events or (100_000 if args.quick else 300_000)
    repeat = args.repeat or (2 if args.quick else 3)
    g = GeneratorConfig(n_impressions=n, seed=1)
    sim = simulate(g)
    n_events = len(sim.records)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp, "tansu.log")) as broker:
        bs = broker.bootstrap_servers
        log = Path(tmp, "events.jsonl")
        write_jsonl(log, sim.records)
        msgs = messages(fresh_config(bs), sim.records)
        records = sim.records
        del sim
        gc.collect()
        gc.freeze()  # the fixtures (records, messages) are not what the phases should spend GC passes on
        raw_s, replay_s, inline_s, gen_s = [], [], [], []
        for _ in range(repeat):
            raw_s.append(raw_produce(fresh_config(bs), msgs))
            for parallel, times in ((None, replay_s), (False, inline_s)):
                cfg = fresh_config(bs)
                with timer() as t:
                    s = replay_file(cfg, log, progress=False, parallel=parallel)
                assert s.events == n_events and s.dead_letters == 0, s
                times.append(t["s"])
        cfg = fresh_config(bs)
        with timer() as t:
            s = produce(cfg, simulate(g).records, progress=False)
        del records
        assert s.events == n_events
        gen_s.append(t["s"])
    raw, rep, gen = n_events / min(raw_s), n_events / min(replay_s), n_events / min(gen_s)
    inline = n_events / min(inline_s)
    rows = [("raw confluent-kafka producer (pre-encoded)", f"{n_events:,}", f"{min(raw_s):.2f}", f"{raw:,.0f}", "1.00"),
            ("replay JSONL (read+decode+validate+produce)", f"{n_events:,}", f"{min(replay_s):.2f}", f"{rep:,.0f}",
             f"{rep / raw:.2f}"),
            ("replay JSONL, one process (parallel=False)", f"{n_events:,}", f"{min(inline_s):.2f}",
             f"{inline:,.0f}", f"{inline / raw:.2f}"),
            ("generate+produce (simulate+encode+produce)", f"{n_events:,}", f"{min(gen_s):.2f}", f"{gen:,.0f}",
             f"{gen / raw:.2f}")]
    print(f"{n:,} impressions -> {n_events:,} events, {PARTITIONS} partitions, best of {repeat} "
          f"(all passes raw {', '.join(f'{x:.2f}' for x in raw_s)} s; replay {', '.join(f'{x:.2f}' for x in replay_s)} s; "
          f"one process {', '.join(f'{x:.2f}' for x in inline_s)} s; load average {os.getloadavg()[0]:.1f})")
    report("replay", rows, ("phase", "events", "s", "events/s", "x raw"), value=rep, unit="events/s",
           baseline=raw, generate_events_per_s=round(gen, 1), one_process_events_per_s=round(inline, 1), events=n_events, goal_ratio=0.8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
