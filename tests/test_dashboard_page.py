"""The live dashboard in a real headless Chromium, drawn with uPlot from chDB. Three times: on metrics produced
to Kafka with a drift injected (consumed by the dashboard's own sink: alerts, badges, filters), on two arms'
predictions (the arms comparison panel), and after a short real `streamrec up` (generator, broker, labels and
stats flows, trainer, sink as processes): every panel must end up drawn with rows, drift, label delay,
embedding memory and both halves of freshness included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from dashboards import queries as q
from dashboards.definitions import DASHBOARDS
from dashboards.feature_stats import feature_stats_topic
from dashboards.server import DashboardServer
import config as config_mod
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOMAINS = ("feed", "stories", "video", "search")
DRIFT_BATCHES = 16  # 8 minutes
SCREENSHOT_COPY = Path(os.environ.get("STREAMREC_DASHBOARD_SCREENSHOT", "/tmp/streamrec-dashboard.png"))
UP_EVENTS = 10_000  # 200 s of event time: three or more one-minute windows close in every partition


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
            conversion=conv.astype(int).tolist(),
            cohorts=[f"{d}/{('new', 'casual', 'heavy')[j % 3]}/{('us', 'br')[j % 2]}" for j, d in enumerate(dom)])))
        k += per_batch
        for comp, name, v in (("replay", "events_per_s", 120_000), ("labels", "events_per_s", 110_000),
                              ("trainer", "examples_per_s", 3000)):
            items.append((t.service_stats, schema.ServiceStats(comp, trained, {name: float(v * (1 + 0.1 * np.sin(i)))},
                                                               f"{comp}-1")))
        done = (n - i) * 30 * 3000.0  # cumulative counters: lag = produced - consumed
        items.append((t.service_stats, schema.ServiceStats("replay", trained, {"events_produced": done * 3.1})))
        items.append((t.service_stats, schema.ServiceStats("labels", trained, {
            "events_in": done * 3.0, "examples_out": done + 4000.0, "join_state_memory_bytes": 3e8 + 1e6 * i,
            "join_state_disk_bytes": 2e9, "join_compacted_impressions": 9e6}, "l-1")))
        widths = ((8, 70_000), (16, 20_000), (32, 7_000))
        emb = {f"embedding_bytes_d{d}": float((d + 1) * 4 * rows) for d, rows in widths}
        emb.update({f"embedding_rows_d{d}": float(rows) for d, rows in widths})
        emb.update({"user_freshness_p50_ms": float(900.0 + 50 * np.sin(i)), "user_freshness_p99_ms": 1800.0,
                    "user_backlog": float(i % 3)})
        emb["delta_fraction"] = float(0.026 + 0.002 * np.sin(i))
        emb.update({"early_stage_label_loss": float(0.4 + 0.02 * np.sin(i)), "early_stage_distill_loss": 0.1,  # cascade
                    "semantic_ids_ads": 1200.0 + i, "semantic_ids_coded_at_birth": 200.0,  # cold start
                    "precision_kernel/bottom": 2.0, "precision_err/bottom/fp8_row": 0.04,  # LoKA
                    "precision_err/bottom/bf16": 0.002,
                    "fiited_map_bytes": 4e6 + 1e4 * i, "fiited_row_meta_bytes": 2.4e6, "fiited_sketch_bytes": 131072.0})
        items.append((t.service_stats, schema.ServiceStats("trainer", trained, {"examples_trained": done, **emb},
                                                           "main")))
        items.append((t.service_stats, schema.ServiceStats("distill", trained, {
            "teacher_coverage": 0.97, "teacher_age_p50_ms": float(400 + 100 * (i % 4))}, "d-1")))
        items.append((t.service_stats, schema.ServiceStats("trainer", trained, {"loopfm_age_p50_s": 2.5}, "vm")))
        items.append((t.service_stats, schema.ServiceStats("solaris", trained, {
            "solaris_hit_rate": 0.85, "solaris_age_p50_s": 40.0, "solaris_budget_used": 1.6})))
        items.append((t.service_stats, schema.ServiceStats("serving", trained, {
            "qps": float(400.0 + 50 * np.sin(i)), "latency_p50_ms": 4.0, "latency_p99_ms": float(12.0 + np.sin(i)),
            "arm_model_age_s.main": 3.0 + (i % 3)}, "serve-1")))
        for d in DOMAINS:
            shift = 3 if drifted and d == "video" else 0
            values = np.clip(rng.poisson(4, 500) + shift, 0, 11)  # dense.0 in buckets [k, k+1)
            delays = np.array(schema.DELAY_EDGES_S)[rng.integers(0, 8, 30)]  # clicks' delays, on bucket edges
            for feature, x, edges in (("dense.0", values, np.arange(1, 12)), ("delay.click", delays,
                                                                              np.array(schema.DELAY_EDGES_S))):
                counts = np.bincount(np.searchsorted(edges, x, "right"), minlength=len(edges) + 1)
                items.append((feature_topic, schema.FeatureStats(
                    stats_id=f"{trained - 60_000}:{d}:{feature}:p0", window_start=trained - 60_000,
                    window_end=trained, domain=d, feature=feature, kind="histogram", partition=0, instance="p0",
                    count=len(x), emitted_ts=trained, mean=float(x.mean()), std=float(x.std()), min=float(x.min()),
                    max=float(x.max()), bins=schema.bin_labels(edges), edges=edges.tolist(), counts=counts.tolist())))
        if i % 3 == 0:
            reason = ("schema: Expected `int`, got `str` - at `$.user_id`", "unparseable: truncated JSON",
                      "invalid: unknown domain 'shop'")[i % 2 + (i % 9 == 0)]
            items.append((t.dead_letters, schema.dead_letter(reason, b'{"user_id": "x"}', topic=t.impressions,
                                                             partition=0, offset=i, ts=trained, step="labels.join")))
    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for topic, ev in items:
        kafka_io.produce(producer, topic, schema.encode(ev))
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


@contextmanager
def browser_page():
    """A page of a headless Chromium and the list its JavaScript errors go to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")
