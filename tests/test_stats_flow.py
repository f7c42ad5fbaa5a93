"""The stats dataflow: window statistics on lists (pure + TestingSource) against numpy, cheap snapshots, the
records through the real metrics sink into chDB and the drift / label-delay SQL, and once through the broker."""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import numpy as np
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from conftest import read_topics
from dashboards import queries as q
from dashboards.sink import MetricsSink
from streams import schema
from streams.bus import kafka_io
from streams.flows.service import run_labels, run_stats
from streams.flows.stats import (DELAY_EDGES_S, DENSE_EDGES, WINDOW_MS, StatsBatch, StatsState, bucket_quantiles,
                                 build_stats_flow, misra_gries, restore, stats_topic)
from streams.sources import generate

T0 = 1_767_225_600_000
NOW = int(time.time()) * 1000  # whole seconds: a clock of NOW / 1000 stamps exactly NOW
BUCKET = float(DENSE_EDGES[1] - DENSE_EDGES[0])  # 0.25


def _examples(n=3000, seed=0, t0=T0, shift=0.0, prefix="i"):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ts = t0 + k * 50  # 20 per second -> 1200 per minute window
        click = int(rng.random() < 0.2)
        conv = int(click and rng.random() < 0.3)
        dense = [float(rng.normal() + shift), float(k % 4)] if k % 10 else [float(rng.normal() + shift)]  # 10% short
        imp = schema.Impression(event_id=f"{prefix}{k}", ts=ts, user_id=int(rng.zipf(1.5) % 1000),
                                ad_id=int(rng.integers(100)), campaign_id=7 if k % 3 else int(rng.integers(50)),
                                advertiser_id=1, domain=schema.DOMAINS[k % 2], dense=dense)
        out.append(schema.Example(example_id=imp.event_id, impression=imp, click=click, conversion=conv,
                                  click_ts=ts + int(rng.integers(2_000, 400_000)) if click else None,
                                  conversion_ts=ts + int(rng.integers(600_000, 20_000_000)) if conv else None,
                                  decided="window_closed"))
    return out


def _late_conversion(ex: schema.Example, conv_ts: int) -> schema.Example:
    """An ES-DFM correction (streams/flows/join.py): the click left with the elapsed example, the conversion now."""
    return schema.Example(example_id=ex.example_id + "#late-conversion", impression=ex.impression, click=1,
                          conversion=1, click_ts=ex.impression.ts + 30_000, conversion_ts=conv_ts,
                          decided="late_positive")


def _window(ts):
    return ts - ts % WINDOW_MS


def _by_feature(records):
    return {(r.window_start, r.domain, r.feature): r for r in records}


def _same(a: list[schema.FeatureStats], b: list[schema.FeatureStats]) -> bool:
    """Equal records, moments up to rounding (batches merged in another order sum in another order); heavy
    hitters are a summary whose counters depend on the batching (each within its bound): not compared."""
    approx = {"mean", "std", "value", "quantiles", "items", "item_counts", "count"}
    strip = lambda r: {k: v for k, v in msgspec.structs.asdict(r).items()  # noqa: E731
                       if k not in approx or (k == "count" and r.kind != "heavy_hitters")}
    return [strip(r) for r in a] == [strip(r) for r in b] and all(
        np.allclose(np.array([getattr(x, k) for k in ("value", "mean", "std") if getattr(x, k) is not None]),
                    np.array([getattr(y, k) for k in ("value", "mean", "std") if getattr(y, k) is not None]),
                    rtol=1e-12, atol=1e-12) and np.allclose(x.quantiles, y.quantiles, rtol=1e-12, atol=1e-12)
        for x, y in zip(a, b))


