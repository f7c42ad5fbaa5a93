"""Hostile input (streams/sources/hostile.py) between good traffic: every kind of the corpus, malformed and
unjoinable, bus-only and heavy ones included, produced raw into the input topic it belongs to.

Each hostile record must become exactly one dead letter whose reason is the one its kind names, no other dead
letter may exist, and every good impression must still become exactly one example with the labels its log
implies: first through the pure join, then through a running stack (storage, broker, dashboard with the
metrics sink, labels, stats, trainer), where no process may die and every example is trained exactly once.

The 3 MB record travels: the embedded broker (Tansu) takes it, on memory and on S3 storage, once the producer's
``message.max.bytes`` allows it; a producer left at librdkafka's default refuses it itself, with a
``KafkaException(MSG_SIZE_TOO_LARGE)`` from ``produce`` (tested below). The join then dead-letters it, as
anything over 64 KiB, as too large before parsing.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from typing import NamedTuple

import numpy as np
import pytest

from deploy.chaos import _expected_labels, _read_with_broker
from deploy.stack import LocalStack, StatsWatcher
from deploy.up import generated_log, stored_predictions
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port
from config import Config, load_config, replace
from streams.flows import join
from streams.sources import hostile
from streams.sources.logfile import BadRecord
from streams.sources.scenarios import ScenarioConfig

IMPRESSIONS = 3_000
UNJOINABLE = 12  # two of each of the 6 kinds
# Tansu takes messages of several MB (hostile.py); librdkafka's producer refuses over 1,000,000 bytes itself
MAX_MESSAGE_BYTES = 8 << 20
Pos = tuple[str, int, int]  # (topic, partition, offset)


class Item(NamedTuple):
    """One message of the log: ``expected`` is the dead letter's reason category (None: good traffic)."""

    topic_kind: str
    value: bytes
    key: bytes | None
    partition: int
    ts: int | None  # event time of an event (good or unjoinable), None for malformed bytes
    expected: str | None = None
    kind: str = ""


def hostile_log(n: int, seed: int, partitions: int, cfg: Config) -> tuple[list, list[Item]]:
    """Good generated traffic with the whole corpus (once each) and ``UNJOINABLE`` unjoinable events mixed in
    (:func:`hostile.interleave`). Events go where the replay puts them (keyed by user, on the user's
    partition); malformed bytes raw on a random partition. Returns (good records, items in produce order)."""
    rng = np.random.default_rng(seed)
    good = generated_log(n, seed, 0.0, ScenarioConfig())
    malformed = hostile.corpus(good, rng)
    assert {(b.topic_kind, b.kind) for b in malformed} == {(d.topic_kind, d.name) for d in hostile.DEFECTS}
    refused = hostile.unjoinable(good, cfg.labels.click_window_s * 1000, int(time.time() * 1000), UNJOINABLE, rng)
    items = []
    for rec in hostile.interleave(good, malformed, refused, rng):
        if isinstance(rec, BadRecord):
            items.append(Item(rec.topic_kind, rec.raw, None, int(rng.integers(partitions)), None,
                              hostile.expected_reason(rec), rec.kind))
        elif isinstance(rec, hostile.Unjoinable):
            items.append(_event_item(rec.event, partitions, rec.reason, rec.kind))
        else:
            items.append(_event_item(rec, partitions))
    return good, items


def _event_item(ev, partitions: int, expected: str | None = None, kind: str = "") -> Item:
    key = schema.user_key(ev)
    return Item(type(ev).__name__.lower(), schema.encode(ev), key, kafka_io.partition_for(key, partitions), ev.ts,
                expected, kind)


def end_of_log(items: list[Item], cfg: Config) -> bytes:
    """The mark a replay ends with (``Publisher.end_watermark_ts``): past every window of the log's events."""
    last = max(it.ts for it in items if it.ts is not None)
    horizon = 1000 * max(cfg.labels.click_window_s, cfg.labels.conversion_window_s)
    return schema.encode(schema.Watermark(ts=last + 1 + horizon, source=schema.END_OF_LOG))


