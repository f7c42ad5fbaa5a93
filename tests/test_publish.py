"""Continuous publishing (trainer/publish.py): full + deltas rebuild the model bit for bit on every backend,
corrupt or partial versions are refused and the previous one serves, a writer SIGKILLed mid-write never
leaves an unloadable store, retention, pin/rollback through the CLI, and the trainer publishing as it trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from config import TrainerConfig
from streams import schema
from trainer.embeddings import fbgemm_available
from trainer.features import featurize, featurize_impressions
from trainer.model import Learner
from trainer.publish import Publisher, Published, VersionError, VersionStore, read_pin, seq_name
from trainer.users.features import UserVectors

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", *(["fbgemm", "fiited"] if fbgemm_available("cpu") else [])]
# a FIITED store that admits after 2 hits (shared rows train), evicts and resizes often, under a tight budget
FIITED = {"admit_hits": 2, "maintain_every": 3, "resize_every": 6, "ttl_steps": 8, "budget": 0.15,
          "protect_quantile": 0.5}


def _tcfg(backend: str, **kw) -> TrainerConfig:
    return TrainerConfig(hash_buckets=300, device="cpu", backend=backend, cat_slots=2, dense_dim=3, history_len=3,
                         user_dim=4, batch_size=64, fiited=FIITED if backend == "fiited" else {}, **kw)


def _examples(rng: np.random.Generator, n: int, start: int = 0) -> list[schema.Example]:
    ads = rng.zipf(1.3, n) % 2000
    users = rng.zipf(1.2, n) % 5000
    out = []
    for i in range(n):
        imp = schema.Impression(event_id=f"i{start + i}", ts=1_700_000_000_000 + start + i, user_id=int(users[i]),
                                ad_id=int(ads[i]), campaign_id=int(ads[i]) // 4, advertiser_id=int(ads[i]) // 20,
                                domain=schema.DOMAINS[i % 5], device=schema.DEVICES[i % 4],
                                cat=[int(x) for x in rng.integers(0, 500, 2)], dense=rng.normal(size=3).tolist(),
                                history=[int(x) for x in rng.zipf(1.3, 3) % 2000])
        out.append(schema.Example(example_id=f"e{start + i}", impression=imp, click=int(rng.random() < 0.3),
                                  conversion=int(rng.random() < 0.05)))
    return out


def _learner(backend: str) -> Learner:
    learner = Learner(_tcfg(backend))
    torch.manual_seed(1)
    learner.user_view = UserVectors(4, torch.randn(97, 4))
    return learner


def _train(learner: Learner, rng: np.random.Generator, steps: int, start: int) -> int:
    view = learner.user_view
    for k in range(steps):
        exs = _examples(rng, 64, start)
        start += 64
        learner.train_step(featurize(exs, learner.tcfg, view))
        # the user model's thread meanwhile: new and refreshed users, users leaving, ad rows trained
        view.update(rng.integers(0, 400, 5), rng.normal(size=(5, 4)).astype(np.float32))
        if k % 3 == 0:
            view.delete(rng.integers(0, 400, 3))
        with torch.no_grad():
            view.ad_table[torch.from_numpy(rng.integers(0, 97, 2))] += 0.01
    return start


def _expected(learner: Learner) -> dict:
    emb = learner.model.emb
    st = emb.serving_state()
    v = learner.user_view.vectors()
    order = torch.argsort(v["ids"])
    return {"weights": st["weights"].reshape(-1, emb.dim), "widths": st["widths"].reshape(-1),
            "dense": {k: t for k, t in learner.model.state_dict().items() if not k.startswith("emb.")},
            "ids": v["ids"][order], "vectors": v["vectors"][order], "ad": learner.user_view.ad_table.clone()}


def _assert_same(p: Published, want: dict) -> None:
    emb = p.model.emb
    got_w = emb.export_state()["weights"].reshape(-1, emb.dim)
    assert torch.equal(got_w.view(torch.int32), want["weights"].view(torch.int32)), "embedding rows differ"
    assert torch.equal(p.embedding_widths, want["widths"].to(p.embedding_widths.dtype)), "widths differ"
    dense = {k: t for k, t in p.model.state_dict().items() if not k.startswith("emb.")}
    assert dense.keys() == want["dense"].keys()
    for k, t in dense.items():
        assert torch.equal(t, want["dense"][k]), k
    v = p.user_view.vectors()
    order = torch.argsort(v["ids"])
    assert torch.equal(v["ids"][order], want["ids"]) and torch.equal(v["vectors"][order], want["vectors"])
    assert torch.equal(p.user_view.ad_table, want["ad"])


def _scores(p: Published, imps: list[schema.Impression]) -> np.ndarray:
    from trainer.features import TorchBatch, user_features

    idx, off, dense, dom = featurize_impressions(imps, p.tcfg)
    user = user_features(imps, p.tcfg, p.user_view)
    with torch.no_grad():
        tb = TorchBatch(indices=torch.from_numpy(idx), offsets=torch.from_numpy(off), dense=torch.from_numpy(dense),
                        domain=torch.from_numpy(dom), click=None, conversion=None, weight=None,
                        num_tables=p.model.num_tables, batch_size=len(imps), user=torch.from_numpy(user))
        pc, pv = p.model(tb)
    return np.stack([pc.numpy(), pv.numpy()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_plus_deltas_rebuild_a_fresh_full_bit_for_bit(tmp_path, backend):
    rng = np.random.default_rng(7)
    learner = _learner(backend)
    pub = Publisher(tmp_path / "main", full_every=6, keep_full=10)
    store = VersionStore(tmp_path / "main")
    full_loads = []
    load_full = store._load_full
    store._load_full = lambda seq, m: (full_loads.append(seq), load_full(seq, m))[1]
    served, before, n, kinds = None, None, 0, []
    probe = [e.impression for e in _examples(np.random.default_rng(99), 300)]
    for version in range(1, 15):
        n = _train(learner, rng, 4 if version % 2 else 9, n)
        info = pub.publish(learner, examples_trained=n, trained_ts=1000 + version)
        kinds.append(info.kind)
        want = _expected(learner)
        nxt = store.advance(served)
        assert nxt is not None and nxt.seq == info.seq == version and nxt.steps == learner.steps
        if served is not None:  # the old version is untouched by the swap
            assert torch.equal(served.model.emb.export_state()["weights"], before)
        _assert_same(nxt, want)
        # a fresh full snapshot of the same state scores identically
        fresh = Publisher(tmp_path / f"fresh{version}")
        fresh.publish(learner, examples_trained=n, full=True)
        ref = VersionStore(tmp_path / f"fresh{version}").load()
        _assert_same(ref, want)
        assert np.array_equal(_scores(nxt, probe), _scores(ref, probe))
        served, before = nxt, nxt.model.emb.export_state()["weights"].clone()
        assert store.advance(served) is None  # nothing newer
    assert kinds == ["full", *["delta"] * 5, "full", *["delta"] * 5, "full", "delta"]
    assert full_loads == [1, 7, 13]  # every delta was applied to (a copy of) the served version
    sizes = {i.seq: i.bytes for i in store.list()}
    assert all(i.ok for i in store.list())
    assert max(sizes[s] for s in (2, 3, 4, 5, 6)) < sizes[1]
    if backend == "fiited":  # the store did evict, resize and train shared rows between versions
        c = learner.model.emb.counters
        assert c["evicted"] > 0 and c["resized"] > 0
        deltas = [json.loads((tmp_path / "main" / seq_name(s) / "manifest.json").read_text()) for s in range(2, 7)]
        assert any(d["counts"]["fill_tables"] for d in deltas)
    # a cold reader rebuilds the newest from its full and deltas: the same model
    cold = VersionStore(tmp_path / "main").load()
    assert cold.seq == 14
    _assert_same(cold, _expected(learner))


def _store_with_versions(root: Path, n: int, full_every: int = 3, backend: str = "torch") -> Learner:
    rng = np.random.default_rng(3)
    learner = _learner(backend)
    pub = Publisher(root, full_every=full_every, keep_full=10)
    k = 0
    for _ in range(n):
        k = _train(learner, rng, 2, k)
        pub.publish(learner, examples_trained=k)
    return learner


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_truncated_or_missing_files_are_refused_and_the_previous_version_serves(tmp_path, caplog):
    root = tmp_path / "main"
    _store_with_versions(root, 6)  # fulls 1, 4; deltas 2, 3, 5, 6
    store = VersionStore(root)
    v5 = store.load(5)
    assert store.load().seq == 6

    _flip(root / seq_name(6) / "rows.pt")  # a flipped byte in the newest delta
    store = VersionStore(root)
    with caplog.at_level("WARNING", logger="streamrec.publish"):
        assert store.load().seq == 5
        assert store.advance(v5) is None  # the service keeps serving 5
        assert store.advance(v5) is None and store.advance(v5) is None
    assert sum("refusing model version v000000000006" in r.message for r in caplog.records) == 1  # logged once
    assert list(store.refused()) == [6] and "sha256" in store.refused()[6]
    with pytest.raises(VersionError, match="sha256"):
        store.load(6)
    info = {i.seq: i for i in store.list()}
    assert not info[6].ok and "rows.pt" in info[6].reason and "sha256" in info[6].reason
    assert all(info[s].ok for s in (1, 2, 3, 4, 5))

    dense = root / seq_name(5) / "dense.pt"  # truncated: 5 fails, and 6 builds on it
    dense.write_bytes(dense.read_bytes()[:-10])
    store = VersionStore(root)
    assert store.load().seq == 4
    assert store.advance(v5) is None  # never back to an older version unless pinned
    with pytest.raises(VersionError, match="truncated"):
        store.load(5)

    m6 = root / seq_name(6) / "manifest.json"  # an altered manifest (a field the files' checksums do not cover)
    m6.write_text(m6.read_text().replace('"steps": 12', '"steps": 13'))
    assert "manifest.json differs from its own sha256" in {i.seq: i for i in VersionStore(root).list()}[6].reason

    (root / seq_name(4) / "manifest.json").unlink()  # a missing manifest: 4 and every delta on it refused
    store = VersionStore(root)
    assert store.load().seq == 3
    info = {i.seq: i for i in store.list()}
    assert "no manifest.json" in info[4].reason and not info[5].ok and info[3].ok
    assert store.advance(None).seq == 3

    (root / seq_name(2) / "rows.pt").unlink()  # a missing file: the chain 1-2-3 breaks at 2, 1 still serves
    store = VersionStore(root)
    assert store.load().seq == 1
    with pytest.raises(VersionError, match="missing"):
        store.load(2)
    # the next full snapshot serves again
    learner = _learner("torch")
    Publisher(root, full_every=3).publish(learner)
    assert VersionStore(root).load().seq == 7
    for d in root.iterdir():
        if d.name.startswith("v"):
            for f in d.iterdir():
                f.unlink()
    with pytest.raises(VersionError, match="no usable model version"):
        VersionStore(root).load()


def test_retention_keeps_the_newest_full_chains_and_the_pinned_one(tmp_path):
    from trainer.publish import write_pin

    root = tmp_path / "main"
    rng = np.random.default_rng(0)
    learner = _learner("torch")
    pub = Publisher(root, full_every=2, keep_full=2)
    k = 0
    for seq in range(1, 8):  # fulls 1, 3, 5, 7
        k = _train(learner, rng, 1, k)
        pub.publish(learner)
        if seq == 2:
            write_pin(root, 2)
    assert sorted(i.seq for i in VersionStore(root).list()) == [1, 2, 5, 6, 7]
    write_pin(root, None)
    for _ in range(2):
        pub.publish(learner)
    assert sorted(i.seq for i in VersionStore(root).list()) == [7, 8, 9]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


_KILLED_WRITER = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from tests.test_publish import _learner, _train
from trainer.publish import Publisher
learner = _learner("torch")
learner.tcfg  # noqa
pub = Publisher(sys.argv[1], full_every=3, keep_full=2)
rng, k = np.random.default_rng(int(sys.argv[2])), 0
while True:
    k = _train(learner, rng, 1, k)
    print("publishing", pub.seq + 1, flush=True)
    pub.publish(learner, examples_trained=k)
"""


