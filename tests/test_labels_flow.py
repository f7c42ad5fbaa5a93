"""The labels dataflow end to end on the embedded broker: exactly one example per good impression, the
expected labels, every other input a dead letter with a reason; 1 and 2 Bytewax workers."""

from __future__ import annotations

import random
import threading
from collections import Counter

import bytewax.operators as op
import msgspec
import pytest
from bytewax.dataflow import Dataflow
from bytewax.run import cli_main
from bytewax.testing import TestingSink, TestingSource, run_main

from conftest import read_topics
from streams import schema
from streams.bus import kafka_io
from config import replace
from streams.flows.join import MALFORMED
from streams.flows.routing import part_key, route
from streams.flows.service import run_labels

T0 = 1_700_000_000_000
CLICK_W, CONV_W = 60, 600  # seconds
# Well-formed JSON holding the bytes ff fe inside a string, and nesting past msgspec's recursion limit: each
# once escaped the join's decode as an exception and stopped the flow.
POISON_UTF8 = (b'{"type":"impression","event_id":"i\xff\xfe","ts":%d,"user_id":1,"ad_id":1,"campaign_id":1,'
               b'"advertiser_id":1,"domain":"feed","country":"\xff\xfe"}' % T0)
POISON_DEEP = b'{"type":"click","event_id":"d","junk":' + b"[" * 5000 + b"]" * 5000 + b"}"


