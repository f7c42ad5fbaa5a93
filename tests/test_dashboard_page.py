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
from dashboards.server import DashboardServer
from streams import config as config_mod
from streams import kafka_io, schema

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOMAINS = ("feed", "stories", "video", "search")
SCREENSHOT_COPY = Path(os.environ.get("STREAMREC_DASHBOARD_SCREENSHOT", "/tmp/streamrec-dashboard.png"))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _traffic(cfg, rng, minutes=20, per_batch=400):
    """Predictions trained over the last ``minutes`` (one batch every 30 s), component stats, dead letters."""
    t, now = cfg.topics, int(time.time() * 1000)
    items, k = [], 0
    for i in range(minutes * 2):
        trained = now - i * 30_000
        dom = [DOMAINS[j] for j in rng.integers(0, len(DOMAINS), per_batch)]
        click = rng.random(per_batch) < 0.25
        conv = click & (rng.random(per_batch) < 0.3)
        p_click = np.clip(0.25 + 0.3 * (click - 0.25) + rng.normal(0, 0.15, per_batch), 0.01, 0.99)
        p_conv = np.clip(0.08 + 0.2 * (conv - 0.08) + rng.normal(0, 0.05, per_batch), 0.005, 0.99)
        event_ts = trained - rng.integers(2_000, 90_000, per_batch)
        items.append((t.predictions, schema.PredictionBatch(
            model_version=i, trained_ts=trained, example_ids=[f"x{k + j}" for j in range(per_batch)], domains=dom,
            event_ts=event_ts.tolist(), emitted_ts=(event_ts + 1000).tolist(),
            p_click=p_click.tolist(), p_conversion=p_conv.tolist(), click=click.astype(int).tolist(),
            conversion=conv.astype(int).tolist())))
        k += per_batch
        for comp, name, v in (("replay", "events_per_s", 9000), ("labels", "events_per_s", 8500),
                              ("trainer", "examples_per_s", 3000)):
            items.append((t.service_stats, schema.ServiceStats(comp, trained, {name: float(v * (1 + 0.1 * np.sin(i)))},
                                                               f"{comp}-1")))
        if i % 3 == 0:
            reason = ("schema: Expected `int`, got `str` - at `$.user_id`", "unparseable: truncated JSON",
                      "invalid: unknown domain 'shop'")[i % 2 + (i % 9 == 0)]
            items.append((t.dead_letters, schema.dead_letter(reason, b'{"user_id": "x"}', topic=t.impressions,
                                                             partition=0, offset=i, ts=trained, step="labels.decode")))
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for topic, ev in items:
        kafka_io.produce(producer, topic, schema.encode(ev))
    kafka_io.produce(producer, t.predictions, b"\x00garbage")  # must become a dead letter, not a crash
    assert producer.flush(30) == 0
    return len(items) + 1


@pytest.fixture
def dashboard(cfg):
    cfg = config_mod.replace(cfg, dashboard={"refresh_s": 1.0, "window_minutes": 30})
    n_messages = _traffic(cfg, np.random.default_rng(7))
    server = DashboardServer(cfg, port=0, sink=True)
    url = server.start()
    try:
        deadline = time.monotonic() + 30
        while server.sink.counters["messages"] < n_messages and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.sink.counters["messages"] == n_messages, dict(server.sink.counters)
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
