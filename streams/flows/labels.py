"""The ``labels`` Bytewax dataflow: impressions + clicks + conversions -> examples and dead letters.

Batch-per-partition design (DESIGN.md, "Throughput hint")::

    KafkaPartitionsSource: one source partition per Kafka partition NUMBER p, one consumer assigned to
      (impressions, p), (clicks, p), (conversions, p); one item = SourceBatch(up to labels.batch_size raw
      messages, topics caught up)                                      key = part_key(p)
        -> stateful_batch "labels.join": join.step per partition (decode after the exchange: raw bytes only)
        -> OutBatch(encoded records, counters)                         key = part_key(p)
        -> LabelsSink: one writer per partition, one producer per process; examples -> topics.examples
           (key user_id), dead letters -> topics.dead_letters; ServiceStats(component="labels") about every
           second (events_in, examples_out, dead_letters, dead.<reason>, late_positives, pending_impressions)

Event-time pacing: the source reads the ts of the last message per topic of each batch and pauses the
topic-partitions more than ``labels.pace_slack_s`` ahead of the slowest live
one, so feedback read before its impression (the join's orphan buffer) stays bounded (DESIGN.md trap).

Scale-out: ``--processes N --process-id I --addresses h:p,...`` runs one process of a Bytewax cluster
(``bytewax.run.cli_main``); ``--local-processes N`` launches N such processes on this machine
(:func:`local_cluster`). Partitions spread over all workers of all processes.

Keys: a stateful step routes key ``k`` to worker ``siphash13(k + b"\\xff") % workers`` (checked against
Bytewax 0.21.1 in tests/test_labels_flow.py); :func:`part_key` picks, for partition p of P, a key string whose
route is ``p mod W`` for every W dividing lcm(P, 12), so partitions spread evenly over 1, 2, 3, 4, 6, 12 and
P workers and a key never changes with the worker count (recovery state stays addressable).

Bounded mode (``--bounded``): a partition finishes when its three topic-partitions reached their end; the join
then emits every pending impression (``end_of_stream``). Recovery (``labels.recovery_dir``, ``--epoch-s``):
at-least-once; example ids are deterministic (impression id, or ``<id>#late-click`` / ``#late-conversion``),
so the trainer drops re-emitted examples.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from streams import schema
from streams.bus import kafka_io
from streams.config import NO_BROKER, Config, replace
from streams.flows import join

log = logging.getLogger(__name__)
GROUP = "streamrec-labels"  # assign() only, never committed: offsets live in Bytewax snapshots
_M64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------- routing keys

def _siphash13(data: bytes) -> int:
    """SipHash-1-3 with a zero key: Rust's ``DefaultHasher::new()``, which Bytewax/Timely use to route keys."""
    v0, v1, v2, v3 = 0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573

    def rnd(v0, v1, v2, v3):
        v0 = (v0 + v1) & _M64; v1 = ((v1 << 13) | (v1 >> 51)) & _M64; v1 ^= v0; v0 = ((v0 << 32) | (v0 >> 32)) & _M64
        v2 = (v2 + v3) & _M64; v3 = ((v3 << 16) | (v3 >> 48)) & _M64; v3 ^= v2
        v0 = (v0 + v3) & _M64; v3 = ((v3 << 21) | (v3 >> 43)) & _M64; v3 ^= v0
        v2 = (v2 + v1) & _M64; v1 = ((v1 << 17) | (v1 >> 47)) & _M64; v1 ^= v2; v2 = ((v2 << 32) | (v2 >> 32)) & _M64
        return v0, v1, v2, v3

    n, full = len(data), len(data) // 8 * 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def route(key: str, workers: int) -> int:
    """The worker index Bytewax 0.21 sends a stateful key to (Rust ``str`` hashing appends 0xff)."""
    return _siphash13(key.encode() + b"\xff") % workers


def part_key(p: int, partitions: int) -> str:
    """Key of Kafka partition number ``p``: ``"p<p>"`` plus the first salt that spreads keys over workers."""
    m = math.lcm(partitions, 12)
    for salt in range(100_000):
        key = f"p{p}" if salt == 0 else f"p{p}.{salt}"
        if route(key, m) == p % m:
            return key
    raise RuntimeError(f"labels: no routing key found for partition {p} of {partitions}")  # pragma: no cover


# --------------------------------------------------------------------------------------------------- source

HEARTBEAT_S = 1.0


