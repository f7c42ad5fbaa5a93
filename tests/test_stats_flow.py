"""The stats dataflow: window statistics on lists (pure + TestingSource) and once through the broker."""

from __future__ import annotations

from collections import Counter

import numpy as np
from bytewax.testing import TestingSink, TestingSource, run_main

from conftest import read_topics
from streams import schema
from streams.flows.stats import (DELAY_EDGES_S, WINDOW_MS, StatsBatch, StatsState, build_stats_flow, misra_gries,
                                 stats_topic)
from streams.flows.service import run_labels, run_stats
from streams.sources import generate

T0 = 1_767_225_600_000


def _examples(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ts = T0 + k * 50  # 20 per second -> 1200 per minute window
        click = int(rng.random() < 0.2)
        imp = schema.Impression(event_id=f"i{k}", ts=ts, user_id=int(rng.zipf(1.5) % 1000), ad_id=int(rng.integers(100)),
                                campaign_id=7 if k % 3 else int(rng.integers(50)), advertiser_id=1,
                                domain=schema.DOMAINS[k % 2], dense=[float(rng.normal()), float(k % 4)])
        out.append(schema.Example(example_id=imp.event_id, impression=imp, click=click, conversion=0,
                                  click_ts=ts + 40_000 if click else None, decided="window_closed"))
    late = schema.Example(example_id="i5#late-conversion", impression=out[5].impression, click=0, conversion=1,
                          conversion_ts=T0 + 100_000, decided="late_positive")
    return out, late


def _by_feature(records):
    return {(r.window_start, r.domain, r.feature): r for r in records}


def test_window_statistics_match_a_reference():
    exs, late = _examples()
    raws = [schema.encode(e) for e in exs]
    st = StatsState(partition=0)
    out = []
    for k in range(0, len(raws), 700):
        out += st.step(raws[k:k + 700] + ([schema.encode(late), b"{bad"] if k == 0 else []), now_ms=1)
    out += st.step([], now_ms=1, final=True)
    assert st.counts["invalid"] == 1 and not st.open
    recs = _by_feature(out)
    assert len(recs) == len(out) and len({r.stats_id for r in out}) == len(out)  # one record per id
    for dom in ("feed", "stories"):
        sel = [e for e in exs if e.impression.domain == dom]
        win = Counter(e.impression.ts - e.impression.ts % WINDOW_MS for e in sel)
        for w, n in win.items():
            in_w = [e for e in sel if e.impression.ts - e.impression.ts % WINDOW_MS == w]
            assert recs[(w, dom, "count")].count == n
            clicks = sum(e.click for e in in_w)
            assert recs[(w, dom, "label.click")].count == clicks
            assert abs(recs[(w, dom, "label.click")].value - clicks / n) < 1e-12
            h = recs[(w, dom, "dense.0")]
            assert sum(h.counts) == n and len(h.counts) == len(h.edges) + 1 == len(h.bins)
            vals = np.array([e.impression.dense[0] for e in in_w])
            assert abs(h.value - vals.mean()) < 1e-9
            assert abs(h.quantiles[0] - np.quantile(vals, 0.5)) <= 0.25 + 1e-9  # bucket width 0.25
            d = recs[(w, dom, "delay.click")]
            assert sum(d.counts) == clicks and d.counts[int(np.searchsorted(DELAY_EDGES_S, 40, "right"))] == clicks
            hh = recs[(w, dom, "hh.campaign_id")]
            assert hh.items[0] == 7  # two thirds of the traffic
    late_w = (T0 + 100_000) - (T0 + 100_000) % WINDOW_MS
    assert recs[(late_w, "stories", "late_positive")].count == 1  # counted where its label arrived


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


def test_flow_on_lists_is_deterministic_per_partition():
    exs, _ = _examples(1200)
    raws = [schema.encode(e) for e in exs]
    runs = []
    for _ in range(2):
        items = [StatsBatch(p, tuple(raws[p::2][k:k + 100]), False) for p in (0, 1) for k in range(0, 600, 100)]
        items += [StatsBatch(p, (), True) for p in (0, 1)]
        got: list = []
        run_main(build_stats_flow(TestingSource(items), TestingSink(got), partitions=2))
        recs = [schema.decode(v, schema.FeatureStats) for v in got]
        runs.append({r.stats_id: (r.count, r.counts, r.items) for r in recs})
        assert sum(r.count for r in recs if r.feature == "count") == len(exs)
        assert {r.partition for r in recs} == {0, 1}
    assert runs[0] == runs[1]  # a replay rewrites identical rows under identical ids


def test_stats_flow_through_the_broker(cfg):
    sim = generate.simulate(generate.GeneratorConfig(n_impressions=3000, seed=4, impressions_per_s=20))
    generate.produce(cfg, sim.records, progress=False)
    run_labels(cfg, bounded=True)
    run_stats(cfg, bounded=True)
    recs = [(m.key(), schema.decode(m.value(), schema.FeatureStats)) for m in read_topics(cfg, stats_topic(cfg))]
    assert all(k.decode() == r.stats_id for k, r in recs)
    from dashboards.feature_stats import feature_stats_rows  # the metrics sink's reader takes every record

    table, problems = feature_stats_rows([schema.encode(r) for _, r in recs], inserted_ms=1)
    assert problems == [] and table.num_rows == len(recs)
    assert len({r.stats_id for _, r in recs}) == len(recs)
    assert sum(r.count for _, r in recs if r.feature == "count") == 3000
    assert {r.domain for _, r in recs} == set(generate.GeneratorConfig().domains)