def _workload(cfg, n_imps: int = 1500, seed: int = 7):
    """Hand-built events: returns (messages [(topic, partition, value)], expected labels, expected dead letters)."""
    rng = random.Random(seed)
    t, parts = cfg.topics, cfg.topics.partitions
    per_topic = {t.impressions: [], t.clicks: [], t.conversions: []}  # (ts, partition, bytes)
    expected: dict[str, tuple[int, int]] = {}
    dead = Counter()
    for k in range(n_imps):
        user = rng.randrange(200)
        p = kafka_io.partition_for(str(user).encode(), parts)
        ts = T0 + k * 2_000 + rng.randrange(1_000)
        imp = schema.Impression(event_id=f"i{k}", ts=ts, user_id=user, ad_id=rng.randrange(50), campaign_id=1,
                                advertiser_id=1, domain=rng.choice(schema.DOMAINS))
        per_topic[t.impressions].append((ts, p, schema.encode(imp)))
        if rng.random() < 0.03:  # the same impression twice
            per_topic[t.impressions].append((ts, p, schema.encode(imp)))
            dead["duplicate"] += 1
        click = conv = 0
        r = rng.random()
        if r < 0.3:  # in-window click (some before the impression in arrival order: see the jitter below)
            c = schema.Click(event_id=f"c{k}", impression_id=imp.event_id, ts=ts + rng.randrange(CLICK_W * 1000),
                             user_id=user)
            per_topic[t.clicks].append((c.ts - rng.randrange(3_000), p, schema.encode(c)))
            click = 1
            if rng.random() < 0.05:
                per_topic[t.clicks].append((c.ts, p, schema.encode(c)))
                dead["duplicate"] += 1
        elif r < 0.35:  # too late for the click window: a dead letter, label stays 0
            c = schema.Click(event_id=f"c{k}", impression_id=imp.event_id,
                             ts=ts + CLICK_W * 1000 + 1 + rng.randrange(10_000), user_id=user)
            per_topic[t.clicks].append((c.ts, p, schema.encode(c)))
            dead["outside"] += 1
        if rng.random() < 0.1:
            v = schema.Conversion(event_id=f"v{k}", impression_id=imp.event_id,
                                  ts=ts + rng.randrange(CONV_W * 1000), user_id=user, value=1.0)
            per_topic[t.conversions].append((v.ts, p, schema.encode(v)))
            conv = 1
        expected[imp.event_id] = (click, conv)
        if rng.random() < 0.01:  # feedback for an impression that never comes
            o = schema.Click(event_id=f"o{k}", impression_id=f"missing{k}", ts=ts + 5, user_id=user)
            per_topic[t.clicks].append((o.ts, p, schema.encode(o)))
            dead["orphan"] += 1
    msgs = []
    for topic, rows in per_topic.items():
        rows.sort(key=lambda r: r[0])  # arrival order by (jittered) time: clicks may precede their impression
        msgs += [(topic, p, v) for _, p, v in rows]
    n_good = len(msgs)
    for k in range(n_good * 5 // 100):  # ~5% bad raw messages
        topic = rng.choice(list(per_topic))
        bad = rng.choice([b"\x00\xffgarbage", b'{"type": "impression", "event_id": ""}',
                          b'{"type": "click", "event_id": "x", "impression_id": "y", "ts": 5, "user_id": 1}',
                          POISON_UTF8, POISON_DEEP])
        msgs.insert(rng.randrange(len(msgs)), (topic, rng.randrange(parts), bad))
        dead["bad"] += 1
    return msgs, expected, dead


def _produce(cfg, msgs) -> None:
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    last = max(schema.decode(v).ts for _, _, v in msgs if not isinstance(schema.decode(v), schema.Invalid))
    for topic, p, value in msgs:
        kafka_io.produce(producer, topic, value, partition=p)
    wm = schema.encode(schema.Watermark(ts=last + 2 * CONV_W * 1000))
    for topic in cfg.topics.input_topics():
        for p in range(cfg.topics.partitions):
            kafka_io.produce(producer, topic, wm, partition=p)
    assert producer.flush(30) == 0


def _read_all(cfg, topic: str, kind) -> list:
    return [(m.partition(), m.key(), schema.decode(m.value(), kind)) for m in read_topics(cfg, topic)]


def _category(reason: str) -> str:
    if reason.startswith("duplicate event_id"):
        return "duplicate"
    if "outside attribution window" in reason:
        return "outside"
    if reason.startswith("orphan click"):
        return "orphan"
    assert reason.split(":")[0] in {"schema", "unparseable", "invalid"}, reason
    return "bad"


@pytest.fixture(scope="module")
def produced(tmp_path_factory, broker):
    from conftest import make_config

    cfg = make_config(tmp_path_factory.mktemp("labels"), broker,
                      labels={"click_window_s": CLICK_W, "conversion_window_s": CONV_W, "batch_size": 500})
    kafka_io.ensure_topics(broker, cfg.topics.all(), cfg.topics.partitions)
    msgs, expected, dead = _workload(cfg)
    _produce(cfg, msgs)
    return cfg, msgs, expected, dead


@pytest.mark.parametrize("workers", [1, 2])
def test_bounded_flow_labels_every_impression_once(produced, workers):
    cfg, msgs, expected, dead = produced
    cfg = replace(cfg, topics={"examples": f"{cfg.topics.examples}_w{workers}",
                               "dead_letters": f"{cfg.topics.dead_letters}_w{workers}",
                               "service_stats": f"{cfg.topics.service_stats}_w{workers}"})
    run_labels(cfg, bounded=True, workers=workers)

    examples = _read_all(cfg, cfg.topics.examples, schema.Example)
    ids = [e.example_id for _, _, e in examples]
    assert len(ids) == len(set(ids)) == len(expected)  # exactly one example per good impression
    got = {e.example_id: (e.click, e.conversion) for _, _, e in examples}
    assert got == expected
    for p, key, e in examples:
        assert key == str(e.impression.user_id).encode()
        assert p == kafka_io.partition_for(key, cfg.topics.partitions)
        assert e.decided in ("window_closed", "end_of_stream") and e.emitted_ts > 0
    decided = Counter(e.decided for _, _, e in examples)
    assert decided["window_closed"] > decided["end_of_stream"] > 0

    letters = [d for _, _, d in _read_all(cfg, cfg.topics.dead_letters, schema.DeadLetter)]
    assert Counter(_category(d.reason) for d in letters) == dead
    assert all(d.topic in cfg.topics.input_topics() and d.offset >= 0 and d.raw for d in letters)
    raw_bad = Counter(v for _, _, v in msgs if isinstance(schema.decode(v), schema.Invalid))
    assert {d.step for d in letters} == {"labels.join"}
    assert Counter(d.raw for d in letters if d.reason.split(":")[0] in MALFORMED) == raw_bad

    stats = [s for _, _, s in _read_all(cfg, cfg.topics.service_stats, schema.ServiceStats)]
    final = stats[-1].values
    assert stats[-1].component == "labels"
    assert final["events_in"] == len(msgs)  # inputs = used + dead letters (watermarks are not events)
    assert final["examples_out"] == len(expected) and final["dead_letters"] == sum(dead.values())
    assert final["pending_impressions"] == 0
    by_reason = {k: v for k, v in final.items() if k.startswith("dead.")}  # a counter per reason category
    assert sum(by_reason.values()) == final["dead_letters"] and by_reason["dead.duplicate event_id"] == dead["duplicate"]


def test_route_matches_bytewax_and_partition_keys_spread():
    keys = [f"k{i}" for i in range(24)] + [str(i) for i in range(4)]
    for workers in (2, 3):
        seen: list = []
        flow = Dataflow("route_probe")
        s = op.input("in", flow, TestingSource([(k, 0) for k in keys]))
        out = op.stateful_map("where", s, lambda st, v: (st, threading.current_thread().ident))
        op.output("out", out, TestingSink(seen))
        cli_main(flow, workers_per_process=workers)
        groups = {}
        for k, ident in seen:
            groups.setdefault(ident, set()).add(k)
        assert sorted(map(frozenset, groups.values()), key=sorted) == sorted(
            (frozenset(k for k in keys if route(k, workers) == w) for w in range(workers)
             if any(route(k, workers) == w for k in keys)), key=sorted)
    assert {route(str(i), 2) for i in range(4)} == {1}  # the trap routing.py avoids: "0".."3" share a worker
    for parts in (2, 4, 8):
        for workers in (2, 4):
            load = Counter(route(part_key(p, parts), workers) for p in range(parts))
            assert max(load.values()) - min(load.values()) <= 1 and len(load) == min(parts, workers)


def test_no_broker_is_a_clear_error(tmp_path):
    from conftest import make_config

    cfg = make_config(tmp_path, "")
    with pytest.raises(ValueError, match="no broker configured"):
        run_labels(cfg, bounded=True)


def test_recovery_resumes_from_snapshot_offsets(cfg, tmp_path):
    cfg = replace(cfg, labels={"recovery_dir": str(tmp_path / "recovery")})
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)

    def produce(ks):
        for k in ks:
            imp = schema.Impression(event_id=f"i{k}", ts=T0 + k * 1000, user_id=k, ad_id=1, campaign_id=1,
                                    advertiser_id=1, domain="feed")
            key = str(k).encode()
            kafka_io.produce(producer, cfg.topics.impressions, schema.encode(imp), key=key,
                             partition=kafka_io.partition_for(key, cfg.topics.partitions))
        assert producer.flush(30) == 0

    produce(range(300))
    run_labels(cfg, bounded=True)
    run_labels(cfg, bounded=True)  # resumes at the end: nothing is emitted twice
    produce(range(300, 400))
    run_labels(cfg, bounded=True)  # only the new impressions
    ids = [e.example_id for _, _, e in _read_all(cfg, cfg.topics.examples, schema.Example)]
    assert sorted(ids) == sorted(f"i{k}" for k in range(400))