class _PartitionReader(StatefulSourcePartition[join.SourceBatch, dict]):
    """One consumer on (impressions, clicks, conversions) partition ``p``; snapshot = next offset per topic."""

    def __init__(self, cfg: Config, p: int, offsets: dict[str, int] | None, bounded: bool):
        self.topics, self.p, self.bounded = cfg.topics.input_topics(), p, bounded
        self.batch_size = cfg.labels.batch_size
        self.next = dict(offsets or {})
        self.eof = {t: False for t in self.topics}
        self.eof_since: dict[str, float] = {}  # monotonic time each topic-partition last reached its end
        self.idle_s = 0.0 if bounded else cfg.labels.idle_s
        self.reported: frozenset[str] = frozenset()
        self.last_emit = 0.0
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, GROUP, cfg.kafka.client,
                                               **{"enable.partition.eof": True, "fetch.wait.max.ms": 100})
        self.consumer.assign([kafka_io.TopicPartition(t, p, self.next.get(t, kafka_io.OFFSET_BEGINNING))
                              for t in self.topics])
        self.finished = False
        self.head: dict[str, int] = {}  # latest event ts read per topic (from the last message of a batch)
        self.paused: set[str] = set()
        self.pauses = 0
        self.slack_ms = int(cfg.labels.pace_slack_s * 1000)

    def next_batch(self) -> list[join.SourceBatch]:
        if self.finished:
            raise StopIteration()
        msgs, p, eof, eof_at = [], self.p, self.eof, {}
        for m in self.consumer.consume(num_messages=self.batch_size, timeout=0.05):
            err = m.error()
            if err is None:
                msgs.append((m.topic(), p, m.offset(), m.value() or b""))
            elif err.code() == kafka_io.KafkaError._PARTITION_EOF:
                if not eof[m.topic()]:
                    self.eof_since[m.topic()] = time.monotonic()
                eof[m.topic()], eof_at[m.topic()] = True, len(msgs)
            else:
                kafka_io.consumer_error(err, f"labels source partition {p}", log)
        seen = set()
        for i in range(len(msgs) - 1, -1, -1):  # last message per topic: next offset; data after EOF: not caught up
            topic = msgs[i][0]
            if topic not in seen:
                seen.add(topic)
                self.next[topic] = msgs[i][2] + 1
                if eof[topic] and eof_at.get(topic, -1) <= i:
                    eof[topic] = False
                ts = _head_ts(msgs, i)
                if ts is not None and ts > self.head.get(topic, -1):
                    self.head[topic] = ts
        self._pace()
        if self.bounded and all(self.eof.values()):
            self.finished = True
        # At its end a tailing topic may still receive data: it stops holding event time back only once idle
        # for idle_s (otherwise a momentarily caught-up impressions topic lets windows close too early).
        now = time.monotonic()
        caught = frozenset(t for t, e in self.eof.items() if e and now - self.eof_since[t] >= self.idle_s)
        if not msgs and caught == self.reported and now - self.last_emit < HEARTBEAT_S:
            return []
        # an empty batch at least every HEARTBEAT_S keeps the sink publishing stats while the input is quiet
        self.reported, self.last_emit = caught, now
        return [join.SourceBatch(self.p, tuple(msgs), caught)]

    def _pace(self) -> None:
        """Pause topic-partitions more than ``slack`` ahead in event time of the slowest live one.

        The slowest topic that is not at its end is never paused, so reading always progresses; the join's
        orphan buffers (feedback read before its impression) stay bounded by ``slack`` of event time.
        """
        live = [self.head.get(t) for t in self.topics if not self.eof[t]]
        if None in live:  # a topic with unread data and no time yet (start-up): hold the others until it has one
            want = {t for t in self.topics if not self.eof[t] and t in self.head}
        else:
            floor = min(live) if live else 0
            want = {t for t in self.topics if not self.eof[t] and self.head[t] > floor + self.slack_ms}
        if want != self.paused:
            tps = lambda ts: [kafka_io.TopicPartition(t, self.p) for t in ts]
            if want - self.paused:
                self.consumer.pause(tps(want - self.paused))
            if self.paused - want:
                self.consumer.resume(tps(self.paused - want))
            self.paused = want
            self.pauses += 1

    def snapshot(self) -> dict:
        return dict(self.next)

    def close(self) -> None:
        self.consumer.close()


class _Ts(msgspec.Struct):
    ts: int = -1


_decode_ts = msgspec.json.Decoder(_Ts).decode


def _head_ts(msgs: list[join.RawMsg], i: int) -> int | None:
    """Event ts of message ``i`` or of the closest earlier decodable one of its topic (looks back <= 8)."""
    topic = msgs[i][0]
    for j in range(i, max(i - 8, -1), -1):
        if msgs[j][0] == topic:
            try:
                ts = _decode_ts(msgs[j][3]).ts
            except schema.DECODE_ERRORS:  # a bad record: the join dead-letters it; try the one before
                continue
            if ts >= 0:
                return ts
    return None


