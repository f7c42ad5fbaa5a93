"""Push events into the bus: the one place that produces input records (``streamrec replay`` and
``streamrec generate`` both go through :class:`Publisher`).

Placement rules (what the labels dataflow relies on):

* value = ``schema.encode(ev)``, key = ``schema.user_key(ev)``, and an *explicit* partition
  ``kafka_io.partition_for(key, partitions)``, so an impression and its clicks and conversions land in the
  same partition number of the three input topics;
* a :class:`~streams.sources.logfile.BadRecord` goes raw into the topic of its ``topic_kind`` (any partition);
* a :class:`~streams.schema.Watermark` goes to every partition of all three input topics; at the end of a
  finite log an end-of-log mark (``source="end_of_log"``) is sent with ``ts = last_ts + 1 + max(click
  window, conversion window)`` so every pending attribution window of the log closes;
* about once a second (and at the end) a ``ServiceStats(component="replay")`` goes to ``service_stats``.

A replayed log line that does not decode becomes a dead letter (reason with its line number) and the replay
goes on. A native JSONL log goes by blocks of lines: :mod:`streams.sources.lineplan` decides what each line is and
where it goes, :meth:`Publisher.send_plan` produces the block; for a log of :data:`WORKER_MIN_BYTES` or more
a decoder process (:mod:`streams.sources.decode_worker`) plans while this process produces.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from itertools import compress
from operator import length_hint
from pathlib import Path
from typing import Iterable

import msgspec
from tqdm import tqdm

from streams import schema
from streams.bus import kafka_io
from config import NO_BROKER, Config
from streams.names import Component, Stat, Step
from streams.sources import formats
from streams.sources.decode_worker import BLOCK_BYTES, DecoderProcess, NoWorker, planned_blocks
from streams.sources.lineplan import Plan, Router
from streams.sources.logfile import BadRecord, count_lines
from streams.sources.pacing import Pacer, TimeRange, in_range

STATS_EVERY_S = 1.0
# A native log at least this big is decoded by a worker process (:mod:`streams.sources.decode_worker`) while this
# process produces; the worker takes ~0.1 s to start, during which this process decodes the first blocks itself.
WORKER_MIN_BYTES = 8 << 20


class ProduceStats(msgspec.Struct, frozen=True):
    """What one produce run sent. Counts are messages, except ``watermarks`` (records, each fanned out
    to every input partition) and ``dead_letters`` (messages sent to the dead-letter topic)."""

    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    bad_records: int = 0
    watermarks: int = 0
    dead_letters: int = 0
    last_ts: int = 0  # largest event time sent (ms), 0 when none
    final_watermark_ts: int = 0  # 0 when no end-of-log watermark was sent
    elapsed_s: float = 0.0

    @property
    def events(self) -> int:
        return self.impressions + self.clicks + self.conversions

    @property
    def events_per_s(self) -> float:
        return (self.events + self.bad_records) / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ReplayStats(ProduceStats, frozen=True):
    """:class:`ProduceStats` plus what the log reader saw: source rows (non-blank lines, parquet rows)
    and records left out by the time range."""

    lines: int = 0
    skipped: int = 0


def _now_ms() -> int:
    return int(time.time() * 1000)


_drain = deque(maxlen=0).extend  # consume an iterator in C


class Publisher:
    """Incremental producer of input records for one ``Config``; use as a context manager.

    ``send`` takes Impression/Click/Conversion/Watermark/BadRecord; ``dead_letter`` takes a DeadLetter;
    ``finish`` sends the end-of-log watermark, the last stats, flushes, and returns :class:`ProduceStats`.
    """

    def __init__(self, cfg: Config, *, total: int | None = None, progress: bool = True, desc: str = "replay"):
        if not cfg.kafka.bootstrap_servers:
            raise ValueError(NO_BROKER)
        self.cfg = cfg
        t = cfg.topics
        self._topic = {schema.Impression: t.impressions, schema.Click: t.clicks, schema.Conversion: t.conversions}
        self._kind_topic = {"impression": t.impressions, "click": t.clicks, "conversion": t.conversions}
        self._counts = {t.impressions: 0, t.clicks: 0, t.conversions: 0}
        self._topics = (t.impressions, t.clicks, t.conversions)  # by streams.sources.lineplan.TOPIC_INDEX
        self._router = Router(cfg.topics.partitions)  # user id -> partition, cached (user ids repeat: Zipf)
        self._failed: list[str] = []
        self._producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.client,
                                                on_failure=self._on_failure)
        self._produce = self._producer.produce  # positional (topic, value, key, partition): no kwargs parsing
        self._encode = schema.encode
        self._partitions = cfg.topics.partitions
        self._bar = tqdm(total=total, unit="ev", desc=desc, file=sys.stderr, disable=not progress,
                         mininterval=0.5, smoothing=0.1)
        self._shown = 0  # records already counted on the progress bar
        self.bad_records = self.watermarks = self.dead_letters = 0
        self.creatives = 0  # AdCreative records sent to topics.ads
        self.last_ts = 0
        self._max_wm = 0
        self._final_wm = 0
        self._t0 = time.monotonic()
        self._next_stats = self._t0 + STATS_EVERY_S
        self._n = 0

    def _on_failure(self, err, msg) -> None:
        self._failed.append(f"{msg.topic()}[{msg.partition()}]: {err}" if len(self._failed) < 5 else "")

    # -- sending ----------------------------------------------------------------------------------------
    def send(self, rec: msgspec.Struct, value: bytes | None = None) -> None:
        """Produce one record according to the placement rules in the module docstring. ``value``: the
        record's encoding when the caller already has it (a native log line), else it is encoded here."""
        topic = self._topic.get(type(rec))
        if topic is not None:
            key = str(rec.user_id).encode()  # schema.user_key, inlined: this is the hot path
            part = self._router.part(rec.user_id)
            try:
                self._produce(topic, value or self._encode(rec), key, part)
            except BufferError:
                kafka_io.produce(self._producer, topic, value or self._encode(rec), key=key, partition=part)
            self._counts[topic] += 1
            if rec.ts > self.last_ts:
                self.last_ts = rec.ts
        elif isinstance(rec, BadRecord):
            kafka_io.produce(self._producer, self._kind_topic[rec.topic_kind], rec.raw)
            self.bad_records += 1
        elif isinstance(rec, schema.Watermark):
            self._broadcast(rec)
            self.watermarks += 1
            self._max_wm = max(self._max_wm, rec.ts)
        elif isinstance(rec, schema.AdCreative):  # an ad's birth (semantic IDs): topics.ads, keyed by ad id
            kafka_io.produce(self._producer, self.cfg.topics.ads, value or self._encode(rec),
                             key=str(rec.ad_id).encode())
            self.creatives += 1
        else:
            raise TypeError(f"Publisher.send: expected Impression, Click, Conversion, Watermark, AdCreative or "
                            f"BadRecord, got {type(rec).__name__}")
        self._n += 1
        if self._n & 1023 == 0:
            self.heartbeat()

    def send_plan(self, lines: list[bytes], plan: Plan) -> None:
        """Produce the good events and watermarks of a block of native log lines as ``plan`` places them
        (:func:`streams.sources.lineplan.plan_block`, made here or by a decoder worker); ``lines`` = the block's lines.
        The failed lines (``plan.failed``) are the caller's to dead-letter.

        No Python code runs per event: one ``map`` of ``produce`` over the block (a BufferError stops it
        at a known position, that message waits for queue space, and the rest goes on)."""
        if len(lines) != plan.n_lines:
            raise ValueError(f"Publisher.send_plan: the plan of line {plan.first} is for {plan.n_lines} lines, "
                             f"got {len(lines)}")
        tidx = plan.tidx
        vals = list(compress(lines, plan.good)) if plan.good else lines
        keys = plan.keys.split(b" ") if tidx else []
        parts = memoryview(plan.parts).cast("I") if self._partitions > 256 else plan.parts
        start = 0
        for before, i in plan.marks:  # watermarks go out between the events around them
            self._produce_range(tidx, vals, keys, parts, start, before)
            self.send(schema.decode(lines[i], schema.Watermark))
            start = before
        self._produce_range(tidx, vals, keys, parts, start, len(tidx))
        for k, topic in enumerate(self._topics):
            self._counts[topic] += tidx.count(k)
        if plan.max_ts > self.last_ts:
            self.last_ts = plan.max_ts
        self._n += len(tidx)
        self.heartbeat()

    def _produce_range(self, tidx: bytes, vals: list[bytes], keys: list[bytes], parts, a: int, b: int) -> None:
        names, produce = self._topics, self._produce
        while a < b:
            kit = iter(keys[a:b])
            try:
                _drain(map(produce, map(names.__getitem__, tidx[a:b]), vals[a:b], kit, parts[a:b]))
                return
            except BufferError:  # map had taken message j from every iterator when produce refused it
                j = b - 1 - length_hint(kit)
                kafka_io.produce(self._producer, names[tidx[j]], vals[j], key=keys[j], partition=parts[j])
                a = j + 1

    def dead_letter(self, dl: schema.DeadLetter) -> None:
        kafka_io.produce(self._producer, self.cfg.topics.dead_letters, schema.encode(dl))
        self.dead_letters += 1
        self._tick()

    def _tick(self) -> None:
        self._n += 1
        if self._n & 1023 == 0:
            self.heartbeat()

    def _broadcast(self, wm: schema.Watermark) -> None:
        value = schema.encode(wm)
        for topic in self.cfg.topics.input_topics():
            for p in range(self.cfg.topics.partitions):
                kafka_io.produce(self._producer, topic, value, partition=p)

    def heartbeat(self) -> None:
        """Serve delivery callbacks, advance the progress bar, publish stats when a second has passed.
        Called every 1024 records, and by the pacer while it sleeps."""
        self._producer.poll(0)
        self._bar.update(self._n - self._shown)
        self._shown = self._n
        if time.monotonic() >= self._next_stats:
            self._publish_stats()

    def _publish_stats(self) -> None:
        now = time.monotonic()
        self._next_stats = now + STATS_EVERY_S
        s = self.stats()
        values = {Stat.EVENTS_PRODUCED: float(s.events), Stat.EVENTS_PER_S: s.events_per_s,
                  Stat.BAD_RECORDS: float(s.bad_records), Stat.DEAD_LETTERS: float(s.dead_letters),
                  Stat.IMPRESSIONS: float(s.impressions), Stat.CLICKS: float(s.clicks),
                  Stat.CONVERSIONS: float(s.conversions), Stat.LAST_EVENT_TS: float(s.last_ts)}
        ev = schema.ServiceStats(component=Component.REPLAY, ts=_now_ms(), values=values)
        kafka_io.produce(self._producer, self.cfg.topics.service_stats, schema.encode(ev))

    # -- end --------------------------------------------------------------------------------------------
    def stats(self) -> ProduceStats:
        t = self.cfg.topics
        return ProduceStats(impressions=self._counts[t.impressions], clicks=self._counts[t.clicks],
                            conversions=self._counts[t.conversions], bad_records=self.bad_records,
                            watermarks=self.watermarks, dead_letters=self.dead_letters, last_ts=self.last_ts,
                            final_watermark_ts=self._final_wm, elapsed_s=time.monotonic() - self._t0)

    def end_watermark_ts(self) -> int:
        """``last_ts + 1 + max(windows)`` in ms, and never below a watermark already forwarded."""
        lab = self.cfg.labels
        horizon_ms = 1000 * max(lab.click_window_s, lab.conversion_window_s)
        ts = self.last_ts + 1 + horizon_ms if self.last_ts else 0
        return min(max(ts, self._max_wm, schema.MIN_TS_MS), schema.MAX_TS_MS)

    def finish(self, *, watermark: bool = True, timeout_s: float = 60.0) -> ProduceStats:
        """Send the end-of-log watermark (when ``watermark``) and final stats; flush; raise if any
        message failed delivery."""
        if watermark and (self.last_ts or self._max_wm):
            self._final_wm = self.end_watermark_ts()
            self._broadcast(schema.Watermark(ts=self._final_wm, source=schema.END_OF_LOG))
        self._bar.update(self._n - self._shown)
        self._shown = self._n
        self._publish_stats()
        left = self._producer.flush(timeout_s)
        if left:
            raise RuntimeError(f"replay: {left} messages still queued after flushing for {timeout_s:.0f} s "
                               f"(broker {self.cfg.kafka.bootstrap_servers})")
        if self._failed:
            shown = "; ".join(f for f in self._failed if f)
            raise RuntimeError(f"replay: {len(self._failed)} messages failed delivery: {shown}")
        return self.stats()

    def close(self) -> None:
        """Close the progress bar and drop the producer (it holds a callback bound to ``self``, a cycle that
        would keep its broker connections open until the garbage collector runs)."""
        self._bar.close()
        self._producer = self._produce = None  # type: ignore[assignment]

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def produce(cfg: Config, records: Iterable[msgspec.Struct], *, progress: bool = True,
            watermark: bool = True, total: int | None = None) -> ProduceStats:
    """Produce ``records`` (events, watermarks, BadRecords) as fast as possible; see the module docstring."""
    if total is None and hasattr(records, "__len__"):
        total = len(records)  # type: ignore[arg-type]
    with Publisher(cfg, total=total, progress=progress, desc="produce") as pub:
        for rec in records:
            pub.send(rec)
        return pub.finish(watermark=watermark)