def test_page_draws_every_panel(dashboard, tmp_path):
    from PIL import Image

    url, _ = dashboard
    panels = DASHBOARDS["overview"].panels
    with browser_page() as (page, errors):
        page.goto(url)
        try:
            page.wait_for_function(f"document.querySelectorAll('.panel[data-state=\"drawn\"]').length === {len(panels)}",
                                   timeout=90_000)  # ~35 panels, one query each
        except Exception:
            states = page.evaluate("[...document.querySelectorAll('.panel')].map(p => p.id + ':' + p.dataset.state)")
            raise AssertionError(f"panels not drawn: {[s for s in states if not s.endswith(':drawn')]}; {errors}")
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
        page.wait_for_function("document.querySelector('#panel-throughput')?.dataset.state === 'drawn'")
        gutter, widest, labels = page.evaluate("""(() => {
            const ax = streamrecDashboard.charts.throughput.axes[1];
            const ctx = document.createElement('canvas').getContext('2d');
            ctx.font = ax.font[0];
            const w = Math.max(...ax._values.map(v => ctx.measureText(String(v)).width));
            return [ax._size, w, ax._values]; })()""")
        assert labels and gutter >= widest + 10, (gutter, widest, labels)
        page.select_option("#range", "15")
        page.wait_for_function("document.querySelector('#panel-prediction_drift')?.dataset.state === 'drawn'",
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
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[0] > 800 and img.std() > 10, f"screenshot looks blank (std {img.std():.1f})"
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    except OSError:
        pass


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")
def test_the_live_page_draws_the_arms_side_by_side(cfg, tmp_path):
    """Two arms' predictions (and a shadow arm's) through Kafka and the dashboard's own sink onto the live page:
    one row per arm with its intervals in one cell, in a real headless Chromium."""
    from test_arms import N, _traffic

    now = int(time.time() * 1000)
    served, _, _, _, batches = _traffic(np.random.default_rng(5), now)
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for b in batches.values():
        kafka_io.produce(prod, cfg.topics.predictions, schema.encode(b))
    assert prod.flush(30) == 0
    server = DashboardServer(config_mod.replace(cfg, dashboard={"refresh_s": 1.0, "window_minutes": 15}), port=0,
                             sink=True)
    url = server.start()
    try:
        deadline = time.monotonic() + 30
        while server.sink.counters["messages"] < len(batches) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = {r["arm"]: r for r in _get(url + "api/panels/arm_comparison?minutes=15")["rows"]}
        assert rows["a"]["served"] == int((served == "a").sum()) and rows["b"]["scored"] == N
        with browser_page() as (page, errors):
            page.goto(url + "?minutes=15")
            page.wait_for_function("document.querySelector('#panel-arm_comparison')?.dataset.state === 'drawn'",
                                   timeout=30_000)
            panel = page.locator("#panel-arm_comparison")
            assert panel.locator("tbody tr").count() == 4
            head = panel.locator("thead").inner_text()
            assert "ctr %" in head and "95% CI" in head and "auc_lo" not in head  # intervals merged into cells
            first = [c.strip() for c in panel.locator("tbody tr").first.inner_text().split("\t")]
            assert first[0] == "a" and first[1] == str(rows["a"]["served"])
            lo, hi = rows["a"]["auc_lo"], rows["a"]["auc_hi"]
            assert f"[{lo:.3f}, {hi:.3f}]" in panel.locator("tbody tr").first.inner_text()
            assert "green" in panel.locator("tbody tr").first.locator("td").nth(5).get_attribute("class")  # auc
            panel.scroll_into_view_if_needed()
            shot = tmp_path / "arms.png"
            panel.screenshot(path=str(shot))
            assert not errors, errors
        try:  # for a person to look at, beside the page's own screenshot
            shutil.copyfile(shot, SCREENSHOT_COPY.with_name(SCREENSHOT_COPY.stem + "-arms.png"))
        except OSError:
            pass
    finally:
        server.stop()


# ---- after a real `streamrec up` ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def up_run(tmp_path_factory):
    """`streamrec up --events UP_EVENTS --ephemeral --stay`: the URL of its dashboard once everything generated
    is trained and stored; stopped with Ctrl-C (SIGINT) at the end of the module."""
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", "--events", str(UP_EVENTS), "--ephemeral",
                             "--stay", "--port", str(port)], env={**os.environ, "STREAMREC_DATA_DIR": str(data)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 400
        while not any("press Ctrl-C" in line for line in out):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(out)[-3000:]
            time.sleep(0.2)
        assert any(line.startswith("done:") for line in out), "".join(out)[-3000:]
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")
def test_every_panel_has_data_after_a_short_up(up_run, tmp_path):
    # every panel but those that say what they need (the ranking service's: `up --serve`), which say so
    panels = [p for p in DASHBOARDS["overview"].panels if not p.needs]
    needing = [p for p in DASHBOARDS["overview"].panels if p.needs]
    with browser_page() as (page, errors):
        page.goto(up_run + "?minutes=15&refresh=1")
        try:  # the page refreshes every second: statistics still on their way arrive
            # the count first: `every` over a page whose panels are not laid out yet is vacuously true
            page.wait_for_function("n => { const els = [...document.querySelectorAll('.panel')]"
                                   ".filter(e => e.dataset.needs === ''); return els.length "
                                   "=== n && els.every(e => e.dataset.state === 'drawn' && Number(e.dataset.rows) > 0)"
                                   " }", arg=len(panels), timeout=60_000)
        except Exception:  # noqa: BLE001 - name the panels without data
            states = page.evaluate("[...document.querySelectorAll('.panel')].map(e => [e.dataset.panelId, "
                                   "e.dataset.state, e.dataset.rows, e.querySelector('.note').textContent])")
            pytest.fail(f"panels without data: {[s for s in states if s[1] != 'drawn' or s[2] == '0']}")
        drawn = page.evaluate("[...document.querySelectorAll('.panel')].filter(e => e.dataset.needs === '')"
                              ".map(e => e.dataset.panelId)")
        assert sorted(drawn) == sorted(p.id for p in panels)  # every panel of the definition, each with data
        for p in needing:  # no data without the service: the panel says what it needs
            page.wait_for_function(f"(document.querySelector('#panel-{p.id}')?.dataset.state ?? 'loading') !== 'loading'")
            note = page.evaluate(f"document.querySelector('#panel-{p.id} .note').textContent")
            state = page.evaluate(f"document.querySelector('#panel-{p.id}').dataset.state")
            assert state == "drawn" or note == f"no data: needs {p.needs}", (p.id, state, note)
        shot = tmp_path / "dashboard-up.png"
        page.screenshot(path=str(shot), full_page=True)
        assert not errors, errors
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY.with_name(SCREENSHOT_COPY.stem + "-up.png"))
    except OSError:
        pass
    # what the panels say is what their titles say
    rows = lambda panel: _get(f"{up_run}api/panels/{panel}?minutes=15")["rows"]  # noqa: E731
    delay = rows("label_delay")
    assert sum(r["clicks"] for r in delay) > 100 and sum(r["conversions"] for r in delay) > 0
    # generated click delays are at most 300 s (max_click_delay_s, clipped: 300 itself opens "5 min - 15 min")
    upto_300_s = q.DELAY_LABELS[:q.DELAY_LABELS.index("5 min - 15 min") + 1]
    assert {r["delay"] for r in delay if r["clicks"]} <= set(upto_300_s)
    assert max(r["clicks_cum_share"] for r in delay) == pytest.approx(1.0)
    drift = rows("prediction_drift_table")
    assert {r["domain"] for r in drift} == {"feed", "stories", "video", "search"}  # display: no traffic by default
    assert all(r["n"] > 0 and r["ref_n"] > 0 and r["ref_s"] >= 0 for r in drift)
    features = rows("feature_drift_table")
    assert all(r["feature"].startswith("dense.") and r["n"] > 0 and r["ref_n"] > 0 and r["std"] > 0 for r in features)
    latency = {r["series"]: r["value"] for r in rows("freshness")}
    assert set(latency) == {"labelled to trained p50", "labelled to trained p99", "labelled to stored p50",
                            "labelled to stored p99"} and max(latency.values()) < 600
    age = {r["series"]: r["value"] for r in rows("log_age")}
    assert age["event to trained p50"] > 5 * 3600  # the generated log lies wholly in the past (conversions: 6 h)
    assert rows("stat_pipeline_latency")[0]["value"] < 600 < rows("stat_log_age")[0]["value"]
    dims = rows("embedding_dims")
    assert len(dims) == 1 and dims[0]["rows"] > 0 and dims[0]["bytes"] == dims[0]["rows"] * 4 * (dims[0]["dim"] + 1)