def test_source_pauses_topics_that_run_ahead_in_event_time(cfg):
    """Clicks (few messages, fast event time) and impressions (many) read at equal message rates drift apart;
    the source pauses the topic-partition ahead, so the join's orphan buffer stays bounded."""
    from streams.flows.connectors import _PartitionReader

    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for k in range(3000):  # impressions: 1 s apart; clicks: 1 per 20 impressions, 1 s after theirs
        imp = schema.Impression(event_id=f"i{k}", ts=T0 + k * 1000, user_id=1, ad_id=1, campaign_id=1,
                                advertiser_id=1, domain="feed")
        kafka_io.produce(producer, cfg.topics.impressions, schema.encode(imp), partition=0)
        if k % 20 == 0:
            c = schema.Click(event_id=f"c{k}", impression_id=imp.event_id, ts=imp.ts + 1000, user_id=1)
            kafka_io.produce(producer, cfg.topics.clicks, schema.encode(c), partition=0)
    assert producer.flush(30) == 0
    del producer

    def max_lead(slack_s: float) -> float:
        # small fetches interleave the two topics the way a long-running stream does
        small = {"max.partition.fetch.bytes": "4000", "fetch.max.bytes": "8000", "message.max.bytes": "8000"}
        reader = _PartitionReader(replace(cfg, labels={"batch_size": 10}, kafka={"client": small}), 0, None,
                                  bounded=True)
        reader.slack_ms = int(slack_s * 1000)
        head, lead = {}, 0
        try:
            while True:
                try:
                    batches = reader.next_batch()
                except StopIteration:
                    break
                for b in batches:
                    for topic, _, _, v in b.msgs:
                        head[topic] = max(head.get(topic, 0), schema.decode(v).ts)
                if len(head) == 2:
                    lead = max(lead, head[cfg.topics.clicks] - head[cfg.topics.impressions])
        finally:
            reader.close()
        assert reader.next[cfg.topics.impressions] == 3000 and reader.next[cfg.topics.clicks] == 150
        return lead / 1000, reader.pauses

    lead, pauses = max_lead(60)
    assert lead <= 60 + 10 * 20 and pauses > 0  # at most slack + one batch (10 clicks x 20 s) ahead