def dead_letter_problems(items: list[Item], where: list[Pos], dead: list[tuple[str, int, int, str]]) -> list[str]:
    """Each hostile item exactly one dead letter of its reason category, and no other dead letter."""
    want = {where[i]: it for i, it in enumerate(items) if it.expected is not None}
    assert len(want) == sum(it.expected is not None for it in items), "two hostile items at one position"
    problems, seen = [], Counter((t, p, o) for t, p, o, _ in dead)
    for t, p, o, reason in dead:
        it = want.get((t, p, o))
        if it is None:
            problems.append(f"a dead letter for no hostile record: {t}[{p}]@{o}: {reason[:120]}")
        elif reason.split(":", 1)[0] != it.expected:
            problems.append(f"{it.topic_kind} {it.kind}: expected {it.expected!r}, got {reason[:120]!r}")
    problems += [f"{it.topic_kind} {it.kind} at {pos}: {seen[pos]} dead letters" for pos, it in want.items()
                 if seen[pos] != 1]
    return problems


# --------------------------------------------------------------------------------------------- pure join

def test_every_hostile_kind_gets_its_reason_from_the_join():
    cfg = load_config(env={})
    t = cfg.topics
    topic = {"impression": t.impressions, "click": t.clicks, "conversion": t.conversions}
    good, items = hostile_log(2_000, 3, 2, cfg)
    offsets: Counter = Counter()
    where: list[Pos] = []
    for it in items:
        pos = (topic[it.topic_kind], it.partition)
        where.append((*pos, offsets[pos]))
        offsets[pos] += 1
    mark = end_of_log(items, cfg)
    jcfg, now = join.JoinConfig.from_config(cfg), int(time.time() * 1000)
    dead, examples = [], Counter()
    for p in range(2):
        msgs = tuple((w[0], p, w[2], it.value) for it, w in zip(items, where) if w[1] == p)
        msgs += tuple((tp, p, offsets[tp, p], mark) for tp in t.input_topics())
        state = join.JoinState(jcfg)
        for k in range(0, len(msgs), 100):
            _, out = join.step(state, join.SourceBatch(p, msgs[k:k + 100], frozenset()), now)
            for kind, _, value in out:
                if kind == join.DEAD:
                    d = schema.decode(value, schema.DeadLetter)
                    dead.append((d.topic, d.partition, d.offset, d.reason))
                else:
                    ex = schema.decode(value, schema.Example)
                    examples[ex.example_id, ex.click, ex.conversion] += 1
    assert dead_letter_problems(items, where, dead) == []
    assert sorted(examples) == sorted((k, *v) for k, v in _expected_labels(good).items())
    assert set(examples.values()) == {1}


# --------------------------------------------------------------------------------------- the heavy record

def test_the_broker_takes_the_heavy_record_from_a_producer_that_allows_it(cfg):
    heavy = next(d for d in hostile.DEFECTS if d.where == "heavy")
    good = generated_log(100, 1, 0.0, ScenarioConfig())
    raw = hostile.make_bad_records(good, 1, np.random.default_rng(0), where=("heavy",))[0].raw
    assert len(raw) > 3_000_000 and heavy.reason == hostile.TOO_LARGE
    topic = cfg.topics.impressions
    with pytest.raises(kafka_io.KafkaException, match="MSG_SIZE_TOO_LARGE"):  # librdkafka's own limit: 1,000,000
        kafka_io.make_producer(cfg.kafka.bootstrap_servers).produce(topic, raw, None, 0)
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers, **{"message.max.bytes": MAX_MESSAGE_BYTES})
    producer.produce(topic, raw, None, 0)
    assert producer.flush(60) == 0 and producer.failed == 0
    from conftest import read_topics

    assert [m.value() for m in read_topics(cfg, topic)] == [raw]


# ---------------------------------------------------------------------------------------- running stack