def test_a_writer_killed_mid_write_leaves_a_store_whose_newest_valid_version_loads(tmp_path):
    root = tmp_path / "main"
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER.format(root=str(ROOT)))
    rng = np.random.default_rng(2024)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    served, leftovers, completed = None, 0, 0
    for kill in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(kill)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)
        try:
            target = int(rng.integers(1, 5))  # the target-th publish of this process, a few ms into it
            for _ in range(target):
                line = proc.stdout.readline()
                assert line.startswith("publishing"), proc.stderr.read()[-2000:]
            completed += target - 1  # the publishes before the one being killed had finished
            time.sleep(float(rng.uniform(0, 0.03)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        leftovers += any(p.name.endswith(".tmp") for p in root.iterdir())
        store = VersionStore(root)
        infos = store.list()
        assert all(i.ok for i in infos), infos  # a partial version is never visible
        # a kill inside the very first (full) publish leaves no version, which is right; else the newest loads
        assert len(infos) >= min(completed, 1), (completed, infos)
        if not infos:
            continue
        newest = store.load()
        assert newest.seq == infos[-1].seq
        served = store.advance(served) or served
        assert served.seq == newest.seq
    print(f"kills that left a temporary directory: {leftovers} of 4")


def _models(*args: str, root: Path | None, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    where = ["--dir", str(root)] if root is not None else []
    return subprocess.run([sys.executable, "-m", "deploy.cli", "models", *args, *where],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_models_list_and_rollback_cli(tmp_path):
    root = tmp_path / "main"
    _store_with_versions(root, 5)
    _flip(root / seq_name(5) / "dense.pt")
    out = _models("list", "--json", root=root)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["seq"], r["kind"], r["base"], r["ok"], r["pinned"]) for r in rows] == [
        (1, "full", 1, True, False), (2, "delta", 1, True, False), (3, "delta", 1, True, False),
        (4, "full", 4, True, False), (5, "delta", 4, False, False)]
    assert "sha256" in rows[4]["reason"] and rows[4]["bytes"] > 0 and rows[0]["steps"] == 2

    out = _models("rollback", "5", root=root)  # a version that does not load is not pinned
    assert out.returncode == 1 and "sha256" in out.stderr and read_pin(root) is None
    out = _models("rollback", "2", root=root)
    assert out.returncode == 0, out.stderr
    assert read_pin(root) == 2 and VersionStore(root).load().seq == 2
    current = VersionStore(root).load(4)
    assert VersionStore(root).advance(current).seq == 2  # a pin rolls a serving process back
    table = _models("list", root=root)
    assert table.returncode == 0 and "REFUSED" in table.stdout and "*" in table.stdout.splitlines()[3]
    out = _models("rollback", "--latest", root=root)
    assert out.returncode == 0 and read_pin(root) is None and VersionStore(root).load().seq == 4
    assert _models("list", root=tmp_path / "nothing").returncode == 2
    # without --dir: <serving.models_dir>/<arm>
    out = _models("list", "--json", "--arm", "main", root=None, STREAMREC_SERVING__MODELS_DIR=str(tmp_path))
    assert out.returncode == 0 and len(json.loads(out.stdout)) == 5, out.stderr


def test_trainer_publishes_versions_while_it_trains(cfg, tmp_path):
    from streams.bus import kafka_io
    from config import replace
    from trainer.loop import Trainer
    from trainer.telemetry import Throughput, service_stats
    from tests.test_trainer_service import make_examples

    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for ex in make_examples(3000):
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
    assert prod.flush(30) == 0
    del prod
    root = tmp_path / "models" / "main"
    cfg = replace(cfg, trainer={"device": "cpu", "batch_size": 128, "hash_buckets": 20_000, "publish_every_s": 0.3,
                                "publish_full_every": 4, "max_examples_per_s": 1500,
                                "checkpoint_dir": str(tmp_path / "ckpt")})
    svc = Trainer(cfg, resume=False, publish_dir=str(root))
    counters = svc.run(idle_exit_s=1.0)
    assert counters["examples_trained"] == 3000
    infos = VersionStore(root).list()
    assert len(infos) >= 4 and all(i.ok for i in infos), infos
    assert infos[0].kind == "full" and infos[1].kind == "delta"
    fulls = [i.bytes for i in infos if i.kind == "full"]
    deltas = [i.bytes for i in infos if i.kind == "delta"]
    assert max(deltas) < min(fulls)
    assert infos[-1].steps == svc.learner.steps and infos[-1].examples_trained == 3000  # the shutdown version
    assert all(i.trained_ts <= i.created_ts for i in infos)
    p = VersionStore(root).load()
    assert p.seq == infos[-1].seq and p.user_view is not None and p.arm == "main"
    values = service_stats(svc, Throughput()).values
    assert values["published_seq"] == p.seq and 0 < values["delta_fraction"] <= 1 and values["publish_bytes"] > 0


def test_score_cli_reads_a_publish_root_and_a_version_dir(tmp_path, capsys):
    import argparse

    import msgspec

    from config import load_config, replace
    from trainer import score

    root = tmp_path / "main"
    _store_with_versions(root, 3)
    imps = [e.impression for e in _examples(np.random.default_rng(5), 30)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(schema.encode(i) for i in imps) + b"\n")
    cfg = replace(load_config(env={}), trainer={"device": "cpu"})
    for model, seq in ((root, 3), (root / seq_name(2), 2)):
        args = argparse.Namespace(model=str(model), checkpoint=None, input=str(src), out=str(out))
        assert score.run(args, cfg) == 0
        rows = [msgspec.json.decode(x) for x in out.read_bytes().splitlines()]
        want = _scores(VersionStore(root).load(seq), imps)
        assert [r["p_click"] for r in rows] == pytest.approx(want[0].tolist(), rel=1e-6)
    _flip(root / seq_name(3) / "dense.pt")
    args = argparse.Namespace(model=str(root / seq_name(3)), checkpoint=None, input=str(src), out=str(out))
    assert score.run(args, cfg) == 2 and "sha256" in capsys.readouterr().err
