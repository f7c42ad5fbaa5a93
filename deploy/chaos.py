"""``streamrec chaos``: SIGKILL every process of a running stack in turn under a sustained stream, then prove
that nothing was lost and nothing applied twice.

A fresh durable stack (:class:`deploy.stack.LocalStack`) gets a generated log produced at a steady rate (good
events plus malformed ones). Meanwhile each process is killed with SIGKILL in turn (storage, broker, labels and
stats dataflows, trainer with its user-model thread, dashboard with the metrics sink) and the supervisor brings
it back. Once the log's end is through, the run waits for the stack to settle and checks, from what the
processes left behind rather than from their counters:

* **labelled**: distinct example ids on the examples topic, and their labels against the log's own feedback;
* **trained**: the ids in the trainer's final checkpoint (kept with ``--record-trained-ids``): the examples
  whose updates the saved weights hold; an id listed twice was applied twice;
* **stored**: prediction rows in ClickHouse (one per example and objective);
* **dead letters**: stored dead letters, which must be exactly the malformed records produced.

``lost`` is expected examples missing from the checkpoint, ``doubled`` ids applied more than once; both must
be 0. The verdict never depends on when a kill lands: the run waits for completion, however long recovery
takes, up to a timeout that fails the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deploy.stack import LocalStack, StatsWatcher
from deploy.up import generated_log, stored_predictions
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port
from config import Config, replace
from streams.sources.logfile import BadRecord
from streams.sources.scenarios import ScenarioConfig

log = logging.getLogger("streamrec.chaos")

# the order processes are killed in; the user-model worker is a thread of the trainer, the metrics sink a
# thread of the dashboard process: they die and come back with them
KILL_ORDER = ("labels", "trainer", "storage", "dashboard", "stats", "broker")
WHAT_DIES = {"trainer": "trainer + user-model thread", "dashboard": "dashboard + metrics sink"}


@dataclass
class ChaosResult:
    impressions: int = 0
    bad_records: int = 0
    labelled: int = 0
    labelled_messages: int = 0
    wrong_labels: int = 0
    trained: int = 0
    lost: int = 0
    doubled: int = 0
    stored_rows: int = 0
    dead_letters: int = 0
    unexpected_dead: dict[str, int] = field(default_factory=dict)
    kills: list[tuple[str, float]] = field(default_factory=list)  # (process, seconds it took to come back)
    restarts: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    settled: bool = False

    @property
    def ok(self) -> bool:
        return (self.settled and self.lost == 0 and self.doubled == 0 and self.wrong_labels == 0
                and self.labelled == self.impressions and self.stored_rows == 2 * self.impressions
                and self.dead_letters == self.bad_records and not self.unexpected_dead)


class _Producer(threading.Thread):
    """Produces ``records`` at ``rate`` records per second, then the end-of-log mark."""

    def __init__(self, cfg: Config, records: list, rate: float):
        super().__init__(name="chaos-producer", daemon=True)
        self.cfg, self.records, self.rate = cfg, records, rate
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        from streams.sources.replay import Publisher

        try:
            with Publisher(self.cfg, progress=False, desc="chaos") as pub:
                t0 = time.monotonic()
                for i, rec in enumerate(self.records):
                    pub.send(rec)
                    if i % 256 == 255:
                        ahead = (i + 1) / self.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                pub.finish(timeout_s=600)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e
        finally:
            self.done.set()


def _kill(stack: LocalStack, name: str, timeout: float = 60.0) -> float:
    """SIGKILL process ``name``; returns the seconds until the supervisor had it running again."""
    child = stack.child(name)
    if not child.alive():
        return 0.0
    pid, t0 = child.proc.pid, time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if child.alive() and child.proc.pid != pid:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"chaos: {name} did not come back within {timeout:.0f}s (see {child.log_path})")


def _expected_labels(records: list) -> dict[str, tuple[int, int]]:
    """(click, conversion) of each good impression from the log's own feedback."""
    out = {r.event_id: [0, 0] for r in records if isinstance(r, schema.Impression)}
    for r in records:
        if isinstance(r, schema.Click) and r.impression_id in out:
            out[r.impression_id][0] = 1
        elif isinstance(r, schema.Conversion) and r.impression_id in out:
            out[r.impression_id][1] = 1
    return {k: (c, v) for k, (c, v) in out.items()}