def replay_file(cfg: Config, path: str | Path, *, fmt: str = "auto", speed: float | None = None,
                time_range: TimeRange | None = None, options: formats.ReadOptions = formats.ReadOptions(),
                progress: bool = True, watermark: bool = True, parallel: bool | None = None) -> ReplayStats:
    """Replay one log file (``fmt``: a name of :func:`streams.sources.formats.formats`, or ``"auto"``) into the
    input topics, streaming it row by row.

    ``speed=None`` produces as fast as possible; ``speed=X`` paces by event time, X times real time,
    relative to the first event. A line that fails to parse or validate becomes a dead letter
    (``reason = "line N: <why>"`` or ``"<format> line N: <why>"``, ``offset = N``, ``topic = <file name>``);
    it never stops the replay. ``lines`` in the result counts source rows read (good and bad).

    ``parallel``: decode a native JSONL log in a worker process (:mod:`streams.sources.decode_worker`) while this one
    produces; default: when the file has at least :data:`WORKER_MIN_BYTES`. Other formats and paced or
    time-ranged replays run in this process.
    """
    path = Path(path)
    items = formats.read(path, fmt, options)  # raises FileNotFoundError / FormatError before producing
    if speed is None and time_range is None and (fmt == "jsonl" or fmt == "auto" and formats.detect(path) == "jsonl"):
        return _replay_jsonl_fast(cfg, path, progress=progress, watermark=watermark, parallel=parallel)
    pacer = Pacer(speed) if speed is not None else None
    total = count_lines(path) if progress and path.suffix in (".jsonl", ".ndjson") else None
    lab = cfg.labels
    feedback_end = time_range.end + 1000 * max(lab.click_window_s, lab.conversion_window_s) if time_range else 0
    lines, last_line, skipped = 0, -1, 0
    with Publisher(cfg, total=total, progress=progress, desc=f"replay {path.name}") as pub:
        send, Row = pub.send, formats.Row
        for item in items:
            if item.line != last_line:
                lines += 1
                last_line = item.line
            if type(item) is not Row:
                pub.dead_letter(schema.dead_letter(item.reason, item.raw, topic=path.name, offset=item.line,
                                                   ts=_now_ms(), step=Step.REPLAY))
                continue
            if pacer is None and time_range is None and item.raw is not None:
                send(item.records[0], item.raw)  # native line: already our encoding
                continue
            for rec in item.records:
                if time_range is not None and not in_range(rec, time_range, feedback_end):
                    skipped += 1
                    continue
                if pacer is not None and not isinstance(rec, schema.Watermark):
                    pacer.wait(rec.ts, pub.heartbeat)
                send(rec, item.raw if len(item.records) == 1 else None)
        s = pub.finish(watermark=watermark)
    return ReplayStats(**msgspec.structs.asdict(s), lines=lines, skipped=skipped)


