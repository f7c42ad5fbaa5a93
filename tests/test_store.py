"""The metrics store (chDB) and the metrics sink: SQL metrics equal scikit-learn's on the same rows, writes are
idempotent, and the sink consumes the real topics, dead-letters bad messages and resumes from its own offsets.

chDB opens one path per process: this module shares one client (closed at the end) and isolates tests by database.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dashboards import queries as q
from dashboards.definitions import DASHBOARDS
from dashboards.sink import MetricsSink, dead_letter_rows, prediction_rows, stats_rows
from dashboards.store import TABLES, StoreError, open_client
from streams import schema
from streams.metrics import normalized_entropy
from streams.bus import kafka_io

DOMAINS = ("feed", "video", "search")


def random_batches(rng, n_batches=4, n=1500, now_ms=None, id_prefix="e"):
    """Prediction batches with scores that carry signal (AUC well above 0.5), spread over the last minutes."""
    now_ms = now_ms or int(time.time() * 1000)
    out, k = [], 0
    for b in range(n_batches):
        click = rng.random(n) < 0.3
        conv = click & (rng.random(n) < 0.2)
        p_click = np.clip(0.3 + 0.25 * (click - 0.3) + rng.normal(0, 0.2, n), 0.01, 0.99)
        p_conv = np.clip(0.06 + 0.1 * (conv - 0.06) + rng.normal(0, 0.05, n), 0.005, 0.99)
        event_ts = now_ms - 60_000 * (b + 1) - rng.integers(0, 30_000, n)
        domains = [DOMAINS[i] for i in rng.integers(0, len(DOMAINS), n)]
        out.append(schema.PredictionBatch(
            model_version=b, trained_ts=now_ms - 60_000 * b, example_ids=[f"{id_prefix}{k + i}" for i in range(n)],
            domains=domains, event_ts=event_ts.tolist(),
            emitted_ts=(event_ts + 5000).tolist(), p_click=p_click.tolist(), p_conversion=p_conv.tolist(),
            click=click.astype(int).tolist(), conversion=conv.astype(int).tolist(),
            cohorts=[f"{d}/casual/us" for d in domains]))  # trainer/cohorts.py names (the Cohorts panel)
        k += n
    return out


def reference(batches, objective):
    """domain -> (n, positives, auc, ne, calibration) with scikit-learn on float32 scores (as stored)."""
    dom = np.concatenate([b.domains for b in batches])
    p = np.concatenate([getattr(b, "p_" + objective) for b in batches]).astype(np.float32).astype(np.float64)
    y = np.concatenate([getattr(b, objective) for b in batches])
    out = {}
    for d in DOMAINS:
        m = dom == d
        out[d] = (int(m.sum()), int(y[m].sum()), roc_auc_score(y[m], p[m]), normalized_entropy(y[m], p[m]),
                  p[m].sum() / y[m].sum())
    return out


def quality(store, minutes=60, domain=""):
    res = store.query(q.render(q.QUALITY_BY_OBJECTIVE, "live"), q.live_parameters(minutes, domain))
    return {(r["domain"], r["objective"]): r for r in res.records()}


def test_sql_metrics_match_sklearn(store):
    batches = random_batches(np.random.default_rng(1))
    assert store.insert("predictions", prediction_rows(batches, int(time.time() * 1000))) == 2 * 4 * 1500
    got = quality(store)
    for objective in ("click", "conversion"):
        for d, (n, pos, auc, ne, cal) in reference(batches, objective).items():
            row = got[(d, objective)]
            assert (row["n"], row["positives"]) == (n, pos)
            assert row["auc"] == pytest.approx(auc, abs=1e-9), (d, objective)
            assert row["ne"] == pytest.approx(ne, rel=1e-6), (d, objective)
            assert row["calibration"] == pytest.approx(cal, rel=1e-6), (d, objective)
    assert 0.6 < got[("feed", "click")]["auc"] < 1.0
    # the per-domain wide table the page shows agrees with the long one
    wide = {r["domain"]: r for r in store.query(q.render(q.QUALITY, "live"), q.live_parameters(60)).records()}
    assert wide["video"]["auc"] == got[("video", "click")]["auc"]
    assert wide["video"]["cvr_ne"] == got[("video", "conversion")]["ne"]


def test_window_and_domain_filter(store):
    batches = random_batches(np.random.default_rng(2))  # trained 0, 1, 2, 3 minutes ago
    store.insert("predictions", prediction_rows(batches, 0))
    recent = reference(batches[:2], "click")
    got = quality(store, minutes=1.5)
    assert {d for d, _ in got} == set(DOMAINS)
    assert got[("feed", "click")]["n"] == recent["feed"][0]
    assert got[("feed", "click")]["auc"] == pytest.approx(recent["feed"][2], abs=1e-9)
    only = quality(store, minutes=1.5, domain="search")
    assert set(only) == {("search", "click"), ("search", "conversion")}


def test_reinserting_a_batch_changes_nothing(store):
    batches = random_batches(np.random.default_rng(3), n_batches=2)
    store.insert("predictions", prediction_rows(batches, 1))
    before = quality(store)
    store.insert("predictions", prediction_rows(batches, 2))  # the sink's at-least-once window
    store.insert("predictions", prediction_rows(batches[:1], 3))
    raw = store.query("SELECT count() FROM {db}.predictions").rows[0][0]
    assert raw > 2 * 2 * 1500, "the duplicates should be stored (not merged yet) for this test to mean something"
    after = quality(store)
    assert after.keys() == before.keys()
    for key, row in before.items():  # equal up to summation order
        assert after[key] == {k: pytest.approx(v, rel=1e-9) if isinstance(v, float) else v for k, v in row.items()}
    params = q.live_parameters(60)
    assert store.query(q.render(q.EXAMPLES_SCORED, "live"), params).rows == [(2 * 1500,)]


def test_two_models_scoring_the_same_examples_keep_their_own_rows_and_metrics(store):
    import msgspec

    fm = random_batches(np.random.default_rng(6), n_batches=2)
    noise = np.random.default_rng(7)  # the VM: same examples and labels, noisier scores
    vm = [msgspec.structs.replace(b, arm="vm-feed", p_click=np.clip(np.array(b.p_click) + noise.normal(0, 0.3, len(
        b.p_click)), 0.01, 0.99).tolist()) for b in fm]
    fm = [msgspec.structs.replace(b, arm="fm") for b in fm]
    store.insert("predictions", prediction_rows(fm, 0))
    store.insert("predictions", prediction_rows(vm, 0))
    rows = store.query(q.render(q.MODEL_QUALITY, "live"), q.live_parameters(60)).records()
    got = {(r["model"], r["domain"]): r for r in rows}
    assert {m for m, _ in got} == {"fm", "vm-feed"}
    for model, batches in (("fm", fm), ("vm-feed", vm)):
        for d, (n, _, auc, ne, cal) in reference(batches, "click").items():
            row = got[(model, d)]
            assert row["n"] == n and row["auc"] == pytest.approx(auc, abs=1e-9), (model, d)
            assert row["ne"] == pytest.approx(ne, rel=1e-6) and row["calibration"] == pytest.approx(cal, rel=1e-6)
    assert all(got[("fm", d)]["auc"] > got[("vm-feed", d)]["auc"] for d in DOMAINS)


def test_transfer_panel_shows_loopfm_misses_and_how_far_each_model_trails(store):
    now = int(time.time() * 1000)
    store.insert("service_stats", stats_rows([
        schema.ServiceStats("trainer", now, {"freshness_ms": 90_000.0}, "fm"),
        schema.ServiceStats("trainer", now, {"freshness_ms": 4_000.0, "loopfm_lookups": 200.0, "loopfm_misses": 30.0,
                                             "loopfm_stale": 20.0}, "vm-feed"),
        schema.ServiceStats("trainer", now, {"freshness_ms": 1_000.0}, "main")]))  # not an FM or a VM: left out
    res = store.query(q.render(q.TRANSFER, "live"), q.live_parameters(2)).records()
    got = {r["series"]: r["value"] for r in res}
    assert got == {"behind the stream s, fm": 90.0, "behind the stream s, vm-feed": 4.0,
                   "LoopFM misses %, vm-feed": 25.0}


def panel_stats(now: int) -> list[schema.ServiceStats]:
    """Service statistics that give every panel of the overview rows (a new panel adds its own here)."""
    return [
        schema.ServiceStats("replay", now, {"events_per_s": 5.0, "events_produced": 100.0}),
        schema.ServiceStats("labels", now, {"events_in": 90.0, "examples_out": 40.0, "join_state_memory_bytes": 3e6,
                                            "join_state_disk_bytes": 9e6, "join_compacted_impressions": 4e4}),
        schema.ServiceStats("trainer", now, {"examples_trained": 30.0, "embedding_bytes_d8": 4096.0,
                                             "embedding_rows_d8": 128.0, "user_freshness_p50_ms": 800.0,
                                             "user_freshness_p99_ms": 1500.0, "user_backlog": 0.0,
                                             "delta_fraction": 0.03, "loopfm_age_p50_s": 2.0,
                                             "early_stage_label_loss": 0.4, "early_stage_distill_loss": 0.1,
                                             "semantic_ids_ads": 10.0, "precision_kernel/bottom": 1.0,
                                             "precision_err/bottom/fp8_row": 0.04, "fiited_map_bytes": 512.0,
                                             "fiited_row_meta_bytes": 1280.0, "fiited_sketch_bytes": 1024.0}),
        schema.ServiceStats("serving", now, {"qps": 400.0, "latency_p50_ms": 3.0, "latency_p99_ms": 9.0,
                                             "arm_model_age_s.main": 4.0}),
        schema.ServiceStats("distill", now, {"teacher_coverage": 0.98, "teacher_age_p50_ms": 300.0}),
        schema.ServiceStats("solaris", now, {"solaris_hit_rate": 0.85, "solaris_age_p50_s": 40.0,
                                             "solaris_budget_used": 1.6})]


def panel_feature_stats(now: int) -> list[schema.FeatureStats]:
    """Feature histograms at two emission times (the drift split has halves)."""
    recs = []
    for emitted, a in ((now - 30_000, 8), (now - 90_000, 3)):
        start = emitted - 60_000
        recs += [schema.FeatureStats(stats_id=f"{start}:feed:{f}:p0", window_start=start, window_end=emitted,
                                     domain="feed", feature=f, kind="histogram", partition=0, instance="p0",
                                     count=10, emitted_ts=emitted, mean=0.5, std=0.5, min=0.0, max=1.0,
                                     bins=["-inf", "1"], edges=[1.0], counts=[a, 10 - a])
                 for f in ("dense.0", "delay.click", "delay.conversion")]
    return recs


def test_every_panel_query_runs(store):
    from dashboards.feature_stats import feature_stats_rows

    store.insert("predictions", prediction_rows(random_batches(np.random.default_rng(4), n_batches=4), 0))
    now = int(time.time() * 1000)
    store.refresh_rollup(now - 10 * 60_000, now)
    store.insert("service_stats", stats_rows(panel_stats(now)))
    store.insert("dead_letters", dead_letter_rows([schema.dead_letter("unparseable: x", b"x", ts=now)]))
    assert store.insert("feature_stats", feature_stats_rows(panel_feature_stats(now), now)) == 6
    for panel in DASHBOARDS["overview"].panels:
        res = store.query(q.render(panel.sql, "live"), q.live_parameters(2, "feed"))
        assert res.rows, f"panel {panel.id}: no rows"
        if panel.kind == "timeseries":
            assert res.columns == ["t", "series", "value"], panel.id
        elif panel.kind == "stat":
            assert res.columns == ["value"] and len(res.rows) == 1, panel.id


def test_bad_store_url_names_the_problem():
    with pytest.raises(StoreError, match="three slashes"):
        open_client("chdb://relative/path")
    with pytest.raises(StoreError, match="scheme"):
        open_client("mysql://host/db")


# ---- sink against the real broker ---------------------------------------------------------------------
def _produce(cfg, items):
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for topic, value in items:
        kafka_io.produce(producer, topic, value)
    assert producer.flush(30) == 0


def _drain(sink, want_messages, timeout=30.0):
    deadline = time.monotonic() + timeout
    while sink.counters["messages"] < want_messages and time.monotonic() < deadline:
        sink.poll_once()
    return sink.counters["messages"]


def test_sink_consumes_dead_letters_bad_input_and_resumes(cfg, store):
    t = cfg.topics
    batches = random_batches(np.random.default_rng(5), n_batches=3, n=500)
    now = int(time.time() * 1000)
    items = [(t.predictions, schema.encode(b)) for b in batches]
    items += [(t.service_stats, schema.encode(schema.ServiceStats("trainer", now - i * 1000,
                                                                  {"examples_per_s": 100.0 + i}, "pid1")))
              for i in range(5)]
    items += [(t.dead_letters, schema.encode(schema.dead_letter("schema: missing user_id", b"{}", topic="impressions",
                                                                partition=0, offset=i, ts=now, step="labels")))
              for i in range(3)]
    items += [(t.predictions, b"not json"), (t.service_stats, b'{"type": "service_stats"}')]
    _produce(cfg, items)

    sink = MetricsSink(cfg, store)
    try:
        assert _drain(sink, len(items)) == len(items)
    finally:
        sink.close()
    assert sink.counters["bad_messages"] == 2
    assert sink.counters["rows_predictions"] == 2 * 3 * 500
    assert sink.counters["rows_service_stats"] == 5
    got = quality(store)
    assert got[("feed", "click")]["auc"] == pytest.approx(reference(batches, "click")["feed"][2], abs=1e-9)
    letters = store.query("SELECT step, count() FROM {db}.dead_letters FINAL GROUP BY step ORDER BY step").rows
    assert letters == [("labels", 3), ("metrics_sink", 2)]

    # a new sink resumes after what was recorded: nothing is read twice; new messages are read once
    _produce(cfg, [(t.predictions, schema.encode(b)) for b in random_batches(np.random.default_rng(6), 1, 100,
                                                                            id_prefix="late")])
    again = MetricsSink(cfg, store)
    stop = threading.Event()
    th = threading.Thread(target=again.run, args=(stop,))
    th.start()
    try:
        deadline = time.monotonic() + 30
        while again.counters["messages"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # would pick up re-delivered old messages, if any
    finally:
        stop.set()
        th.join(15)
    assert not th.is_alive() and again.consumer is None
    assert again.counters["messages"] == 1 and again.counters["rows_predictions"] == 200
    assert store.query(q.render(q.EXAMPLES_SCORED, "live"), q.live_parameters(60)).rows == [(3 * 500 + 100,)]


def test_a_dead_letter_rejected_again_after_a_restart_is_stored_once(store):
    # the same record rejected by the same step twice (a replay after a crash): new wall-clock ts, and a reason
    # naming another partition time; a different record at the same place (other bytes) stays separate
    now = int(time.time() * 1000)
    first = schema.dead_letter("stale impression: ts 5 is before the partition time 100", b'{"a":1}',
                               topic="impressions", partition=1, offset=7, ts=now - 9_000, step="labels.join")
    again = schema.dead_letter("stale impression: ts 5 is before the partition time 160", b'{"a":1}',
                               topic="impressions", partition=1, offset=7, ts=now, step="labels.join")
    other = schema.dead_letter("unparseable: truncated", b'{"a":', topic="impressions", partition=1, offset=7,
                               ts=now, step="labels.join")
    store.insert("dead_letters", dead_letter_rows([first]))
    store.insert("dead_letters", dead_letter_rows([again, other]))
    assert store.query("SELECT count() FROM {db}.dead_letters FINAL").rows == [(2,)]


def test_an_older_dead_letters_table_is_rebuilt_with_its_rows(chdb_client):
    from dashboards.store import TABLES, Store

    db = "migrate_dead_letters"
    old_ddl = TABLES["dead_letters"].replace("ORDER BY (topic, partition, offset, step, raw_hash)",
                                             "ORDER BY (topic, partition, offset, step, reason, ts, raw_hash)")
    assert old_ddl != TABLES["dead_letters"]
    chdb_client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    chdb_client.command(old_ddl.format(db=db, ttl=30))
    s = Store(chdb_client, db)
    rows = [schema.dead_letter(f"reason {i}", b"x%d" % i, topic="clicks", partition=0, offset=i, ts=int(time.time() * 1000),
                               step="labels.join") for i in range(5)]
    s.insert("dead_letters", dead_letter_rows(rows))
    s.ensure_schema()
    key = s.query("SELECT sorting_key FROM system.tables WHERE database = {d:String} AND name = 'dead_letters'",
                  {"d": db}).rows
    assert key == [("topic, partition, offset, step, raw_hash",)]
    assert s.query("SELECT offset, reason FROM {db}.dead_letters FINAL ORDER BY offset").rows == [
        (i, f"reason {i}") for i in range(5)]
    s.ensure_schema()  # idempotent once migrated
    assert s.query("SELECT count() FROM {db}.dead_letters").rows == [(5,)]


# the feature_stats table as the tolerant parser's version of streamrec created it
OLD_FEATURE_STATS = """
CREATE TABLE IF NOT EXISTS {db}.feature_stats (
    window_start DateTime64(3, 'UTC'), window_end DateTime64(3, 'UTC'), domain LowCardinality(String),
    feature LowCardinality(String), instance String, n Float64, n_missing Float64, mean Float64, std Float64,
    min Float64, max Float64, bins Array(String), counts Array(Float64), inserted_ts DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(inserted_ts)
ORDER BY (feature, domain, window_start, window_end, instance)
TTL toDateTime(window_end) + INTERVAL {ttl} DAY"""


def test_an_older_feature_stats_table_gains_its_columns_and_keeps_its_rows(chdb_client):
    from dashboards.store import Store

    db = "migrate_feature_stats"
    chdb_client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    chdb_client.command(OLD_FEATURE_STATS.format(db=db, ttl=30))
    now = int(time.time() * 1000)
    chdb_client.command(  # std, min, max arrived as NaN
        f"INSERT INTO {db}.feature_stats VALUES (fromUnixTimestamp64Milli({now - 60_000}, 'UTC'), "
        f"fromUnixTimestamp64Milli({now}, 'UTC'), 'feed', 'dense.0', 'p0', 10, 0, 0.5, nan, nan, nan, "
        f"['-inf', '0'], [4, 6], fromUnixTimestamp64Milli({now - 5_000}, 'UTC'))")
    s = Store(chdb_client, db)
    s.ensure_schema()
    rows = s.query("SELECT feature, kind, n, mean, std, min, max, counts, toUnixTimestamp64Milli(emitted_ts), items "
                   "FROM {db}.feature_stats FINAL").rows
    assert rows == [("dense.0", "histogram", 10, 0.5, None, None, None, [4, 6], now - 5_000, [])]
    assert not any(s._migrate(t, ddl) for t, ddl in TABLES.items())  # idempotent once migrated
    assert s.query(q.render(q.FEATURE_DRIFT_SERIES, "live"), q.live_parameters(5)).rows == []  # the SQL runs on it


def test_the_sink_reports_the_bus_unreachable_while_the_broker_is_away(tmp_path, store):
    from conftest import make_config
    from streams.bus.broker import EmbeddedBroker

    with EmbeddedBroker(log_path=tmp_path / "b.log") as b:
        cfg = make_config(tmp_path, b.bootstrap_servers, partitions=1)
        kafka_io.ensure_topics(b.bootstrap_servers, cfg.topics.all(), 1)
        _produce(cfg, [(cfg.topics.service_stats, schema.encode(schema.ServiceStats("trainer", 1, {"x": 1.0})))])
        sink = MetricsSink(cfg, store, poll_timeout_s=0.2)
        assert _drain(sink, 1) == 1
        assert sink.bus_status()["ok"] and sink.bus_status()["last_message_age_s"] < 30
        b.stop()
        deadline = time.monotonic() + 30
        while sink.bus_status()["ok"] and time.monotonic() < deadline:
            sink.poll_once()
        status = sink.bus_status()
        sink.close()
    assert not status["ok"] and status["error"].startswith("_") and status["last_message_age_s"] > 0