def _read_examples(cfg: Config) -> list[schema.Example]:
    consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "chaos-check", cfg.kafka.client,
                                      **{"enable.partition.eof": True})
    consumer.assign(kafka_io.topic_partitions([cfg.topics.examples], cfg.topics.partitions))
    out, eof, deadline = [], set(), time.monotonic() + 120
    try:
        while len(eof) < cfg.topics.partitions and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=10_000, timeout=0.5):
                if m.error() is None:
                    ex = schema.decode(m.value(), schema.Example)
                    if isinstance(ex, schema.Example):
                        out.append(ex)
                elif m.error().code() == kafka_io.KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
    finally:
        consumer.close()
    return out


def _store_counts(cfg: Config) -> tuple[int, dict[str, int]]:
    """(prediction rows, dead letters by reason category) from the store, opened once the dashboard process
    has released it."""
    from dashboards.store import Store

    store = Store.open(cfg.clickhouse_url(), cfg.metrics.database)
    try:
        rows = store.query("SELECT count() FROM (SELECT example_id, objective FROM {db}.predictions FINAL)").rows
        dead = store.query("SELECT splitByChar(':', reason)[1] AS why, count() FROM {db}.dead_letters FINAL "
                           "GROUP BY why").rows
        return int(rows[0][0]), {str(k): int(v) for k, v in dead}
    finally:
        store.close()


def run_chaos(cfg: Config, data_dir: Path, *, events: int, rate: float, rounds: int = 1, bad_rate: float = 0.01,
              seed: int = 7, settle_timeout: float = 300.0, progress=print) -> ChaosResult:
    """One chaos run in a fresh durable stack under ``data_dir``; see the module docstring."""
    t_start = time.monotonic()
    cfg = replace(cfg, data_dir=str(data_dir), kafka={"bootstrap_servers": ""},
                  trainer={"checkpoint_every_s": 5.0})
    stack = LocalStack(cfg, data_dir / "runs" / "chaos", fresh=True, port=free_port(),
                       trainer_args=("--record-trained-ids",), labels_args=("--epoch-s", "2"))
    res = ChaosResult()
    records = generated_log(events, seed, bad_rate, ScenarioConfig())
    res.impressions = sum(isinstance(r, schema.Impression) for r in records)
    res.bad_records = sum(isinstance(r, BadRecord) for r in records)
    try:
        cfg = stack.start()
        watcher = StatsWatcher(cfg)
        producer = _Producer(cfg, records, rate)
        producer.start()
        schedule = [name for _ in range(rounds) for name in KILL_ORDER]
        interval = len(records) / rate / (len(schedule) + 1)
        for name in schedule:  # spread over the production, then one after the other if recovery is slower
            time.sleep(interval)
            took = _kill(stack, name)
            res.kills.append((name, took))
            progress(f"killed {WHAT_DIES.get(name, name)}: back in {took:.1f}s")
        producer.done.wait()
        if producer.error is not None:
            raise RuntimeError(f"chaos: the producer failed: {producer.error}") from producer.error
        url = f"http://{cfg.dashboard.host}:{cfg.dashboard.port}/"
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:  # settle: every example trained and stored
            watcher.poll()
            if (watcher.trained() >= res.impressions
                    and stored_predictions(url, 0) >= 2 * res.impressions):
                res.settled = True
                break
            time.sleep(0.5)
        time.sleep(3.0)  # dead letters and the last service stats reach the store
        watcher.close()
    finally:
        stack.stop()
        res.restarts = {c.name: c.restarts for c in stack.sup.children} if stack.sup else {}
    # -- verify from what the processes left behind
    from trainer import checkpoint

    examples = _read_with_broker(stack, cfg)
    expected = _expected_labels(records)
    res.labelled_messages = len(examples)
    labels = {e.example_id: (e.click, e.conversion) for e in examples}
    res.labelled = len(set(labels) & set(expected))
    res.wrong_labels = sum(labels.get(k) != v for k, v in expected.items() if k in labels)
    found = checkpoint.load_latest(stack.dirs["checkpoints"])
    trained = list(found[1]["trained_ids"]) if found else []
    counts = Counter(trained)
    res.trained = len(counts)
    res.doubled = sum(n - 1 for n in counts.values())
    res.lost = len(set(expected) - set(counts))
    res.stored_rows, dead = _store_counts(cfg)
    res.dead_letters = sum(dead.values())
    res.unexpected_dead = {k: v for k, v in dead.items() if k not in ("unparseable", "schema", "invalid", "too large")}
    res.elapsed_s = time.monotonic() - t_start
    return res