def test_records_from_the_future_do_not_pause_their_topic(cfg):
    """A record stamped after the wall clock's future tolerance (a malformed ts past 2100, a valid impression two
    days ahead) is a dead letter for the join and no event time for the pacing either: the source once took its
    ts as the topic's head, which only ever grows, so the topic-partition stayed paused while any other topic
    had data (feedback then ran the whole log ahead of its impressions, into the orphan buffer)."""
    import time

    from streams.flows.connectors import _PartitionReader
    from streams.sources.hostile import DEFECTS

    future_ts = next(d for d in DEFECTS if d.topic_kind == "impression" and d.name == "future_ts")
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    far = int(time.time() * 1000) + 2 * 86_400_000
    for k in range(2000):  # impressions 1 s apart, a click per 20 of them; from the 1000th, 20 from the future
        imp = schema.Impression(event_id=f"i{k}", ts=T0 + k * 1000, user_id=1, ad_id=1, campaign_id=1,
                                advertiser_id=1, domain="feed")
        kafka_io.produce(producer, cfg.topics.impressions, schema.encode(imp), partition=0)
        if k == 1000:
            for j in range(20):
                fut = schema.encode(msgspec.structs.replace(imp, event_id=f"f{j}", ts=far))
                bad = future_ts.damage(fut, msgspec.json.decode(fut), None)
                kafka_io.produce(producer, cfg.topics.impressions, fut if j % 2 else bad, partition=0)
        if k % 20 == 0:
            c = schema.Click(event_id=f"c{k}", impression_id=imp.event_id, ts=imp.ts + 1000, user_id=1)
            kafka_io.produce(producer, cfg.topics.clicks, schema.encode(c), partition=0)
    assert producer.flush(30) == 0
    del producer
    small = {"max.partition.fetch.bytes": "4000", "fetch.max.bytes": "8000", "message.max.bytes": "8000"}
    reader = _PartitionReader(replace(cfg, labels={"batch_size": 10}, kafka={"client": small}), 0, None,
                              bounded=True)
    head, lead = {}, 0
    try:
        while True:
            try:
                batches = reader.next_batch()
            except StopIteration:
                break
            for b in batches:
                for topic, _, _, v in b.msgs:
                    ev = schema.decode(v)
                    if not isinstance(ev, schema.Invalid) and ev.ts < far:
                        head[topic] = max(head.get(topic, 0), ev.ts)
            if len(head) == 2:
                lead = max(lead, head[cfg.topics.clicks] - head[cfg.topics.impressions])
    finally:
        reader.close()
    assert reader.next[cfg.topics.impressions] == 2020 and reader.next[cfg.topics.clicks] == 100
    assert lead / 1000 <= 60 + 10 * 20  # as without them: at most slack + one batch of clicks ahead