class KafkaPartitionsSource(FixedPartitionedSource[join.SourceBatch, dict]):
    """One source partition per Kafka partition number of the three input topics."""

    def __init__(self, cfg: Config, bounded: bool):
        self.cfg, self.bounded = cfg, bounded
        n = cfg.topics.partitions
        self.keys = {part_key(p, n): p for p in range(n)}

    def list_parts(self) -> list[str]:
        return list(self.keys)

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _PartitionReader:
        return _PartitionReader(self.cfg, self.keys[for_part], resume_state, self.bounded)


# ------------------------------------------------------------------------------------------------ join step

class OutBatch(NamedTuple):
    """What the join emits per batch: encoded records ``(to_examples, key, value)`` and the partition's gauges."""

    records: list[join.Output]  # (join.EXAMPLE | join.DEAD, key, encoded record)
    counts: dict
    pending: int


class _JoinLogic(StatefulBatchLogic[join.SourceBatch, OutBatch, tuple]):
    def __init__(self, state: join.JoinState, bounded: bool):
        self.state, self.bounded = state, bounded

    def _emit(self, outs: list[join.Output]) -> tuple[list[OutBatch], bool]:
        return [OutBatch(outs, dict(self.state.counts), self.state.n_pending())], self.RETAIN

    def on_batch(self, values: list[join.SourceBatch]) -> tuple[list[OutBatch], bool]:
        now, outs = int(time.time() * 1000), []
        for batch in values:
            _, out = join.step(self.state, batch, now)
            outs.extend(out)
        return self._emit(outs)

    def on_eof(self) -> tuple[list[OutBatch], bool]:
        if not self.bounded:
            return [], self.RETAIN
        _, out = join.flush(self.state, int(time.time() * 1000))
        return self._emit(out)

    def snapshot(self) -> tuple:
        return self.state.snapshot()


# ----------------------------------------------------------------------------------------------------- sink