def _replay_jsonl_fast(cfg: Config, path: Path, *, progress: bool, watermark: bool,
                       parallel: bool | None) -> ReplayStats:
    """:func:`replay_file` of a native JSONL log as fast as possible: blocks of lines planned
    (:mod:`streams.sources.lineplan`) here or by a decoder worker, and produced by :meth:`Publisher.send_plan`."""
    total = count_lines(path) if progress else None
    if parallel is None:
        parallel = path.stat().st_size >= WORKER_MIN_BYTES
    lines = 0
    with (DecoderProcess(path, cfg.topics.partitions, BLOCK_BYTES) if parallel else NoWorker()) as worker, \
            Publisher(cfg, total=total, progress=progress, desc=f"replay {path.name}") as pub:
        for block_lines, plan in planned_blocks(path, cfg.topics.partitions, worker, BLOCK_BYTES):
            pub.send_plan(block_lines, plan)
            lines += plan.n_lines - plan.blank
            for n, reason in plan.failed:
                pub.dead_letter(schema.dead_letter(f"line {n}: {reason}", block_lines[n - plan.first],
                                                   topic=path.name, offset=n, ts=_now_ms(), step=Step.REPLAY))
        s = pub.finish(watermark=watermark)
    return ReplayStats(**msgspec.structs.asdict(s), lines=lines)