def test_the_pacing_head_is_the_largest_valid_time_of_a_batch_end():
    """The source's head of a topic comes from the last records of a batch: only from what the join would take
    (a malformed record's ts may be any time of the log, a valid one from the future is refused), the largest
    of them (a duplicate from an hour ago does not hold it back), and from watermarks whatever their time
    (they reach all three topics alike: the end-of-log mark of a log that held a far-future event is beyond
    the future tolerance, and skipping it left a topic paused at the end of every such bounded run)."""
    from streams.flows.connectors import _head_ts

    def imp(ts, ad_id=1):
        return schema.encode(schema.Impression(event_id=f"i{ts}", ts=ts, user_id=1, ad_id=ad_id, campaign_id=1,
                                               advertiser_id=1, domain="feed"))

    latest = T0 + 10**9
    bad = imp(T0 + 3_600_000).replace(b'"ad_id":1', b'"ad_id":-1')  # schema: negative id, a plausible ts
    mark = schema.encode(schema.Watermark(ts=latest + 1, source=schema.END_OF_LOG))

    def head(*values):
        msgs = [("imp", 0, k, v) for k, v in enumerate(values)]
        return _head_ts(msgs, len(msgs) - 1, latest)

    assert head(imp(T0), bad) == T0
    assert head(imp(T0 + 10), imp(T0)) == T0 + 10
    assert head(imp(T0), imp(latest + 1)) == T0
    assert head(imp(T0), mark) == latest + 1
    assert head(bad, b"{") is None


def test_the_flow_runs_on_bytewax_testing_source_and_sink():
    from streams.flows import join
    from streams.flows.labels import build_flow

    jcfg = join.JoinConfig(("imp", "clk", "cnv"), click_window_ms=60_000, conversion_window_ms=60_000,
                           future_tolerance_ms=None)

    def msg(topic, offset, ev):
        return (topic, 0, offset, schema.encode(ev))

    batches = []
    for p in range(2):
        imps = [schema.Impression(event_id=f"i{p}-{k}", ts=T0 + k, user_id=p, ad_id=1, campaign_id=1,
                                  advertiser_id=1, domain="feed") for k in range(5)]
        click = schema.Click(event_id=f"c{p}", impression_id=f"i{p}-0", ts=T0 + 10, user_id=p)
        batches.append(join.SourceBatch(p, tuple(msg("imp", k, e) for k, e in enumerate(imps))
                                        + (msg("clk", 0, click), ("imp", 0, 9, b"{bad")), frozenset()))
    out: list = []
    run_main(build_flow(jcfg, TestingSource(batches), TestingSink(out), partitions=2, bounded=True))
    records = [r for _, batch in out for r in batch.records]
    examples = {schema.decode(v, schema.Example).example_id: schema.decode(v, schema.Example).click
                for kind, _, v in records if kind == join.EXAMPLE}
    dead = [schema.decode(v, schema.DeadLetter) for kind, _, v in records if kind == join.DEAD]
    assert examples == {f"i{p}-{k}": int(k == 0) for p in range(2) for k in range(5)}
    assert [(d.step, d.reason.split(":")[0]) for d in dead] == [("labels.join", "unparseable")] * 2
    assert {key for key, _ in out} == {part_key(0, 2), part_key(1, 2)}