def produce(cfg: Config, items: list[Item]) -> list[Pos]:
    """Produce ``items`` raw, in order, with one producer (so each partition keeps their order), then the
    end-of-log mark on every input partition; returns where each item landed, from its delivery report."""
    t = cfg.topics
    topic = {"impression": t.impressions, "click": t.clicks, "conversion": t.conversions}
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.client,
                                      **{"message.max.bytes": MAX_MESSAGE_BYTES,
                                         "delivery.report.only.error": False})
    where: list[Pos | None] = [None] * len(items)
    failed: list[str] = []

    def delivered(i: int):
        def report(err, msg) -> None:
            if err is None:
                where[i] = (msg.topic(), msg.partition(), msg.offset())
            else:
                failed.append(f"{items[i].kind or items[i].topic_kind}: {err}")
        return report

    for i, it in enumerate(items):
        while True:
            try:
                producer.produce(topic[it.topic_kind], it.value, it.key, it.partition, on_delivery=delivered(i))
                break
            except BufferError:
                producer.poll(0.05)
    mark = end_of_log(items, cfg)
    for tp in t.input_topics():
        for p in range(t.partitions):
            kafka_io.produce(producer, tp, mark, partition=p)
    assert producer.flush(120) == 0
    assert failed == [], f"the broker refused hostile records: {failed}"
    assert None not in where
    return where  # type: ignore[return-value]


def _sink_counters(url: str) -> dict:
    try:
        with urllib.request.urlopen(f"{url}healthz", timeout=10) as r:
            return json.load(r).get("counters", {})
    except (OSError, ValueError):
        return {}


def _stored_dead_letters(cfg: Config) -> list[tuple[str, int, int, str]]:
    from dashboards.store import Store

    store = Store.open(cfg.clickhouse_url(), cfg.metrics.database)
    try:
        rows = store.query("SELECT topic, partition, offset, reason FROM {db}.dead_letters FINAL").rows
        return [(str(t), int(p), int(o), str(r)) for t, p, o, r in rows]
    finally:
        store.close()


@pytest.mark.slow
def test_hostile_input_into_a_running_stack_is_dead_lettered_and_nothing_else_changes(tmp_path):
    from trainer import checkpoint

    cfg = replace(load_config(env={}), data_dir=str(tmp_path), kafka={"bootstrap_servers": ""},
                  trainer={"checkpoint_every_s": 5.0})
    stack = LocalStack(cfg, tmp_path / "runs" / "hostile", fresh=True, port=free_port(),
                       trainer_args=("--record-trained-ids",), labels_args=("--epoch-s", "2"))
    good, items = hostile_log(IMPRESSIONS, 11, cfg.topics.partitions, cfg)
    n_hostile = sum(it.expected is not None for it in items)
    assert n_hostile == len(hostile.DEFECTS) + UNJOINABLE
    assert {it.kind for it in items if it.expected} >= {"empty", "blank", "multi_megabyte_field"}  # bus, heavy
    try:
        cfg = stack.start()
        url = f"http://{cfg.dashboard.host}:{cfg.dashboard.port}/"
        watcher = StatsWatcher(cfg)
        where = produce(cfg, items)

        def settled() -> bool:  # every example trained and stored, every dead letter stored
            watcher.poll()
            return (watcher.value("trainer", "examples_trained") >= IMPRESSIONS
                    and watcher.value("labels", "dead_letters") >= n_hostile
                    and stored_predictions(url, 0) >= 2 * IMPRESSIONS
                    and _sink_counters(url).get("rows_dead_letters", 0) >= n_hostile)

        assert stack.sup.wait_until(settled, 300), "the stack did not finish the log within 300 s"
        alive = {c.name: c.alive() for c in stack.sup.children}
        watcher.close()
    finally:
        stack.stop()
    restarts = {c.name: c.restarts for c in stack.sup.children}
    assert all(alive.values()) and set(restarts.values()) == {0}, (alive, restarts)
    # -- from what the processes left: the store, the examples topic, the trainer's last checkpoint
    assert dead_letter_problems(items, where, _stored_dead_letters(cfg)) == []
    expected = _expected_labels(good)
    read = _read_with_broker(stack, cfg, {cfg.topics.examples: schema.Example})[cfg.topics.examples]
    examples = Counter((e.example_id, e.click, e.conversion) for e in read)
    assert sorted(examples) == sorted((k, *v) for k, v in expected.items())
    assert set(examples.values()) == {1}
    found = checkpoint.load_latest(stack.dirs["checkpoints"])
    trained = Counter(found[1]["trained_ids"]) if found else Counter()
    assert set(trained) == set(expected) and set(trained.values()) == {1}