def _read_with_broker(stack: LocalStack, cfg: Config) -> list[schema.Example]:
    """The examples topic, read through a broker started again on the stack's storage (the stack is stopped)."""
    from streams.bus.broker import EmbeddedBroker
    from streams.bus.storage import StorageServer

    with StorageServer(stack.dirs["topics"]) as s3:
        with EmbeddedBroker(storage_port=s3.port, cluster_id=stack.broker.cluster_id) as broker:
            return _read_examples(replace(cfg, kafka={"bootstrap_servers": broker.bootstrap_servers}))


def table(results: list[ChaosResult]) -> tuple[tuple[str, ...], list[tuple]]:
    header = ("run", "impressions", "labelled", "trained", "prediction rows", "dead letters", "lost", "doubled",
              "wrong labels", "kills", "s")
    rows = [(i + 1, f"{r.impressions:,}", f"{r.labelled:,}", f"{r.trained:,}", f"{r.stored_rows:,}",
             f"{r.dead_letters:,} of {r.bad_records:,}", r.lost, r.doubled, r.wrong_labels, len(r.kills),
             f"{r.elapsed_s:.0f}") for i, r in enumerate(results)]
    return header, rows


def run(args: argparse.Namespace, cfg: Config) -> int:
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="streamrec-chaos-") as tmp:
            d = Path(args.data_dir).resolve() / f"chaos-{i}" if args.data_dir else Path(tmp)
            r = run_chaos(cfg, d, events=args.events, rate=args.rate, rounds=args.rounds, seed=args.seed + i,
                          progress=lambda m: print(m, file=sys.stderr))
            results.append(r)
            verdict = "OK" if r.ok else "FAILED"
            print(f"run {i + 1}: {verdict}: lost {r.lost}, doubled {r.doubled}, wrong labels {r.wrong_labels}, "
                  f"unexpected dead letters {r.unexpected_dead or 0}, settled {r.settled}", file=sys.stderr)
    header, rows = table(results)
    _print_table(header, rows)
    return 0 if all(r.ok for r in results) else 1


def _print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="SIGKILL each process of a running stack in turn; check nothing is lost",
                       description="Start a fresh durable stack, produce a generated log at a steady rate, SIGKILL "
                                   f"each process in turn ({', '.join(KILL_ORDER)}) and let the supervisor bring "
                                   "it back, then check from the topics, the trainer's checkpoint and the store "
                                   "that every example was labelled, trained exactly once and stored, and that "
                                   "only the malformed records became dead letters. Exits 1 if not.")
    p.add_argument("--events", type=int, default=20_000, help="impressions in the log (default 20000)")
    p.add_argument("--rate", type=float, default=1_000.0, help="records produced per second (default 1000)")
    p.add_argument("--rounds", type=int, default=1, help="times each process is killed (default 1)")
    p.add_argument("--runs", type=int, default=1, help="chaos runs in a row, each in a fresh stack (default 1)")
    p.add_argument("--seed", type=int, default=7, help="generator seed of the first run")
    p.add_argument("--data-dir", default=None, help="keep each run's stack here (default: a temporary directory)")
    p.set_defaults(func=run)
