"""The ranking service (serving/): ranking equals the model's own scoring, micro-batching batches, hot swaps
under load fail nothing, bad requests get a 4xx with a reason, readiness follows the first model version,
served impressions reach the bus with their ids, arm and version, arms split users stably by share.

The tests serve a small real model over real HTTP (uvicorn on a free port, :class:`serving.client.Client`).
Model versions come from :class:`ExportStore`, a stand-in for ``trainer.publish.VersionStore`` built on
``trainer.export`` (same ``advance`` contract, objects with ``Published``'s attributes)."""

from __future__ import annotations

import json
import socket
import threading
import time

import msgspec
import numpy as np
import pytest
import torch

from config import ArmConfig, TrainerConfig, load_config
from serving import api
from serving.batcher import Job
from serving.catalogue import Catalogue
from serving.client import Client
from serving.models import LocalModel, StaticStore, arms_for_user
from serving.service import RankingService, ServingServer
from streams import schema
from trainer import export

TS = 1_767_225_600_000


# -- helpers -------------------------------------------------------------------------------------------------
def learner(seed: int = 0, steps: int = 0):
    """A small model with spread-out scores (random dense and embedding weights)."""
    from trainer.model import Learner

    lr = Learner(TrainerConfig(hash_buckets=1000, device="cpu", seed=seed))
    perturb(lr, seed)
    lr.steps = steps
    return lr


