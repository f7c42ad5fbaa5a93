"""The live dashboard in a real headless Chromium: metrics produced to Kafka, consumed by the dashboard's own
sink into chDB, queried by the page and drawn with uPlot. Every panel must end up drawn with rows."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dashboards.definitions import DASHBOARDS
from dashboards.feature_stats import feature_stats_topic
from dashboards.server import DashboardServer
from streams import config as config_mod
from streams import schema
from streams.bus import kafka_io

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOMAINS = ("feed", "stories", "video", "search")
DRIFT_BATCHES = 16  # 8 minutes
SCREENSHOT_COPY = Path(os.environ.get("STREAMREC_DASHBOARD_SCREENSHOT", "/tmp/streamrec-dashboard.png"))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _traffic(cfg, rng, minutes=20, per_batch=400):
    """Predictions trained over the last ``minutes`` (one batch every 30 s), component stats, feature stats,
    dead letters; the video domain drifts in the last ``DRIFT_BATCHES`` batches."""
    feature_topic = feature_stats_topic(cfg)
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, [feature_topic], cfg.topics.partitions)
    t, now = cfg.topics, int(time.time() * 1000)
    items, k = [], 0
    n = minutes * 2
    for i in range(n):
        trained = now - i * 30_000
        drifted = i < DRIFT_BATCHES  # the last minutes: video scores and video's dense_0 shift up
        dom = [DOMAINS[j] for j in rng.integers(0, len(DOMAINS), per_batch)]
        click = rng.random(per_batch) < 0.25
        conv = click & (rng.random(per_batch) < 0.3)
        p_click = np.clip(0.25 + 0.3 * (click - 0.25) + rng.normal(0, 0.15, per_batch)
                          + 0.3 * (drifted & (np.array(dom) == "video")), 0.01, 0.99)
        p_conv = np.clip(0.08 + 0.2 * (conv - 0.08) + rng.normal(0, 0.05, per_batch), 0.005, 0.99)
        event_ts = trained - rng.integers(2_000, 90_000, per_batch)
        items.append((t.predictions, schema.PredictionBatch(
            model_version=i, trained_ts=trained, example_ids=[f"x{k + j}" for j in range(per_batch)], domains=dom,
            event_ts=event_ts.tolist(), emitted_ts=(event_ts + 1000).tolist(),
            p_click=p_click.tolist(), p_conversion=p_conv.tolist(), click=click.astype(int).tolist(),
            conversion=conv.astype(int).tolist())))
        k += per_batch
        for comp, name, v in (("replay", "events_per_s", 120_000), ("labels", "events_per_s", 110_000),
                              ("trainer", "examples_per_s", 3000)):
            items.append((t.service_stats, schema.ServiceStats(comp, trained, {name: float(v * (1 + 0.1 * np.sin(i)))},
                                                               f"{comp}-1")))
        done = (n - i) * 30 * 3000.0  # cumulative counters: lag = produced - consumed
        items.append((t.service_stats, schema.ServiceStats("replay", trained, {"events_produced": done * 3.1})))
        items.append((t.service_stats, schema.ServiceStats("labels", trained, {"events_in": done * 3.0,
                                                                               "examples_out": done + 4000.0}, "l-1")))
        emb = {f"fiited_pool_bytes_d{d}": float(d * 4 * rows) for d, rows in ((8, 70_000), (16, 20_000), (32, 7_000))}
        emb.update({f"fiited_rows_d{d}": float(rows) for d, rows in ((8, 70_000), (16, 20_000), (32, 7_000))})
        emb.update({"user_freshness_p50_ms": float(900.0 + 50 * np.sin(i)), "user_freshness_p99_ms": 1800.0,
                    "user_backlog": float(i % 3)})
        items.append((t.service_stats, schema.ServiceStats("trainer", trained, {"examples_trained": done, **emb},
                                                           "trainer-1")))
        for d in DOMAINS:
            shift = 3 if drifted and d == "video" else 0
            counts = np.bincount(np.clip(rng.poisson(4, 500) + shift, 0, 11), minlength=12).tolist()
            items.append((feature_topic, {"type": "feature_stats", "window_start": trained - 30_000,
                                          "window_end": trained, "domain": d, "instance": "stats-0",
                                          "features": {"dense_0": {"count": 500, "mean": 4.0 + shift,
                                                                   "bins": list(range(12)), "counts": counts}}}))
        if i % 3 == 0:
            reason = ("schema: Expected `int`, got `str` - at `$.user_id`", "unparseable: truncated JSON",
                      "invalid: unknown domain 'shop'")[i % 2 + (i % 9 == 0)]
            items.append((t.dead_letters, schema.dead_letter(reason, b'{"user_id": "x"}', topic=t.impressions,
                                                             partition=0, offset=i, ts=trained, step="labels.decode")))
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for topic, ev in items:
        kafka_io.produce(producer, topic, json.dumps(ev).encode() if isinstance(ev, dict) else schema.encode(ev))
    kafka_io.produce(producer, t.predictions, b"\x00garbage")  # must become a dead letter, not a crash
    assert producer.flush(30) == 0
    return len(items) + 1


@pytest.fixture
def dashboard(cfg):
    cfg = config_mod.replace(cfg, dashboard={"refresh_s": 1.0, "window_minutes": 15})
    n_messages = _traffic(cfg, np.random.default_rng(7))
    server = DashboardServer(cfg, port=0, sink=True)
    url = server.start()
    try:
        deadline = time.monotonic() + 30
        # every message stored, and the rollup (which drift and quality panels read) recomputed after it
        while (server.sink.counters["messages"] < n_messages or server.sink._dirty is not None) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.sink.counters["messages"] == n_messages, dict(server.sink.counters)
        assert server.sink._dirty is None, "rollup not refreshed"
        yield url, server
    finally:
        server.stop()


def test_api_serves_panels(dashboard):
    url, server = dashboard
    assert _get(url + "healthz")["counters"]["bad_messages"] == 1
    rows = _get(url + "api/panels/quality?minutes=60")["rows"]
    assert {r["domain"] for r in rows} == set(DOMAINS)
    assert all(0.6 < r["auc"] < 1 and 0 < r["ne"] < 1 for r in rows), rows
    one = _get(url + "api/panels/quality?minutes=60&domain=video")["rows"]
    assert [r["domain"] for r in one] == ["video"]
    # a shorter window has fewer examples (the window is on the training time)
    n60 = _get(url + "api/panels/stat_examples?minutes=60")["rows"][0]["value"]
    n5 = _get(url + "api/panels/stat_examples?minutes=5")["rows"][0]["value"]
    assert n60 == 40 * 400 and 0 < n5 < n60
    # the drift injected into video fires the drift alerts for video only
    alerts = _get(url + "api/alerts")["alerts"]
    firing = {(a["rule"], a["series"]) for a in alerts if a["firing"]}
    assert {("prediction_drift", "video"), ("feature_drift", "video")} <= firing, alerts
    assert not {r for r in firing if r[1] in ("feed", "stories", "search")}, firing
    assert not [a for a in alerts if a.get("error")], alerts
    assert _get(url + "api/alerts?domain=feed")["firing"] == 0
    for bad in ("api/panels/nope", "api/panels/quality?domain=mars", "api/panels/quality?minutes=abc"):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(url + bad)
        assert e.value.code in (400, 404)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")
def test_page_draws_every_panel(dashboard, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    url, _ = dashboard
    panels = DASHBOARDS["overview"].panels
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function(
                f"document.querySelectorAll('.panel[data-state=\"drawn\"]').length === {len(panels)}", timeout=30_000)
            page.wait_for_function("Number(document.body.dataset.refreshes) >= 2", timeout=15_000)  # auto-refresh
            for p in panels:
                el = page.locator(f"#panel-{p.id}")
                assert int(el.get_attribute("data-rows")) > 0, p.id
                if p.kind == "timeseries":
                    assert el.locator("canvas").count() >= 1, p.id
                elif p.kind == "stat":
                    assert el.locator(".value").inner_text() not in ("", "–"), p.id
                else:
                    assert el.locator("tbody tr").count() > 0, p.id
            # drift is visible: banner badges, and the drift panel carries the alert
            assert int(page.locator("#alerts").get_attribute("data-firing")) >= 2
            assert page.locator('#alerts .badge[data-rule="prediction_drift"]').inner_text().find("video") >= 0
            assert "alerting" in page.locator("#panel-prediction_drift").get_attribute("class")
            assert "video" in page.locator("#panel-feature_drift_table tbody tr").first.inner_text()
            # y-axis labels fit their gutter (a fixed 60 px clipped "100.0k/s" to "00.0k/s")
            page.select_option("#range", "60")
            page.wait_for_function("document.querySelector('#panel-throughput').dataset.state === 'drawn'")
            gutter, widest, labels = page.evaluate("""(() => {
                const ax = streamrecDashboard.charts.throughput.axes[1];
                const ctx = document.createElement('canvas').getContext('2d');
                ctx.font = ax.font[0];
                const w = Math.max(...ax._values.map(v => ctx.measureText(String(v)).width));
                return [ax._size, w, ax._values]; })()""")
            assert labels and gutter >= widest + 10, (gutter, widest, labels)
            page.select_option("#range", "15")
            page.wait_for_function("document.querySelector('#panel-prediction_drift').dataset.state === 'drawn'",
                                   timeout=15_000)
            # the domain filter narrows the table to one domain
            page.select_option("#domain", "stories")
            page.wait_for_function("document.querySelectorAll('#panel-quality tbody tr').length === 1",
                                   timeout=15_000)
            page.select_option("#domain", "")
            page.wait_for_function("document.querySelectorAll('#panel-quality tbody tr').length === 4",
                                   timeout=15_000)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[0] > 800 and img.std() > 10, f"screenshot looks blank (std {img.std():.1f})"
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    except OSError:
        pass