def summary(s: ProduceStats) -> str:
    return (f"{s.impressions} impressions, {s.clicks} clicks, {s.conversions} conversions, "
            f"{s.bad_records} bad records, {s.dead_letters} dead letters, {s.watermarks} watermarks forwarded; "
            f"{s.events_per_s:,.0f} events/s over {s.elapsed_s:.1f} s"
            + (f"; end watermark {s.final_watermark_ts}" if s.final_watermark_ts else ""))


def add_cli(subparsers) -> None:
    names = ", ".join(formats.formats())
    p = subparsers.add_parser("replay", help="replay an event log (ours or a public dataset) into the input topics",
                              description="Replay an event log into the impressions/clicks/conversions topics: "
                                          "our JSONL / Parquet logs (`streamrec generate --out`) or a public "
                                          f"dataset ({names}). Bad lines go to the dead-letter topic with their "
                                          "line number and the replay goes on.")
    p.add_argument("file", help="log file (.jsonl, .parquet, or a public dataset's CSV/TSV, optionally .gz)")
    p.add_argument("--format", default="auto", choices=["auto", *formats.formats()],
                   help="file format (default: auto, from the suffix or the header line)")
    p.add_argument("--speed", type=float, default=None,
                   help="pace by event time, X times real time (default: as fast as possible)")
    p.add_argument("--time-range", nargs=2, metavar=("START", "END"),
                   help="only events with START <= ts < END (ms, s, or ISO dates like 2026-01-01T06:00)")
    p.add_argument("--start", default=None, metavar="TIME",
                   help="first synthetic timestamp for formats without time (default 2026-01-01)")
    p.add_argument("--row-interval-ms", type=int, default=formats.ReadOptions().row_interval_ms,
                   help="synthetic time between rows for formats without time (default %(default)s)")
    p.add_argument("--no-watermark", action="store_true",
                   help="do not send the end-of-log watermark (the log continues later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not cfg.kafka.bootstrap_servers:
        print(f"streamrec replay: {NO_BROKER}", file=sys.stderr)
        return 2
    try:
        rng = TimeRange.parse(*args.time_range) if args.time_range else None
        opts = formats.ReadOptions(start_ts=formats.parse_time(args.start) if args.start else
                                   formats.SYNTH_START_TS, row_interval_ms=args.row_interval_ms)
        kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions,
                               cfg.kafka.client)
        s = replay_file(cfg, args.file, fmt=args.format, speed=args.speed, time_range=rng, options=opts,
                        progress=not args.no_progress, watermark=not args.no_watermark)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"streamrec replay: {e}", file=sys.stderr)
        return 1
    print(f"replayed {s.lines} lines of {args.file}: {summary(s)}"
          + (f"; {s.skipped} records outside the time range" if s.skipped else ""))
    return 0