def test_window_statistics_match_a_reference():
    exs = _examples()
    late = _late_conversion(exs[5], T0 + 100_000)
    raws = [schema.encode(e) for e in exs]
    st = StatsState(partition=0)
    out = []
    for k in range(0, len(raws), 700):
        out += st.step(raws[k:k + 700] + ([schema.encode(late), b"{bad"] if k == 0 else []), now_ms=NOW)
    out += st.step([], now_ms=NOW, final=True)
    assert st.counts["invalid"] == 1 and not st.open
    assert [schema.check(r) for r in out] == [None] * len(out)  # every record passes the sink's validation
    recs = _by_feature(out)
    assert len(recs) == len(out) and len({r.stats_id for r in out}) == len(out)  # one record per id
    for dom in ("feed", "stories"):
        sel = [e for e in exs if e.impression.domain == dom]
        for w, n in Counter(_window(e.impression.ts) for e in sel).items():
            in_w = [e for e in sel if _window(e.impression.ts) == w]
            assert recs[(w, dom, "count")].count == n
            clicks = sum(e.click for e in in_w)
            assert recs[(w, dom, "label.click")].count == clicks
            assert recs[(w, dom, "label.click")].value == pytest.approx(clicks / n, abs=1e-12)
            for j in (0, 1):
                h = recs[(w, dom, f"dense.{j}")]
                vals = np.array([e.impression.dense[j] for e in in_w if len(e.impression.dense) > j])
                assert (h.count, h.missing) == (len(vals), n - len(vals)) and sum(h.counts) == len(vals)
                assert h.counts == np.bincount(np.searchsorted(DENSE_EDGES, vals, "right"),
                                               minlength=len(DENSE_EDGES) + 1).tolist()
                assert (h.mean, h.std) == (pytest.approx(vals.mean(), abs=1e-12), pytest.approx(vals.std(), abs=1e-12))
                assert (h.min, h.max) == (vals.min(), vals.max())
                # the bucket holding the rank holds the quantile (smallest value with F(x) >= q): off by < 1 bucket
                want = np.quantile(vals, schema.FEATURE_QUANTILES, method="inverted_cdf")
                assert np.all(np.abs(np.array(h.quantiles) - want) <= BUCKET), (h.quantiles, want)
            d = recs[(w, dom, "delay.click")]
            delays = np.array([(e.click_ts - e.impression.ts) / 1000 for e in in_w if e.click_ts is not None])
            assert d.counts == np.bincount(np.searchsorted(DELAY_EDGES_S, delays, "right"),
                                           minlength=len(DELAY_EDGES_S) + 1).tolist()
            assert d.count == clicks and (d.mean, d.min, d.max) == (pytest.approx(delays.mean()), delays.min(),
                                                                    delays.max())
            hh = recs[(w, dom, "hh.campaign_id")]
            assert hh.items[0] == 7 and hh.count == sum(hh.item_counts)  # two thirds of the traffic
    # the correction counts as a late positive and with its conversion delay only, where its label arrived
    late_w = _window(T0 + 100_000)
    assert recs[(late_w, "stories", "late_positive")].count == 1
    conv = [e for e in exs if e.conversion_ts is not None]
    assert sum(r.count for r in out if r.feature == "delay.conversion") == len(conv) + 1
    assert sum(r.count for r in out if r.feature == "delay.click") == sum(e.click for e in exs)


def test_bucket_quantiles_of_a_constant_are_the_constant():
    counts = np.bincount(np.searchsorted(DENSE_EDGES, [0.3] * 5, "right"), minlength=len(DENSE_EDGES) + 1)
    assert bucket_quantiles(counts, DENSE_EDGES, 0.3, 0.3) == [0.3, 0.3, 0.3]


def test_misra_gries_keeps_every_frequent_item_within_its_bound():
    rng = np.random.default_rng(1)
    ids = rng.zipf(1.3, 20_000) % 5000
    items, counts = np.array([], np.int64), np.array([], np.int64)
    for chunk in np.array_split(ids, 7):
        items, counts = misra_gries(items, counts, chunk, k=32)
    true = Counter(ids.tolist())
    est = dict(zip(items.tolist(), counts.tolist()))
    for item, c in true.items():
        assert est.get(item, 0) <= c and c - est.get(item, 0) <= len(ids) / 33
    assert len(items) <= 32


def test_snapshot_is_shallow_and_isolated_and_resumes_exactly():
    raws = [schema.encode(e) for e in _examples(2400)]
    whole = StatsState(0)
    want = whole.step(raws, now_ms=NOW) + whole.step([], now_ms=NOW, final=True)

    st = StatsState(0)
    first = st.step(raws[:1000], now_ms=NOW)
    snap = st.snapshot()
    agg = next(iter(st.open.values()))
    held = next(iter(snap.open.values()))
    assert held is not agg and np.shares_memory(held.dense_hist, agg.dense_hist)  # no array was copied
    frozen = [msgspec.json.encode(held.records(0, WINDOW_MS, "feed", 0, NOW))]
    more = st.step(raws[1000:], now_ms=NOW) + st.step([], now_ms=NOW, final=True)
    assert msgspec.json.encode(held.records(0, WINDOW_MS, "feed", 0, NOW)) == frozen[0]  # later steps left it alone
    assert _same(first + more, want)
    # a crash after the snapshot: resuming from it replays the rest and emits what the run did
    resumed = snap.step(raws[1000:], now_ms=NOW) + snap.step([], now_ms=NOW, final=True)
    assert resumed == more