class _Stats:
    """Process-wide totals of every partition, published as ``ServiceStats`` about once a second."""

    def __init__(self, cfg: Config):
        self.cfg, self.lock = cfg, threading.Lock()
        self.parts: dict[str, tuple[dict, int]] = {}
        self.last_t, self.last_in = time.monotonic(), 0.0
        self.instance = f"{socket.gethostname()}-{os.getpid()}"

    def update(self, key: str, batch: OutBatch) -> None:
        self.parts[key] = (batch.counts, batch.pending)

    def maybe_publish(self, producer, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_t < 1.0:
            return
        with self.lock:
            if not force and now - self.last_t < 1.0:
                return
            names = {k for c, _ in self.parts.values() for k in c}
            names.update(("events_in", "examples_out", "dead_letters"))
            values = {k: float(sum(c.get(k, 0) for c, _ in self.parts.values())) for k in sorted(names)}
            values["pending_impressions"] = float(sum(p for _, p in self.parts.values()))
            dt = max(now - self.last_t, 1e-6)
            values["events_per_s"] = (values["events_in"] - self.last_in) / dt
            self.last_t, self.last_in = now, values["events_in"]
        st = schema.ServiceStats(component="labels", ts=int(time.time() * 1000), values=values,
                                 instance=self.instance)
        key = b"labels"
        kafka_io.produce(producer, self.cfg.topics.service_stats, schema.encode(st), key=key,
                         partition=kafka_io.partition_for(key, self.cfg.topics.partitions))


@functools.lru_cache(maxsize=1 << 16)
def _partition_for(key: bytes, partitions: int) -> int:
    return kafka_io.partition_for(key, partitions)  # pure-Python murmur2: cached, users repeat


class _PartitionWriter(StatefulSinkPartition[OutBatch, None]):
    def __init__(self, cfg: Config, key: str, p: int, stats: _Stats, sink: LabelsSink):
        self.cfg, self.key, self.p, self.stats, self.sink = cfg, key, p, stats, sink
        self.producer = sink.acquire()  # shared by the process's partitions: one set of threads, bigger batches
        self.last_flush = time.monotonic()

    def write_batch(self, values: list[OutBatch]) -> None:
        t, n, produce = self.cfg.topics, self.cfg.topics.partitions, self.producer.produce
        examples, dead, p = t.examples, t.dead_letters, self.p % n
        for batch in values:
            for kind, key, value in batch.records:
                topic, part = (examples, _partition_for(key, n)) if kind == join.EXAMPLE else (dead, p)
                try:
                    produce(topic, value, key, part)  # positional: no kwargs parsing on the hot path
                except BufferError:
                    kafka_io.produce(self.producer, topic, value, key=key, partition=part)
            self.stats.update(self.key, batch)
        self.producer.poll(0)
        self.stats.maybe_publish(self.producer)
        if time.monotonic() - self.last_flush > 1.0:
            self.producer.flush(30)
            self.last_flush = time.monotonic()

    def snapshot(self) -> None:
        # Everything before this epoch's source offsets is written before they are saved: at-least-once.
        kafka_io.flush_all(self.producer, f"labels sink partition {self.p}", log)

    def close(self) -> None:
        self.stats.maybe_publish(self.producer, force=True)
        kafka_io.flush_all(self.producer, f"labels sink partition {self.p}", log)
        self.producer = None
        self.sink.release()


class LabelsSink(FixedPartitionedSink[OutBatch, None]):
    """One writer per partition key, one producer per process; items stay on the worker that joined them."""

    def __init__(self, cfg: Config):
        self.cfg, self.stats = cfg, _Stats(cfg)
        self.producer, self.users, self.lock = None, 0, threading.Lock()
        n = cfg.topics.partitions
        self.keys = [part_key(p, n) for p in range(n)]

    def acquire(self):
        with self.lock:  # worker threads build their parts concurrently
            if self.producer is None:
                self.producer = kafka_io.make_producer(self.cfg.kafka.bootstrap_servers, self.cfg.kafka.client)
            self.users += 1
            return self.producer

    def release(self) -> None:
        with self.lock:  # the last writer drops the producer: no broker connection outlives the flow
            self.users -= 1
            if self.users == 0:
                self.producer = None

    def list_parts(self) -> list[str]:
        return list(self.keys)

    def part_fn(self, item_key: str) -> int:
        return sorted(self.keys).index(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _PartitionWriter:
        return _PartitionWriter(self.cfg, for_part, self.keys.index(for_part), self.stats, self)


# ----------------------------------------------------------------------------------------------------- flow

def build_flow(cfg: Config, *, bounded: bool) -> Dataflow:
    """The labels dataflow over ``cfg.topics`` (see the module docstring for its shape)."""
    if not cfg.kafka.bootstrap_servers:
        raise ValueError(NO_BROKER)
    jcfg = join.JoinConfig.from_config(cfg)  # validates policy and windows before anything starts
    flow = Dataflow("labels")
    batches = op.input("labels_input", flow, KafkaPartitionsSource(cfg, bounded))
    keys = [part_key(p, cfg.topics.partitions) for p in range(cfg.topics.partitions)]
    keyed = op.key_on("labels_key", batches, lambda b: keys[b.partition])

    def builder(snap):
        return _JoinLogic(join.JoinState.restore(snap) if snap is not None else join.JoinState(jcfg), bounded)

    joined = op.stateful_batch("labels_join", keyed, builder)
    op.output("labels_output", joined, LabelsSink(cfg))
    return flow


def _recovery(cfg: Config):
    if not cfg.labels.recovery_dir:
        return None
    from bytewax.recovery import RecoveryConfig, init_db_dir

    d = Path(cfg.labels.recovery_dir)
    if not d.exists() or not any(d.iterdir()):
        d.mkdir(parents=True, exist_ok=True)
        init_db_dir(d, 1)  # `python -m bytewax.recovery DIR 1`
    return RecoveryConfig(str(d))


def run_labels(cfg: Config, *, bounded: bool, workers: int = 1, epoch_s: float | None = None,
               process_id: int | None = None, addresses: list[str] | None = None) -> None:
    """Run the dataflow in this process (``workers`` worker threads); returns when a bounded run ends.

    ``process_id``/``addresses``: this process's place in a Bytewax cluster (every process runs the same
    call with its own id; ``addresses[i]`` is ``host:port`` of process ``i``). ``epoch_s``: snapshot interval
    (Bytewax default 10 s), i.e. how much is replayed after a crash.
    """
    if not cfg.kafka.bootstrap_servers:
        raise ValueError(NO_BROKER)
    if workers < 1:
        raise ValueError(f"labels: workers must be >= 1, got {workers}")
    if addresses is not None and not (process_id is not None and 0 <= process_id < len(addresses)):
        raise ValueError(f"labels: process id must be in [0, {len(addresses)}) for {len(addresses)} addresses, "
                         f"got {process_id}")
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions, cfg.kafka.client)
    flow, rec = build_flow(cfg, bounded=bounded), _recovery(cfg)
    epoch = None if epoch_s is None else timedelta(seconds=epoch_s)
    if workers == 1 and addresses is None:
        from bytewax.testing import run_main

        run_main(flow, epoch_interval=epoch, recovery_config=rec)
    else:
        from bytewax.run import cli_main

        cli_main(flow, workers_per_process=workers, process_id=process_id, addresses=addresses,
                 epoch_interval=epoch, recovery_config=rec)


def local_cluster(cfg: Config, processes: int, *, bounded: bool, workers: int = 1, epoch_s: float | None = None,
                  timeout: float | None = None) -> list[int]:
    """Run ``processes`` labels processes on this machine as one Bytewax cluster; returns their exit codes.

    Each child gets this ``cfg`` as a YAML file and ``--process-id i --addresses ...`` on free local ports.
    """
    import subprocess
    import tempfile

    import yaml

    from streams.bus.broker import free_port

    if processes < 1:
        raise ValueError(f"labels: --local-processes must be >= 1, got {processes}")
    addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    with tempfile.TemporaryDirectory(prefix="labels-cluster-") as tmp:
        conf = Path(tmp, "config.yaml")
        conf.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        base = [sys.executable, "-m", "streams.flows.labels", "--config", str(conf), "--workers", str(workers),
                "--processes", str(processes), "--addresses", addresses]
        base += ["--bounded"] if bounded else []
        base += ["--epoch-s", str(epoch_s)] if epoch_s is not None else []
        procs = [subprocess.Popen(base + ["--process-id", str(i)], env=env) for i in range(processes)]
        try:
            return [p.wait(timeout) for p in procs]
        finally:
            for p in procs:  # on error or timeout: stop the children we started, by pid
                if p.poll() is None:
                    p.kill()
                    p.wait()


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.recovery_dir:
        cfg = replace(cfg, labels={"recovery_dir": args.recovery_dir})
    if not cfg.kafka.bootstrap_servers:
        print(f"streamrec labels: {NO_BROKER}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.local_processes:
            codes = local_cluster(cfg, args.local_processes, bounded=args.bounded, workers=args.workers,
                                  epoch_s=args.epoch_s)
            if any(codes):
                print(f"streamrec labels: process exit codes {codes}", file=sys.stderr)
                return 1
        else:
            addresses = args.addresses.split(",") if args.addresses else None
            if addresses is not None and args.processes is not None and len(addresses) != args.processes:
                raise ValueError(f"labels: --processes {args.processes} but {len(addresses)} --addresses")
            run_labels(cfg, bounded=args.bounded, workers=args.workers, epoch_s=args.epoch_s,
                       process_id=args.process_id, addresses=addresses)
    except ValueError as e:
        print(f"streamrec labels: {e}", file=sys.stderr)
        return 2
    log.info("labels finished in %.1fs", time.perf_counter() - t0)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="run the labels dataflow (join impressions, clicks, conversions)",
                       description="Run the Bytewax labels dataflow: read the impressions, clicks and conversions "
                                   "topics partition by partition, join feedback to impressions inside each "
                                   "objective's attribution window, and write labelled examples to the examples "
                                   "topic and bad or unmatched records to the dead_letters topic.")
    p.add_argument("--bounded", action="store_true",
                   help="stop once every input partition is read to its end (default: keep tailing)")
    p.add_argument("--workers", type=int, default=1, help="Bytewax worker threads in this process (default 1)")
    p.add_argument("--recovery-dir", metavar="DIR", default=None,
                   help="Bytewax recovery directory (created and initialised if empty); overrides "
                        "labels.recovery_dir")
    p.add_argument("--epoch-s", type=float, default=None,
                   help="snapshot (epoch) interval in seconds; what a crash replays (default: Bytewax's 10 s)")
    g = p.add_argument_group("scale-out (one Bytewax cluster; Kafka partitions spread over all workers)")
    g.add_argument("--processes", type=int, default=None, help="number of processes in the cluster")
    g.add_argument("--process-id", type=int, default=None, help="this process's index in --addresses")
    g.add_argument("--addresses", default=None, metavar="HOST:PORT,...",
                   help="every process's address, in process-id order")
    g.add_argument("--local-processes", type=int, default=0, metavar="N",
                   help="launch an N-process cluster on this machine (free local ports) and wait for it")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.flows.labels [--config FILE] ARGS``: the ``streamrec labels`` command without importing the
    other subcommands (torch etc.), so cluster processes start fast."""
    from streams.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m streams.flows.labels")
    parser.add_argument("--config", metavar="FILE", default=None)
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    args = parser.parse_args(["--config", argv[1], "labels", *argv[2:]] if argv and argv[0] == "--config"
                             else ["labels", *(argv or [])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"streams.flows.labels: {e}", file=sys.stderr)
        return 2
    return run(args, cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