def perturb(lr, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lr.dense_params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        st = lr.model.emb.export_state()
        st["weights"] = torch.randn(st["weights"].shape, generator=g) * 0.3
        lr.model.emb.import_state(st)


class ExportStore:
    """``advance(current)``: the newest export version (seq = its version number) when newer than current."""

    def __init__(self, root):
        self.root = root
        self.loads = 0

    def advance(self, current):
        vs = export.versions(self.root)
        if not vs:
            return None
        seq = int(vs[-1].name[1:])
        if current is not None and current.seq >= seq:
            return None
        m = export.load(vs[-1], device="cpu")
        self.loads += 1
        return LocalModel(model=m.model, tcfg=m.tcfg, device=m.device, seq=seq, steps=m.steps,
                       trained_ts=m.meta["exported_ts"], created_ts=m.meta["exported_ts"], user_view=m.user_view)


class _Gated(torch.nn.Module):
    """A model whose forward waits for ``gate``: holds a request in flight for as long as a test needs."""

    def __init__(self, inner, gate: threading.Event, entered: threading.Event):
        super().__init__()
        self.inner, self.gate, self.entered = inner, gate, entered
        self.emb = inner.emb

    def forward(self, b):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner(b)


def candidates(n: int, start: int = 0) -> list[dict]:
    return [{"ad_id": start + i, "campaign_id": (start + i) // 3, "advertiser_id": (start + i) // 7} for i in range(n)]


def rank_body(user: int = 5, n: int = 20, **over) -> dict:
    body = {"user_id": user, "domain": "feed", "k": 5, "ts": TS,
            "context": {"device": "ios", "country": "US", "dense": [0.5, -1.0, 2.0], "cat": [3, 9],
                        "history": [5, 8, 13]},
            "candidates": candidates(n)}
    body.update(over)
    return body


def serving_cfg(tmp_path, **serving):
    return load_config(env={}, data_dir=str(tmp_path), serving={"port": 0, **serving})


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- ranking -------------------------------------------------------------------------------------------------
def test_ranking_equals_the_models_own_scores(tmp_path):
    from trainer.score import score_impressions

    lr = learner()
    cfg = serving_cfg(tmp_path)
    cat = Catalogue()
    cat.add(1000, 77, 88, ["feed"])
    svc = RankingService(cfg, {"main": StaticStore(LocalModel.of(lr))}, catalogue=cat)
    body = rank_body(n=30, k=7, request_id="r-17")
    body["candidates"].append(1000)  # a plain id: campaign and advertiser from the catalogue
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        status, res = c.rank(body)
    assert status == 200, res
    assert res["request_id"] == "r-17" and res["arm"] == "main" and res["model_version"] == 1
    ads = res["ads"]
    assert [a["position"] for a in ads] == list(range(7))
    assert [a["p_click"] for a in ads] == sorted((a["p_click"] for a in ads), reverse=True)
    # the same impressions scored by the trainer's scoring code
    ctx = body["context"]
    imps = [schema.Impression(event_id=f"e{i}", ts=TS, user_id=5, ad_id=c["ad_id"], campaign_id=c["campaign_id"],
                              advertiser_id=c["advertiser_id"], domain="feed", position=0, **ctx)
            for i, c in enumerate(body["candidates"][:-1])]
    imps.append(schema.Impression(event_id="e-cat", ts=TS, user_id=5, ad_id=1000, campaign_id=77, advertiser_id=88,
                                  domain="feed", **ctx))
    expect = {imp.ad_id: (r.p_click, r.p_conversion, imp) for imp, r in zip(imps, score_impressions(lr, imps))}
    top = sorted(expect, key=lambda a: -expect[a][0])[:7]
    assert [a["ad_id"] for a in ads] == top
    for a in ads:
        pc, pv, imp = expect[a["ad_id"]]
        assert a["p_click"] == pytest.approx(pc, abs=1e-6) and a["p_conversion"] == pytest.approx(pv, abs=1e-6)
        assert (a["campaign_id"], a["advertiser_id"]) == (imp.campaign_id, imp.advertiser_id)


def test_batching_scores_concurrent_requests_in_one_forward(tmp_path):
    """N queued requests -> one forward pass per arm, and exactly the answers they get one at a time."""
    lr = learner()
    store = StaticStore(LocalModel.of(lr))
    n = 12
    bodies = [rank_body(user=u, n=10 + u, k=4, request_id=f"q{u}", domain=schema.DOMAINS[u % 5]) for u in range(n)]

    def answers(max_batch: int) -> tuple[list, int]:
        cfg = serving_cfg(tmp_path, max_batch=max_batch, max_wait_ms=0)
        svc = RankingService(cfg, {"main": store})
        svc.poller.poll_once()
        jobs = [svc.prepare(api.parse(json.dumps(b).encode(), 1000), time.perf_counter()) for b in bodies]
        for j in jobs:  # all queued before the worker starts: it finds them waiting
            svc.batcher.submit(j)
        svc.batcher.start()
        svc.batcher.stop()
        return [msgspec.structs.replace(j.result, took_ms=0.0) for j in jobs], svc.batcher.forwards

    batched, forwards = answers(max_batch=64)
    single, single_forwards = answers(max_batch=1)
    assert forwards == 1 and single_forwards == n
    assert all(isinstance(r, api.RankResponse) for r in batched)
    for b, s in zip(batched, single):
        assert [a.ad_id for a in b.ads] == [a.ad_id for a in s.ads]
        np.testing.assert_allclose([a.p_click for a in b.ads], [a.p_click for a in s.ads], atol=1e-6)


def test_concurrent_http_requests_share_batches(tmp_path):
    """Over HTTP: while one forward pass runs, the requests arriving meanwhile queue up and share the next."""
    gate, entered = threading.Event(), threading.Event()
    lm = LocalModel.of(learner())
    gated = LocalModel(**{**lm.__dict__, "model": _Gated(lm.model, gate, entered)})
    cfg = serving_cfg(tmp_path, max_batch=64, max_wait_ms=2)
    svc = RankingService(cfg, {"main": StaticStore(gated)})
    n, answers = 8, []
    with ServingServer(cfg, svc) as srv:
        def client(u: int) -> None:
            with Client("127.0.0.1", srv.port) as c:
                answers.append(c.rank(rank_body(user=u, request_id=f"c{u}")))

        threads = [threading.Thread(target=client, args=(0,))]
        threads[0].start()
        assert entered.wait(20)  # request 0 is inside its forward pass
        threads += [threading.Thread(target=client, args=(u,)) for u in range(1, n)]
        for t in threads[1:]:
            t.start()
        wait_for(lambda: svc.batcher.q.qsize() == n - 1, what="the other requests queued")
        gate.set()
        for t in threads:
            t.join(30)
    assert sorted(a[1]["request_id"] for a in answers) == [f"c{u}" for u in range(n)]
    assert all(status == 200 for status, _ in answers)
    assert svc.batcher.forwards == 2 and svc.batcher.batches == 2  # 1 + the 7 that queued meanwhile


# -- versions ------------------------------------------------------------------------------------------------
def train_a_step(lr, seed: int) -> None:
    from trainer.features import featurize

    rng = np.random.default_rng(seed)
    exs = [schema.Example(example_id=f"x{seed}-{i}", click=int(rng.random() < 0.3), conversion=0,
                          impression=schema.Impression(event_id=f"x{seed}-{i}", ts=TS, user_id=int(rng.integers(50)),
                                                       ad_id=int(rng.integers(200)), campaign_id=1, advertiser_id=1,
                                                       domain="feed"))
           for i in range(64)]
    lr.train_step(featurize(exs, lr.tcfg))


class Versions:
    """Writes model versions for a store kind: ``export`` (the stand-in) or ``publish`` (trainer.publish's
    Publisher and VersionStore: full snapshots and deltas)."""

    def __init__(self, kind: str, root):
        self.kind, self.root = kind, root
        if kind == "publish":
            publish = pytest.importorskip("trainer.publish")
            self.publisher = publish.Publisher(root, full_every=3)
            self.store = publish.VersionStore(root, device="cpu")
        else:
            self.store = ExportStore(root)

    def write(self, lr, seq: int) -> None:
        if self.kind == "publish":
            self.publisher.publish(lr)
        else:
            lr.steps = seq
            export.export(lr, self.root)


@pytest.mark.parametrize("kind", ["export", "publish"])
def test_hot_swap_under_load_fails_nothing(tmp_path, kind):
    lr = learner()
    versions = Versions(kind, tmp_path / "models" / "main")
    versions.write(lr, 1)
    cfg = serving_cfg(tmp_path, poll_s=0.02)
    svc = RankingService(cfg, {"main": versions.store})
    seen: dict[int, list[int]] = {}
    failures: list = []
    stop = threading.Event()
    with ServingServer(cfg, svc) as srv:
        def hammer(u: int) -> None:
            with Client("127.0.0.1", srv.port) as c:
                while not stop.is_set():
                    status, res = c.rank(rank_body(user=u, n=50))
                    if status != 200:
                        failures.append((status, res))
                    else:
                        seen.setdefault(u, []).append(res["model_version"])

        threads = [threading.Thread(target=hammer, args=(u,)) for u in range(4)]
        for t in threads:
            t.start()
        for seq in range(2, 8):  # six new versions while the clients hammer
            train_a_step(lr, seq)
            versions.write(lr, seq)
            wait_for(lambda: svc.slots["main"].current.seq == seq, what=f"version {seq} served")
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert svc.slots["main"].swaps == 7 and svc.slots["main"].refused == 0
    for u, vs in seen.items():
        assert vs == sorted(vs), f"client {u} saw a version go back: {vs}"
    assert max(max(v) for v in seen.values()) == 7
    assert len({v for vs in seen.values() for v in vs}) >= 3  # requests were served across several versions


def test_a_corrupt_version_is_refused_and_the_previous_keeps_serving(tmp_path):
    lr = learner()
    versions = Versions("publish", tmp_path / "models" / "main")
    versions.write(lr, 1)
    train_a_step(lr, 2)
    versions.write(lr, 2)
    cfg = serving_cfg(tmp_path, poll_s=0.02)
    svc = RankingService(cfg, {"main": versions.store})
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        assert c.rank(rank_body())[1]["model_version"] == 2
        train_a_step(lr, 3)
        versions.write(lr, 3)
        v3 = sorted(p for p in versions.root.iterdir() if p.name.startswith("v"))[-1]
        damaged = next(f for f in sorted(v3.iterdir()) if f.suffix == ".pt")
        damaged.write_bytes(b"\0" * 100)  # checksum no longer matches
        wait_for(lambda: c.json("GET", "/models")[1]["arms"][0].get("versions_refused", 0) >= 1,
                 what="the damaged version listed as refused")
        for _ in range(20):
            status, res = c.rank(rank_body())
            assert status == 200 and res["model_version"] == 2
        train_a_step(lr, 4)
        versions.write(lr, 4)  # a good version after the bad one (a full snapshot: full_every=3) is served
        wait_for(lambda: c.rank(rank_body())[1]["model_version"] == 4, what="version 4 served")


def test_readiness_before_and_after_the_first_model(tmp_path):
    root = tmp_path / "models" / "main"
    cfg = serving_cfg(tmp_path, poll_s=0.05)
    svc = RankingService(cfg, {"main": ExportStore(root)})
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        assert c.request("GET", "/healthz")[0] == 200
        status, res = c.json("GET", "/readyz")
        assert status == 503 and "main" in res["error"]
        status, res = c.rank(rank_body())
        assert status == 503 and "no model version yet" in res["error"]
        assert c.json("GET", "/models")[1]["arms"][0]["ready"] is False
        export.export(learner(steps=3), root)
        wait_for(lambda: c.request("GET", "/readyz")[0] == 200, what="readiness")
        status, res = c.rank(rank_body())
        assert status == 200 and res["model_version"] == 3 and res["model_steps"] == 3
        arm = c.json("GET", "/models")[1]["arms"][0]
        assert arm["ready"] and arm["seq"] == 3 and arm["steps"] == 3 and arm["age_s"] >= 0


# -- bad requests --------------------------------------------------------------------------------------------
def hostile_bodies(max_candidates: int) -> list[tuple[str, bytes, int, str]]:
    good = rank_body()

    def j(**over) -> bytes:
        return json.dumps({**good, **over}).encode()

    ctx = good["context"]
    cases = [
        ("empty body", b"", 400, "malformed JSON"),
        ("truncated JSON", j()[:-5], 400, "malformed JSON"),
        ("not JSON", b"\x00\x01binary\xff", 400, "malformed JSON"),
        ("invalid UTF-8 in a string", j(domain="feed").replace(b'"ios"', b'"a\xff\xfe"'), 400, ""),
        ("deep nesting", b"[" * 5000 + b"]" * 5000, 400, ""),
        ("an array, not an object", b"[1, 2]", 400, "object"),
        ("JSON null", b"null", 400, ""),
        ("user_id a string", j(user_id="5"), 400, "user_id"),
        ("user_id negative", j(user_id=-1), 400, "user_id"),
        ("user_id above 2**63", j(user_id=2**64), 400, "user_id"),
        ("user_id a float", j(user_id=1.5), 400, "user_id"),
        ("user_id missing", json.dumps({k: v for k, v in good.items() if k != "user_id"}).encode(), 400, "user_id"),
        ("unknown domain", j(domain="moon"), 422, "unknown domain"),
        ("domain SQL", j(domain="feed'; DROP TABLE x; --"), 422, "unknown domain"),
        ("domain oversized", j(domain="f" * 5000), 400, "domain"),
        ("unknown field", j(candidate=[1]), 400, "unknown field"),
        ("k zero", j(k=0), 400, "k"),
        ("k a string", j(k="3"), 400, "k"),
        ("ts out of range", j(ts=12), 400, "ts"),
        ("request_id with a space", j(request_id="a b"), 400, "request_id"),
        ("request_id HTML", j(request_id="<script>alert(1)</script>"), 400, "request_id"),
        ("request_id SQL", j(request_id="x';drop"), 400, "request_id"),
        ("request_id too long", j(request_id="r" * 65), 400, "request_id"),
        ("request_id empty", j(request_id=""), 400, "request_id"),
        ("device markup", j(context={**ctx, "device": "<b>"}), 400, "device"),
        ("dense NaN", j().replace(b"0.5", b"NaN"), 400, "malformed JSON"),
        ("dense infinity", j().replace(b"0.5", b"1e999"), 400, "dense"),
        ("dense a string", j(context={**ctx, "dense": ["x"]}), 400, "dense"),
        ("history too long", j(context={**ctx, "history": list(range(300))}), 400, "history"),
        ("context unknown field", j(context={**ctx, "evil": 1}), 400, "unknown field"),
        ("candidates an object", j(candidates={"ad_id": 1}), 400, "candidates"),
        ("candidates empty", j(candidates=[]), 400, "empty"),
        ("candidate negative id", j(candidates=[{"ad_id": -4}]), 400, "candidates"),
        ("candidate plain negative id", j(candidates=[-4]), 400, "candidates"),
        ("candidate a string", j(candidates=["7"]), 400, "candidates"),
        ("candidate without ad_id", j(candidates=[{"campaign_id": 1}]), 400, "ad_id"),
        ("candidate unknown to the catalogue", j(candidates=[123456]), 422, "unknown ad id"),
        ("candidate missing its advertiser, unknown ad", j(candidates=[{"ad_id": 99, "campaign_id": 1}]), 422,
         "unknown ad id"),
        ("too many candidates", j(candidates=candidates(max_candidates + 1)), 413, "at most"),
        ("huge body", j(context={**ctx, "country": "x" * 2_000_000}), 413, "body"),
    ]
    # the project's corpus of malformed events, thrown at /rank as bodies (none of them is a request)
    from streams.sources.hostile import make_bad_records

    imp = schema.Impression(event_id="i1", ts=TS, user_id=7, ad_id=3, campaign_id=1, advertiser_id=1, domain="feed")
    for bad in make_bad_records([imp], 40, np.random.default_rng(0)):
        cases.append((f"hostile record {bad.kind}", bad.raw, 0, ""))
    return cases


def test_bad_requests_get_a_4xx_with_a_reason(tmp_path):
    cfg = serving_cfg(tmp_path, max_candidates=50)
    svc = RankingService(cfg, {"main": StaticStore(LocalModel.of(learner()))})
    cases = hostile_bodies(50)
    with ServingServer(cfg, svc) as srv:
        with Client("127.0.0.1", srv.port) as c:
            for name, body, want, reason in cases:
                status, raw = c.request("POST", "/rank", body)
                assert 400 <= status < 500, (name, status, raw[:300])
                if want:
                    assert status == want, (name, status, raw[:300])
                err = json.loads(raw)["error"]
                assert isinstance(err, str) and err, name
                assert reason.lower() in err.lower(), (name, err)
            for method, path, want in (("GET", "/rank", 405), ("GET", "/nope", 404), ("PUT", "/models", 405)):
                status, raw = c.request(method, path)
                assert status == want and json.loads(raw)["error"], (method, path, raw)
            # still serving
            assert c.rank(rank_body())[0] == 200
        # a chunked body over the limit (no Content-Length): refused while reading, not buffered whole
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /rank HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"a" * 65536
            try:
                for _ in range(40):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass
            head = s.recv(65536)
            assert head.startswith(b"HTTP/1.1 413"), head[:200]
    values = svc.stats.take()
    assert values["errors.400"] > 30 and values["errors.413"] >= 3 and values["errors.422"] >= 3


# -- impressions and retrieval through a real broker ----------------------------------------------------------
def test_served_impressions_reach_the_bus(cfg):
    from conftest import read_topics
    from streams.bus.partition import partition_for

    cfg = load_config(env={}, **{**msgspec.to_builtins(cfg), "serving": {"port": 0, "retrieve_k": 8}})
    svc = RankingService(cfg, {"main": StaticStore(LocalModel.of(learner(), seq=4))})
    assert svc.emit_on and svc.feed is not None
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        answers = {}
        for u in range(6):
            status, res = c.rank(rank_body(user=u, n=12, k=3, request_id=f"req-{u}", domain="video"))
            assert status == 200, res
            answers[res["request_id"]] = res
        # the catalogue feed reads the served impressions back: requests without candidates retrieve them
        wait_for(lambda: len(svc.catalogue) >= 6, what="catalogue fed from the impressions topic")
        wait_for(lambda: "main" in svc.indexes, what="ANN index built")
        status, retrieved = c.rank({"user_id": 3, "domain": "video", "k": 5, "request_id": "retrieved"})
        assert status == 200, retrieved
        assert 0 < len(retrieved["ads"]) <= 5
        assert all(svc.catalogue.on_domain(a["ad_id"], "video") for a in retrieved["ads"])
        assert c.rank({"user_id": 3, "domain": "search"})[0] == 503  # nothing live on that domain yet
    msgs = read_topics(cfg, [cfg.topics.impressions, cfg.topics.service_stats])
    imps = [schema.decode(m.value(), schema.Impression) for m in msgs if m.topic() == cfg.topics.impressions]
    stats = [schema.decode(m.value(), schema.ServiceStats) for m in msgs if m.topic() == cfg.topics.service_stats]
    by_id = {i.event_id: i for i in imps}
    assert len(by_id) == 6 * 3 + len(retrieved["ads"])
    answers["retrieved"] = retrieved
    for rid, ans in answers.items():
        for ad in ans["ads"]:
            imp = by_id[f"{rid}.{ad['position']}"]
            assert (imp.ad_id, imp.campaign_id, imp.advertiser_id) == (ad["ad_id"], ad["campaign_id"],
                                                                      ad["advertiser_id"])
            assert imp.arm == "main" and imp.model_version == 4 and imp.domain == "video"
            assert imp.position == ad["position"] and imp.user_id == (3 if rid == "retrieved" else int(rid[4:]))
            if rid != "retrieved":
                assert imp.ts == TS and imp.device == "ios" and imp.history == [5, 8, 13]
    for m in msgs:
        if m.topic() == cfg.topics.impressions:
            assert m.partition() == partition_for(m.key(), cfg.topics.partitions)
            assert m.key() == str(schema.decode(m.value(), schema.Impression).user_id).encode()
    serving = [s for s in stats if isinstance(s, schema.ServiceStats) and s.component == "serving"]
    assert serving and max(s.values["requests"] for s in serving) >= 6
    assert "arm_seq.main" in serving[-1].values and "impressions_pending" in serving[-1].values


def test_a_broker_outage_fails_no_request(tmp_path):
    """Nothing listens on the broker address: requests are answered as usual, impressions wait in memory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = load_config(env={}, data_dir=str(tmp_path), kafka={"bootstrap_servers": dead}, serving={"port": 0})
    svc = RankingService(cfg, {"main": StaticStore(LocalModel.of(learner()))}, feed=False)
    assert svc.emit_on
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        t0 = time.monotonic()
        for u in range(20):
            assert c.rank(rank_body(user=u, k=5))[0] == 200
        assert time.monotonic() - t0 < 10
        wait_for(lambda: svc.emitter.pending_count() == 100, what="100 impressions pending")
        svc.emitter.flush_s = 0.5  # at the end, give up waiting for the broker quickly


def test_retrieval_from_a_catalogue_file(tmp_path):
    path = tmp_path / "ads.jsonl"
    path.write_text("".join(json.dumps({"ad_id": a, "campaign_id": a // 4, "advertiser_id": a // 16,
                                        "domains": ["feed"] if a % 2 else ["search"]}) + "\n" for a in range(200)))
    cat = Catalogue()
    assert cat.load_file(path) == 200
    cfg = serving_cfg(tmp_path, retrieve_k=20)
    svc = RankingService(cfg, {"main": StaticStore(LocalModel.of(learner(), seq=2))}, catalogue=cat)
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        assert svc.indexes["main"].seq == 2 and len(svc.indexes["main"]) == 200
        status, res = c.rank({"user_id": 11, "domain": "feed", "k": 20})
        assert status == 200 and len(res["ads"]) == 20
        assert all(a["ad_id"] % 2 == 1 and a["campaign_id"] == a["ad_id"] // 4 for a in res["ads"])
        # plain ids take their metadata from the catalogue
        status, res = c.rank({"user_id": 11, "domain": "feed", "candidates": [5, 7], "k": 2})
        assert status == 200 and {(a["ad_id"], a["advertiser_id"]) for a in res["ads"]} == {(5, 0), (7, 0)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ad_id": 1, "campaign_id": 1, "advertiser_id": 1, "domains": ["moon"]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: unknown domain"):
        Catalogue().load_file(bad)


def test_ad_indexes_follow_model_versions_and_new_ads(tmp_path, monkeypatch):
    import serving.service as service_mod
    from serving.models import table_rows

    monkeypatch.setattr(service_mod, "INDEX_REBUILD_S", 0.0)
    cat = Catalogue()
    for a in range(10):
        cat.add(a, a, a, ["feed"])
    store = StaticStore(LocalModel.of(learner(0), seq=1))
    svc = RankingService(serving_cfg(tmp_path), {"main": store}, catalogue=cat)
    svc.poller.poll_once()
    svc.refresh_indexes()
    first = svc.indexes["main"]
    assert first.seq == 1 and len(first) == 10
    for a in range(10, 15):
        cat.add(a, a, a, ["feed"])
    svc.refresh_indexes()
    assert svc.indexes["main"] is first and len(first) == 15  # new ads added to the same version's index
    store.model = LocalModel.of(learner(1), seq=2)
    svc.poller.poll_once()
    svc.refresh_indexes()
    second = svc.indexes["main"]
    assert second.seq == 2 and len(second) == 15
    ids = np.arange(15)
    from embedding_store.ann import normalize

    np.testing.assert_allclose(second.index.get(ids), normalize(table_rows(store.model, 1, ids)), atol=1e-6)


# -- arms ----------------------------------------------------------------------------------------------------
def test_arm_split_is_stable_and_follows_the_shares(tmp_path):
    arms = (ArmConfig(name="A", share=0.8), ArmConfig(name="B", share=0.2), ArmConfig(name="S", shadow=True))
    users = range(50_000)
    first = [arms_for_user(u, arms) for u in users]
    assert first == [arms_for_user(u, arms) for u in users]  # stable
    share_a = first.count("A") / len(first)
    assert abs(share_a - 0.8) < 0.01 and "S" not in first
    # the service: each user served by its arm's model; the shadow arm scores every request, serves none
    cfg = serving_cfg(tmp_path, arms=[{"name": "A", "share": 0.8}, {"name": "B", "share": 0.2},
                                      {"name": "S", "shadow": True}])
    stores = {"A": StaticStore(LocalModel.of(learner(0), seq=1, arm="A")),
              "B": StaticStore(LocalModel.of(learner(1), seq=9, arm="B")),
              "S": StaticStore(LocalModel.of(learner(2), seq=5, arm="S"))}
    svc = RankingService(cfg, stores)
    with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
        for u in range(30):
            status, res = c.rank(rank_body(user=u))
            assert status == 200 and res["arm"] == arms_for_user(u, cfg.serving.arms)
            assert res["model_version"] == {"A": 1, "B": 9}[res["arm"]]
    values = svc.values()
    assert 0.0 <= values["shadow_agreement.S"] <= 1.0
    assert values["arm_seq.A"] == 1 and values["arm_seq.B"] == 9 and values["arm_seq.S"] == 5


def test_a_job_for_an_arm_without_a_model_is_refused_not_crashed(tmp_path):
    cfg = serving_cfg(tmp_path)
    svc = RankingService(cfg, {"main": StaticStore(None)})
    req = api.parse(json.dumps(rank_body()).encode(), 1000)
    assert isinstance(svc.prepare(req, 0.0), api.BadRequest)
    job = Job(req=req, request_id="x", ts=TS, arm="main", imps=None, t0=0.0)
    svc.batcher.process([job])
    assert job.result.status == 503


# -- the command ---------------------------------------------------------------------------------------------
def test_serve_command_waits_for_a_model_and_stops_on_sigterm(tmp_path):
    pytest.importorskip("trainer.publish")
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "STREAMREC_DATA_DIR": str(tmp_path),
           "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": ""}
    p = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--port", "0"], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("no model version yet" in ln for ln in lines):
            line = p.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = next(ln for ln in lines if ln.startswith("serve: http"))
        port = int(url.split()[1].rsplit(":", 1)[1].split("/")[0])
        with Client("127.0.0.1", port) as c:
            assert c.request("GET", "/readyz")[0] == 503
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_stop_answers_the_requests_in_flight(tmp_path, capsys):
    """run_serve: no model -> a clear message and 503; the first version is picked up; a stop (what SIGTERM
    does) while a request is being scored still answers it, then the command exits 0."""
    from serving.service import run_serve

    root = tmp_path / "models" / "main"
    gate, entered, stop = threading.Event(), threading.Event(), threading.Event()
    cfg = serving_cfg(tmp_path, poll_s=0.05)
    servers = []

    class GatedStore(ExportStore):
        def advance(self, current):
            new = super().advance(current)
            return None if new is None else LocalModel(**{**new.__dict__, "model": _Gated(new.model, gate, entered)})

    rc = []
    t = threading.Thread(target=lambda: rc.append(run_serve(cfg, stop_event=stop, stores={"main": GatedStore(root)},
                                                            on_start=servers.append)))
    t.start()
    try:
        wait_for(lambda: servers, what="the server listening")
        port = servers[0].port
        with Client("127.0.0.1", port) as c:
            assert c.request("GET", "/readyz")[0] == 503
            export.export(learner(steps=2), root)
            wait_for(lambda: c.request("GET", "/readyz")[0] == 200, what="readiness")
        answer = []
        slow = threading.Thread(target=lambda: answer.append(Client("127.0.0.1", port).rank(rank_body())))
        slow.start()
        assert entered.wait(20)  # the request is inside the forward pass
        stop.set()
        time.sleep(0.3)  # the server has stopped accepting meanwhile
        gate.set()
        slow.join(30)
        t.join(60)
        assert answer and answer[0][0] == 200 and answer[0][1]["model_version"] == 2
        assert rc == [0]
        with pytest.raises(OSError):
            Client("127.0.0.1", port, timeout=2).request("GET", "/healthz")
    finally:
        gate.set()
        stop.set()
        t.join(60)
    out = capsys.readouterr().out
    assert "no model version yet for arm(s) main" in out and "serve: ready (main v2)" in out


def _serve_process(tmp_path):
    """`streamrec serve` on a free port over ``tmp_path``'s models (no broker): (process, port) once it listens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "STREAMREC_DATA_DIR": str(tmp_path),
           "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": "", "STREAMREC_SERVING__POLL_S": "0.05"}
    p = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--port", "0"], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    while not any(ln.startswith("serve: http") for ln in lines):
        line = p.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    url = next(ln for ln in lines if ln.startswith("serve: http"))
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # keep the pipe drained
    return p, int(url.split()[1].rsplit(":", 1)[1].split("/")[0])


def test_a_sigkilled_service_restarts_serving_the_newest_valid_version(tmp_path):
    import signal

    lr = learner()
    versions = Versions("publish", tmp_path / "models" / "main")
    for seq in (1, 2, 3):
        train_a_step(lr, seq)
        versions.write(lr, seq)
    p, port = _serve_process(tmp_path)
    try:
        with Client("127.0.0.1", port) as c:
            wait_for(lambda: c.request("GET", "/readyz")[0] == 200, what="ready")
            assert c.rank(rank_body())[1]["model_version"] == 3
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        # while it is down the trainer goes on: a good delta, then one that is damaged (its checksum fails)
        train_a_step(lr, 4)
        versions.write(lr, 4)
        train_a_step(lr, 5)
        versions.write(lr, 5)
        v5 = sorted(d for d in versions.root.iterdir() if d.name.startswith("v"))[-1]
        damaged = next(f for f in sorted(v5.iterdir()) if f.suffix == ".pt")
        damaged.write_bytes(damaged.read_bytes()[:-7] + b"corrupt")
        p, port = _serve_process(tmp_path)
        with Client("127.0.0.1", port) as c:
            wait_for(lambda: c.request("GET", "/readyz")[0] == 200, what="ready after the restart")
            for _ in range(5):  # the newest *valid* version, every time
                status, res = c.rank(rank_body())
                assert status == 200 and res["model_version"] == 4, res
            arm = c.json("GET", "/models")[1]["arms"][0]
            assert arm.get("versions_refused", 0) >= 1, arm
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_no_answered_impression_is_lost_to_a_sigkill(cfg, tmp_path):
    """SIGKILL the service right after its last answer: with ``serving.ack_impressions`` (the default) every
    impression of every answered request is on the topic. (Without it the ones still queued in the process die
    with it; how many depends on timing, so that side is not asserted.)"""
    ack = True
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from conftest import read_topics

    lr = learner()
    versions = Versions("publish", Path(cfg.models_dir()) / "main")
    versions.write(lr, 1)
    conf = msgspec.to_builtins(cfg)
    conf["serving"] = {"port": 0, "ack_impressions": ack}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(conf))
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(path), "serve"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        while not any(ln.startswith("serve: http") for ln in lines):
            line = p.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        port = int(next(ln for ln in lines if ln.startswith("serve: http")).split()[1].rsplit(":", 1)[1].split("/")[0])
        answered: dict[str, list[int]] = {}
        with Client("127.0.0.1", port) as c:
            wait_for(lambda: c.request("GET", "/readyz")[0] == 200, what="ready")
            for u in range(40):
                status, res = c.rank(rank_body(user=u, n=10, k=4, request_id=f"kill-{ack}-{u}"))
                assert status == 200, res
                answered[res["request_id"]] = [a["position"] for a in res["ads"]]
            p.send_signal(signal.SIGKILL)  # at once: nothing more is flushed
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    msgs = read_topics(cfg, [cfg.topics.impressions], timeout=10.0)
    on_topic = {schema.decode(m.value(), schema.Impression).event_id for m in msgs}
    expected = {f"{rid}.{pos}" for rid, positions in answered.items() for pos in positions}
    missing = expected - on_topic
    assert not missing, f"{len(missing)} impressions of answered requests lost: {sorted(missing)[:5]}"