def test_a_snapshot_of_an_older_layout_resumes_without_its_open_windows():
    old = StatsState(3)
    old.step([schema.encode(e) for e in _examples(100)], now_ms=NOW)
    del old.version  # as pickled by the version before exact moments (its WindowAgg had other attributes)
    new = restore(old)
    assert new is not old and (new.partition, new.time, new.open) == (3, old.time, {})
    assert restore(new) is new and restore(None).partition == -1


def test_flow_on_lists_is_deterministic_per_partition():
    raws = [schema.encode(e) for e in _examples(1200)]
    runs = []
    for _ in range(2):
        items = [StatsBatch(p, tuple(raws[p::2][k:k + 100]), False) for p in (0, 1) for k in range(0, 600, 100)]
        items += [StatsBatch(p, (), True) for p in (0, 1)]
        got: list = []
        run_main(build_stats_flow(TestingSource(items), TestingSink(got), partitions=2, clock=lambda: NOW / 1000))
        recs = [schema.decode(v, schema.FeatureStats) for v in got]
        runs.append({r.stats_id: (r.count, r.counts, r.items, r.mean, r.std) for r in recs})
        assert sum(r.count for r in recs if r.feature == "count") == 1200
        assert {r.partition for r in recs} == {0, 1} and {r.emitted_ts for r in recs} == {NOW}
    assert runs[0] == runs[1]  # a replay rewrites identical rows under identical ids


