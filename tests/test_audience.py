"""The simulated audience (streams/sources/audience.py): the generator's world, its oracle and its users.

Statistical checks use fixed seeds; bounds are |z| < 4 (a fair audience fails one with probability ~6e-5
per check, and a fixed seed makes the outcome deterministic anyway)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streams import schema
from streams.sources import scenarios
from streams.sources.audience import Audience
from streams.sources.generate import GeneratorConfig, simulate

T0 = 1_767_225_600_000


def _z(observed: float, p: np.ndarray) -> float:
    return (observed - p.sum()) / math.sqrt((p * (1 - p)).sum())


@pytest.mark.parametrize("scenario", ["none", "gradual", "seasonal", "interest-shift"])
def test_oracle_is_the_generators_truth(scenario):
    """Replaying the generator's impressions as requests, the audience's oracle gives exactly the truth the
    generator drew their clicks from (same world, same formulas, drift included)."""
    g = GeneratorConfig(n_impressions=1500, seed=5, n_users=800, n_ads=300,
                        scenario=scenarios.ScenarioConfig(name=scenario, period_s=20.0))
    sim = simulate(g)
    ts = sim.truth.column("ts").to_numpy()
    aud = Audience(g, run_s=(ts[-1] - ts[0]) / 1000, start_ms=int(ts[0]))
    imps = [r for r in sim.records if isinstance(r, schema.Impression)]
    by_id = {f"imp-{g.seed}-{i}": i for i in range(len(imps))}
    got = np.empty(len(imps))
    for imp in imps:
        req = aud.requests(1, ts=imp.ts)[0]
        req = type(req)(request_id=req.request_id, ts=imp.ts, user_id=imp.user_id, domain=imp.domain,
                        device=imp.device, country=imp.country, dense=imp.dense, cat=imp.cat, history=imp.history)
        pc, _ = aud.truth(req, [imp.ad_id], [imp.position])
        got[by_id[imp.event_id]] = pc[0]
    np.testing.assert_allclose(got, sim.truth.column("p_click").to_numpy(), rtol=1e-12, atol=0)


def test_requests_carry_the_users_own_context():
    """Device, country and history of a request's user are the ones the generator's impressions carry."""
    g = GeneratorConfig(n_impressions=3000, seed=2, n_users=300, n_ads=200)
    seen = {r.user_id: (r.device, r.country, r.history) for r in simulate(g).records
            if isinstance(r, schema.Impression)}
    reqs = Audience(g).requests(2000, ts=T0)
    common = [r for r in reqs if r.user_id in seen]
    assert len(common) > 1000
    assert all(seen[r.user_id] == (r.device, r.country, r.history) for r in common)
    assert {r.domain for r in reqs} == set(g.domains)
    assert all(len(r.dense) == g.dense_dim and len(r.cat) == g.cat_slots for r in reqs)
    assert len({r.request_id for r in reqs}) == len(reqs)
    assert all(schema.tokens_ok(r.request_id) and len(r.request_id) <= 64 for r in reqs)
    # users by activity: the most active tenth of users sends most requests, as in the generator
    counts = np.bincount([r.user_id - 1 for r in reqs], minlength=g.n_users)
    top = np.argsort(-Audience(g).w.user_w)[: g.n_users // 10]
    assert counts[top].sum() / len(reqs) > 0.5


def test_clicks_and_conversions_follow_the_oracle():
    """Served ads are clicked with the oracle's p_click (overall, per decile of p_click and per position) and
    clicked ones convert with its p_conversion."""
    g = GeneratorConfig(seed=11, n_users=3000, n_ads=600)
    aud = Audience(g, time_scale=60.0)
    pc, pv, click, conv, pos = [], [], [], [], []
    for req in aud.requests(6000, ts=T0):
        cands = aud.candidates(req, 10)
        for o in aud.respond(req, [(a.ad_id, i) for i, a in enumerate(cands)]):
            pc.append(o.p_click)
            pv.append(o.p_conversion)
            click.append(o.click_ts is not None)
            conv.append(o.conversion_ts is not None)
            pos.append(o.position)
    pc, pv, click, conv, pos = map(np.asarray, (pc, pv, click, conv, pos))
    assert len(pc) == 60_000 and not (conv & ~click).any()
    z_all = _z(click.sum(), pc)
    assert abs(z_all) < 4, z_all
    edges = np.quantile(pc, np.linspace(0, 1, 11))
    dec = np.clip(np.searchsorted(edges, pc, side="right") - 1, 0, 9)
    z_dec = [_z(click[dec == d].sum(), pc[dec == d]) for d in range(10)]
    assert max(map(abs, z_dec)) < 4, z_dec
    ctr_low, ctr_high = click[dec == 0].mean(), click[dec == 9].mean()
    assert ctr_high > 5 * ctr_low  # the oracle separates: the top decile is clicked far more
    z_pos = [_z(click[pos == p].sum(), pc[pos == p]) for p in range(10)]
    assert max(map(abs, z_pos)) < 4, z_pos
    assert click[pos == 0].mean() > click[pos == 9].mean()  # the position effect is real
    z_cvr = _z(conv.sum(), pv[click])
    assert abs(z_cvr) < 4, z_cvr
    print(f"clicks {click.sum()} vs expected {pc.sum():.1f} (z {z_all:.2f}); decile z {np.round(z_dec, 2)}; "
          f"position z {np.round(z_pos, 2)}; conversions {conv.sum()} vs {pv[click].sum():.1f} (z {z_cvr:.2f})")


def test_delays_are_the_generators_compressed():
    g = GeneratorConfig(seed=4, n_users=1000, n_ads=300)
    scale = 60.0
    aud = Audience(g, time_scale=scale)
    click_d, conv_d = [], []
    for req in aud.requests(5000, ts=T0):
        for o in aud.respond(req, [(a.ad_id, i) for i, a in enumerate(aud.candidates(req, 10))]):
            if o.click_ts is not None:
                click_d.append(o.click_ts - req.ts)
            if o.conversion_ts is not None:
                conv_d.append(o.conversion_ts - req.ts)
                assert o.conversion_ts >= o.click_ts
    click_d, conv_d = np.asarray(click_d), np.asarray(conv_d)
    max_click, max_conv = aud.max_feedback_delay_ms()
    assert click_d.min() >= 1 and click_d.max() <= max_click and conv_d.max() <= max_conv
    # lognormal click delay with median click_delay_median_s (20 s), compressed 60x: ~333 ms
    med = np.median(click_d) * scale / 1000
    assert 16 < med < 25, med
    # conversions: the short model (35% fast, mean 15 min; 65% slow, mean 4 h), capped at 6 h: median ~1.3 h
    conv_med_h = np.median(conv_d) * scale / 3.6e6
    assert 0.5 < conv_med_h < 2.5, conv_med_h


def test_candidates_and_catalogue_are_live_ads_only():
    g = GeneratorConfig(seed=9, n_users=500, n_ads=400, ad_churn=0.5,
                        scenario=scenarios.ScenarioConfig(name="new-ad-surge", at=0.5, surge_share=0.5))
    for progress in (0.2, 0.7, 1.0):
        aud = Audience(g, progress=progress)
        w = aud.w
        alive = {i + 1 for i in range(len(w.ad_w)) if w.ad_birth[i] <= progress < w.ad_death[i]}
        assert {a.ad_id for a in aud.catalogue(T0)} == alive
        assert len(alive) < len(w.ad_w)  # churn: some ads are not (or no longer) alive
        served = [a.ad_id for req in aud.requests(300, ts=T0) for a in aud.candidates(req, 30)]
        assert set(served) <= alive
        surge = np.mean([a > g.n_ads for a in served])
        if progress < 0.5:
            assert surge == 0
        else:  # the surge ads take about surge_share of the traffic (fewer: 30 distinct candidates per request)
            assert 0.2 < surge < 0.6, surge
    # campaign and advertiser are the generator's
    sim = simulate(GeneratorConfig(n_impressions=500, seed=9, n_users=500, n_ads=400, ad_churn=0.5))
    aud = Audience(sim.config)
    for r in sim.records:
        if isinstance(r, schema.Impression):
            a = aud.ad(r.ad_id)
            assert (a.campaign_id, a.advertiser_id) == (r.campaign_id, r.advertiser_id)


def test_a_timeline_plays_the_scenario_during_serving():
    g = GeneratorConfig(seed=1, n_users=200, n_ads=200, ad_churn=0.5)
    aud = Audience(g, run_s=100.0, start_ms=T0)
    assert [aud.progress_at(T0 + s * 1000) for s in (-5, 0, 50, 100, 200)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    born_late = {i + 1 for i in np.flatnonzero(aud.w.ad_birth > 0.5)}
    assert not born_late & {a.ad_id for a in aud.catalogue(T0 + 10_000)}
    assert born_late & {a.ad_id for a in aud.catalogue(T0 + 99_000)}


def test_feedback_events_and_determinism():
    g = GeneratorConfig(seed=3, n_users=300, n_ads=200)
    runs = []
    for _ in range(2):
        aud = Audience(g, time_scale=10.0, request_prefix="t-")
        outs = []
        for req in aud.requests(200, ts=T0):
            outs += aud.respond(req, [(a.ad_id, i) for i, a in enumerate(aud.candidates(req, 5))])
        runs.append(outs)
    assert runs[0] == runs[1]
    ev = [e for o in runs[0] for e in o.events()]
    clicks = [e for e in ev if isinstance(e, schema.Click)]
    assert clicks and all(e.event_id == f"clk-{e.impression_id}" for e in clicks)
    assert all(e.impression_id.startswith("t-") and e.impression_id.rsplit(".", 1)[1].isdigit() for e in ev)
    for e in ev:  # every event is valid on the wire
        assert schema.decode(schema.encode(e), type(e)) == e
    with pytest.raises(ValueError, match="unknown ad id"):
        aud.truth(aud.requests(1, ts=T0)[0], [10_000], [0])
    with pytest.raises(ValueError, match="time_scale"):
        Audience(g, time_scale=0)


# -- the driver (deploy/audience.py) against the real broker ---------------------------------------------------

class _StandIn:
    """A stand-in for `streamrec serve` speaking its HTTP API (POST /rank, GET /readyz), used only to test the
    driver on its own: users with an even id go to arm "good", which ranks the candidates by the oracle's true
    p_click, odd ones to "bad", which serves the worst. It remembers what it served."""

    def __init__(self, aud: Audience, port: int = 0):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from streams.sources.audience import Request

        self.served: dict[str, tuple[int, int, str, list[int]]] = {}  # request id -> (user, ts, arm, ads by position)
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200 if self.path == "/readyz" else 404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                c = body["context"]
                req = Request(request_id=body["request_id"], ts=body["ts"], user_id=body["user_id"],
                              domain=body["domain"], device=c["device"], country=c["country"], dense=c["dense"],
                              cat=c["cat"], history=c["history"])
                ids = [x["ad_id"] for x in body["candidates"]]
                pc, _ = aud.truth(req, ids, [0] * len(ids))
                arm = "good" if req.user_id % 2 == 0 else "bad"
                order = np.argsort(-pc if arm == "good" else pc, kind="stable")[: body["k"]]
                ads = [{"ad_id": ids[i], "campaign_id": body["candidates"][i]["campaign_id"],
                        "advertiser_id": body["candidates"][i]["advertiser_id"], "position": pos,
                        "p_click": float(pc[i]), "p_conversion": 0.0} for pos, i in enumerate(order.tolist())]
                with lock:
                    outer.served[req.request_id] = (req.user_id, req.ts, arm, [a["ad_id"] for a in ads])
                self._send(200, {"request_id": req.request_id, "arm": arm, "model_version": 1, "model_steps": 1,
                                 "ads": ads, "took_ms": 0.1})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_driver_produces_the_feedback_of_what_was_served(cfg, tmp_path):
    import time

    from deploy.audience import Driver, arms_from_values, table
    from streams.bus.partition import partition_for
    from tests.conftest import read_topics

    g = GeneratorConfig(seed=21, n_users=2000, n_ads=500, max_click_delay_s=60.0, max_conversion_delay_s=120.0)
    aud = Audience(g, time_scale=100.0)  # clicks within 0.6 s, conversions within 1.2 s
    server = _StandIn(aud)
    state = tmp_path / "audience-state.json"
    try:
        drv = Driver(cfg, aud, server.url, rate=60.0, concurrency=3, k=10, candidates=100,
                     until_ms=int(time.time() * 1000) + 4000, state=state)
        assert drv.wait_ready(10)
        arms = drv.run(drain_s=3.0)
    finally:
        server.close()
    print(table(arms))
    assert set(arms) == {"good", "bad"}
    good, bad = arms["good"], arms["bad"]
    assert sum(a.requests for a in arms.values()) == len(server.served) >= 150
    assert good.served == 10 * good.requests and bad.served == 10 * bad.requests
    # everything decided was produced (the drain waited for it)
    assert not drv.pending
    assert (good.clicks, good.conversions) == (good.decided_clicks, good.decided_conversions)
    # the oracle and the online CTR agree: the arm serving the truly best ads wins by far
    assert good.true_p_click > 3 * bad.true_p_click
    assert good.ctr > bad.ctr and good.clicks >= 20
    msgs = read_topics(cfg, [cfg.topics.clicks, cfg.topics.conversions, cfg.topics.service_stats])
    clicks = [(m, schema.decode(m.value(), schema.Click)) for m in msgs if m.topic() == cfg.topics.clicks]
    convs = [(m, schema.decode(m.value(), schema.Conversion)) for m in msgs if m.topic() == cfg.topics.conversions]
    assert len(clicks) == good.clicks + bad.clicks and len(convs) == good.conversions + bad.conversions
    max_click, max_conv = aud.max_feedback_delay_ms()
    for m, ev in clicks + convs:
        rid, pos = ev.impression_id.rsplit(".", 1)
        user, ts, arm, ads = server.served[rid]  # feedback only for a served ad, at a served position
        assert ev.user_id == user and int(pos) < len(ads)
        assert 1 <= ev.ts - ts <= (max_click if isinstance(ev, schema.Click) else max_conv)
        assert m.partition() == partition_for(str(user).encode(), cfg.topics.partitions)
        assert m.key() == str(user).encode()
    assert all(ev.event_id == f"clk-{ev.impression_id}" for _, ev in clicks)
    assert {ev.impression_id for _, ev in convs} <= {ev.impression_id for _, ev in clicks}
    # the last report says the same as the table
    reports = [schema.decode(m.value(), schema.ServiceStats) for m in msgs if m.topic() == cfg.topics.service_stats]
    last = max((r for r in reports if r.component == "audience"), key=lambda r: r.ts)
    again = arms_from_values(last.values)
    assert {n: (a.requests, a.served, a.clicks, a.conversions) for n, a in again.items()} == \
        {n: (a.requests, a.served, a.clicks, a.conversions) for n, a in arms.items()}
    assert abs(again["good"].true_p_click - good.true_p_click) < 1e-9
    assert last.values["model_version.good"] == 1.0  # the version that served each arm
    # crash safety: a restarted driver resumes the counters (and the feedback still pending) from its state
    resumed = Driver(cfg, aud, server.url, state=state)
    assert {n: vars(a) for n, a in resumed.stats.arms.items()} == {n: vars(a) for n, a in arms.items()}


def test_a_killed_driver_resumes_and_its_redelivered_feedback_has_the_same_ids(cfg, tmp_path):
    """At-least-once: SIGKILL the driver mid-run, start it again with the same state and end: it resumes its
    counters and pending feedback; feedback produced twice is the same event (same id and time), which the
    labels join drops as a duplicate."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import msgspec
    import yaml

    from deploy.audience import arms_from_values
    from tests.conftest import read_topics

    g = GeneratorConfig(seed=0, n_users=2000, n_ads=500)
    server = _StandIn(Audience(g))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    until = int(time.time() * 1000) + 9000
    cmd = [sys.executable, "-m", "deploy.cli", "--config", str(path), "audience", "--url", server.url,
           "--users", "2000", "--ads", "500", "--seed", "0", "--rate", "40", "--time-scale", "600",
           "--until-ms", str(until), "--state", str(tmp_path / "state.json")]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    try:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not (tmp_path / "state.json").exists():  # its first snapshot: it is sending
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()[0][-2000:]
            time.sleep(0.1)
        time.sleep(2.5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        snap = json.loads((tmp_path / "state.json").read_text())
        before = {n: a["requests"] for n, a in snap["arms"].items()}
        assert sum(before.values()) > 40
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed" in second.stderr and "oracle prefers" in second.stdout
    msgs = read_topics(cfg, [cfg.topics.clicks, cfg.topics.service_stats])
    clicks = [schema.decode(m.value(), schema.Click) for m in msgs if m.topic() == cfg.topics.clicks]
    by_id: dict[str, set] = {}
    for c in clicks:
        by_id.setdefault(c.event_id, set()).add(c)
    assert all(len(v) == 1 for v in by_id.values()), "a redelivered click is the same event"
    reports = [schema.decode(m.value(), schema.ServiceStats) for m in msgs if m.topic() == cfg.topics.service_stats]
    final = arms_from_values(max(reports, key=lambda r: r.ts).values)
    counted = sum(a.clicks for a in final.values())
    # the counters resumed (not restarted from zero): they count every click of both runs except those produced
    # in the killed run's last second (after its last snapshot)
    assert 0 < counted <= len(by_id) <= counted + 2 * 40 * 10 * 0.1
    assert all(final[n].requests > r for n, r in before.items())  # resumed, then more