def _flow_records(exs, partitions, clock_s):
    raws = [schema.encode(e) for e in exs]
    items = [StatsBatch(p, tuple(raws[p::partitions][k:k + 200]), False) for p in range(partitions)
             for k in range(0, len(raws) // partitions + 1, 200)]
    got: list = []
    run_main(build_stats_flow(TestingSource(items + [StatsBatch(p, (), True) for p in range(partitions)]),
                              TestingSink(got), partitions=partitions, clock=lambda: clock_s))
    return got


def _psi(cur: np.ndarray, ref: np.ndarray) -> float:
    c, r = np.maximum(cur / cur.sum(), q.PSI_FLOOR), np.maximum(ref / ref.sum(), q.PSI_FLOOR)
    keep = (cur > 0) | (ref > 0)  # the SQL compares the bins either side has
    return float(np.sum(((c - r) * np.log(c / r))[keep]))


def test_flow_records_through_the_sink_to_the_drift_and_delay_sql(cfg, store):
    # reference traffic emitted 8 min ago, current traffic (dense.0 shifted by +1) emitted 2 min ago; two
    # partitions, so every window arrives as two partial records the SQL has to combine
    now_s = time.time()
    ref = _examples(2400, seed=1, prefix="r")
    cur = _examples(2400, seed=2, t0=T0 + 3_600_000, shift=1.0, prefix="c")
    good = _flow_records(ref, 2, now_s - 8 * 60) + _flow_records(cur, 2, now_s - 2 * 60)
    hist = next(v for v in good if b'"kind":"histogram"' in v)
    bad = [b"{not json", schema.encode(msgspec.structs.replace(schema.decode(good[0], schema.FeatureStats),
                                                                 domain="shop")),
           hist.replace(b'"counts":[', b'"counts":[1,')]
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for value in good + bad:
        kafka_io.produce(producer, cfg.topics.feature_stats, value)
    assert producer.flush(30) == 0
    sink = MetricsSink(cfg, store)
    try:
        deadline = time.monotonic() + 60
        while sink.counters["messages"] < len(good) + len(bad) and time.monotonic() < deadline:
            sink.poll_once()
    finally:
        sink.close()
    assert sink.counters["rows_feature_stats"] == len(good) and sink.counters["bad_messages"] == len(bad)
    reasons = [r for (r,) in store.query("SELECT reason FROM {db}.dead_letters FINAL ORDER BY reason").rows]
    assert reasons[0].startswith("invalid: histogram") and "unknown domain 'shop'" in reasons[1]
    assert reasons[2].startswith("unparseable")

    params = q.live_parameters(15)  # split: emitted 8 min ago is the older half, 2 min ago the newer
    drift = {(r["domain"], r["feature"]): r for r in store.query(q.render(q.FEATURE_DRIFT, "live"), params).records()}
    assert set(drift) == {(d, f"dense.{j}") for d in ("feed", "stories") for j in (0, 1)}
    for (dom, feat), row in drift.items():
        j = int(feat.split(".")[1])
        vals = [np.array([e.impression.dense[j] for e in exs if e.impression.domain == dom
                          and len(e.impression.dense) > j]) for exs in (cur, ref)]
        unit = np.arange(-5.0, 6.0, q.FEATURE_PSI_BIN)  # PSI bins: the flow's buckets merged into unit-wide ones
        hist = [np.bincount(np.searchsorted(unit, v, "right"), minlength=len(unit) + 1) for v in vals]
        assert (row["n"], row["ref_n"]) == (len(vals[0]), len(vals[1]))
        assert row["psi"] == pytest.approx(_psi(*hist), rel=1e-9, abs=1e-12)
        assert row["mean"] == pytest.approx(vals[0].mean(), abs=1e-9)
        assert row["ref_mean"] == pytest.approx(vals[1].mean(), abs=1e-9)
        assert row["std"] == pytest.approx(vals[0].std(), abs=1e-9)
        assert row["ref_std"] == pytest.approx(vals[1].std(), abs=1e-9)
    assert drift[("feed", "dense.0")]["psi"] > 0.25 > drift[("feed", "dense.1")]["psi"]  # the shift shows
    series = store.query(q.render(q.FEATURE_DRIFT_SERIES, "live"), params).rows
    assert {s for _, s, _ in series} == {"feed", "stories"} and all(v > 0.25 for _, _, v in series)

    delay = {r["delay"]: r for r in store.query(q.render(q.LABEL_DELAY, "live"), params).records()}
    both = ref + cur
    for name, attr in (("clicks", "click_ts"), ("conversions", "conversion_ts")):
        d = np.array([(getattr(e, attr) - e.impression.ts) / 1000 for e in both if getattr(e, attr) is not None])
        want = Counter(q.DELAY_LABELS[i] for i in np.searchsorted(DELAY_EDGES_S, d, "right"))
        assert {k: r[name] for k, r in delay.items() if r[name]} == dict(want), name
    assert list(delay) == [x for x in q.DELAY_LABELS if x in delay]  # in delay order
    assert delay[list(delay)[-1]]["conversions_cum_share"] == pytest.approx(1.0)

    # heavy hitters and quantiles are stored, not thrown away
    (items, counts, qs), = store.query(
        "SELECT items, item_counts, quantiles FROM {db}.feature_stats FINAL WHERE feature = 'hh.campaign_id' "
        "ORDER BY window_start LIMIT 1").rows
    assert items[0] == 7 and counts[0] > 0 and qs == []
    nulls = store.query("SELECT countIf(isNull(std)), countIf(isNaN(assumeNotNull(std))) FROM {db}.feature_stats "
                        "WHERE kind = 'histogram' AND n > 0").rows
    assert nulls == [(0, 0)]  # every histogram with values has an exact std


def test_stats_flow_through_the_broker(cfg):
    sim = generate.simulate(generate.GeneratorConfig(n_impressions=3000, seed=4, impressions_per_s=20))
    generate.produce(cfg, sim.records, progress=False)
    run_labels(cfg, bounded=True)
    run_stats(cfg, bounded=True)
    recs = [(m.key(), schema.decode(m.value(), schema.FeatureStats)) for m in read_topics(cfg, stats_topic(cfg))]
    assert [r for _, r in recs if isinstance(r, schema.Invalid)] == []
    assert all(k.decode() == r.stats_id for k, r in recs)
    assert len({r.stats_id for _, r in recs}) == len(recs)
    assert sum(r.count for _, r in recs if r.feature == "count") == 3000
    assert {r.domain for _, r in recs} == set(generate.GeneratorConfig().domains)
    examples = [schema.decode(m.value(), schema.Example) for m in read_topics(cfg, cfg.topics.examples)]
    clicks = sum(e.click_ts is not None for e in examples)
    assert clicks and sum(r.count for _, r in recs if r.feature == "delay.click") == clicks
    # the flow reports its counters (stack health, component_silent): the last report counts every example
    reports = [schema.decode(m.value(), schema.ServiceStats) for m in read_topics(cfg, cfg.topics.service_stats)]
    last = max((r for r in reports if r.component == "stats"), key=lambda r: (r.values["examples_in"],
                                                                              r.values["records_out"]))
    assert last.values["examples_in"] == len(examples) and last.values["records_out"] == len(recs)
    assert last.values["invalid"] == 0 and last.values["open_windows"] == 0
