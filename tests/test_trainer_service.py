"""`streamrec train` against the real broker: SIGKILL mid-stream, resume, every example trained exactly once."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from embedding_store.ann import load_index
from embedding_store.users import index_path as users_index_path
from streams import schema
from streams.bus import kafka_io
from config import load_config, replace
from trainer import checkpoint
from trainer.features import featurize
from trainer.loop import Dedup
from trainer.service import run as train_cli

ROOT = Path(__file__).resolve().parents[1]
N = 20_000


def make_examples(n: int, seed: int = 0) -> list[schema.Example]:
    """Click depends on the ad (30% of ads are good) and dense[0]; conversion on the advertiser."""
    rng = np.random.default_rng(seed)
    ads = rng.integers(0, 300, n)
    d0 = rng.normal(size=n)
    click = rng.random(n) < 1 / (1 + np.exp(-(-1.2 + 2.2 * (ads % 10 < 3) + 0.8 * d0)))
    conv = click & (rng.random(n) < np.where(ads % 7 < 2, 0.6, 0.1))
    users = rng.integers(0, 5000, n)
    now = int(time.time() * 1000)
    return [schema.Example(
        example_id=f"ex{i}", click=int(click[i]), conversion=int(conv[i]), emitted_ts=now,
        impression=schema.Impression(event_id=f"imp{i}", ts=now - 60_000 + i, user_id=int(users[i]),
                                     ad_id=int(ads[i]), campaign_id=int(ads[i]) // 3,
                                     advertiser_id=int(ads[i]) // 15, domain=schema.DOMAINS[i % 5],
                                     device=schema.DEVICES[i % 4], dense=[float(d0[i])],
                                     history=[int(x) for x in ads[max(0, i - 3):i]]))
        for i in range(n)]


def _consume_all(cfg, topic: str, idle_s: float = 1.5) -> list[bytes]:
    c = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "test-reader")
    c.assign(kafka_io.topic_partitions([topic], cfg.topics.partitions))
    out, last = [], time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            msgs = c.consume(num_messages=5000, timeout=0.3)
            if msgs:
                last = time.monotonic()
                out.extend(m.value() for m in msgs if m.error() is None)
    finally:
        c.close()
    return out


def _train(config_path: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "MALLOC_"))}
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(config_path), "train", *args],
                            cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_kill_and_resume_trains_each_example_exactly_once(cfg, tmp_path, capsys):
    ckpt_dir = tmp_path / "ckpt"
    cfg = replace(cfg, trainer={"batch_size": 256, "checkpoint_every_examples": 2048, "checkpoint_every_s": 60,
                                "hash_buckets": 20_000, "device": "cpu", "checkpoint_dir": str(ckpt_dir)})
    config_path = tmp_path / "streamrec.yaml"
    config_path.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    exs = make_examples(N)
    dups = exs[::1000]  # replayed: appended again later in the stream, before and after the kill point
    bad = [b"not json", b'{"type": "example", "example_id": "x"}',
           schema.encode(msgspec.structs.replace(exs[0], example_id="bad-domain", impression=msgspec.structs.replace(
               exs[0].impression, domain="nowhere")))]
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    stream: list[tuple[bytes, bytes]] = [(schema.user_key(e.impression), schema.encode(e)) for e in exs]
    for k, d in enumerate(dups):
        stream.insert(min(len(stream), (k * 997) % N + 500), (schema.user_key(d.impression), schema.encode(d)))
    for k, raw in enumerate(bad):
        stream.insert(3000 + 5000 * k, (b"0", raw))
    for key, raw in stream:
        kafka_io.produce(prod, cfg.topics.examples, raw, key=key)
    assert prod.flush(30) == 0
    del prod  # an open client makes the broker wait at shutdown

    log = tmp_path / "train.log"
    procs = [_train(config_path, log, "--record-trained-ids")]
    try:
        assert _wait(lambda: checkpoint.latest(ckpt_dir) is not None, 60), log.read_text()[-3000:]
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(10) == -signal.SIGKILL
        _, killed = checkpoint.load_latest(ckpt_dir)
        assert 0 < killed["counters"]["examples_trained"] < N, "the kill must land mid-stream"

        # without --resume an existing checkpoint is an error that says what to do
        procs.append(_train(config_path, log))
        assert procs[-1].wait(60) == 2
        assert "--resume" in log.read_text() and "--fresh" in log.read_text()

        procs.append(_train(config_path, log, "--resume", "--idle-exit", "2", "--record-trained-ids"))
        assert procs[-1].wait(90) == 0, log.read_text()[-3000:]
        _, final = checkpoint.load_latest(ckpt_dir)
        c = final["counters"]
        in_topic = Counter(_consume_all(cfg, cfg.topics.examples, 0.5))
        assert sum(in_topic.values()) == len(stream), "the producer wrote each message once"
        assert c["examples_trained"] == N
        assert c["duplicates"] == len(dups) and c["dead_letters"] == len(bad)
        counts = Counter(final["trained_ids"])
        assert len(counts) == N and set(counts.values()) == {1}  # every example id exactly once
        assert set(counts) == {e.example_id for e in exs} == set(final["dedup"])
        assert sum(o for _, _, o in final["offsets"]) == len(stream)

        # SIGTERM: finish the batch, checkpoint, exit 0
        procs.append(_train(config_path, log, "--resume"))
        assert _wait(lambda: log.read_text().count("training on") == 3, 60), log.read_text()[-3000:]
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(30) == 0
        _, after = checkpoint.load_latest(ckpt_dir)
        assert after["counters"]["examples_trained"] == N
        assert after["counters"]["checkpoints"] == c["checkpoints"] + 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # progressive validation: scores published before training; re-scored batches after the kill repeat ids
    scores: dict[str, tuple[float, int]] = {}
    for raw in _consume_all(cfg, cfg.topics.predictions):
        pb = schema.decode(raw, schema.PredictionBatch)
        scores.update(zip(pb.example_ids, zip(pb.p_click, pb.click)))
    assert len(scores) == N
    p, y = np.array([s for s, _ in scores.values()]), np.array([lab for _, lab in scores.values()])
    assert roc_auc_score(y, p) > 0.65
    dead = [schema.decode(r, schema.DeadLetter) for r in _consume_all(cfg, cfg.topics.dead_letters)]
    assert len(dead) >= len(bad) and {d.raw for d in dead} == set(bad)
    _check_score_cli(ckpt_dir, exs[:50], tmp_path)
    # the user model trained beside the ranker; its index (for `streamrec users`) holds every user
    users = final["users"]
    assert users["trained_batches"] > 0 and users["counters"]["examples"] > 0
    assert users["counters"]["examples"] + users["counters"].get("examples_absorbed", 0) == N
    index = load_index(users_index_path(cfg))
    assert set(index.ids().tolist()) == {e.impression.user_id for e in exs}
    assert f"{tmp_path / 'imps.jsonl'}:4: skipped" in capsys.readouterr().err  # bad line, by number
    stats = [schema.decode(r, schema.ServiceStats) for r in _consume_all(cfg, cfg.topics.service_stats)]
    assert max(s.values["examples_trained"] for s in stats if s.component == "trainer") == N
    assert all({"examples_per_s", "freshness_ms", "model_version"} <= s.values.keys()
               for s in stats if s.values["examples_trained"] > 0)
    live = [s.values for s in stats if "emitted_to_trained_p99_ms" in s.values]
    assert live and all(v["lag_ms"] >= 0 and v["emitted_to_trained_p50_ms"] <= v["emitted_to_trained_p99_ms"]
                        for v in live)


def _check_score_cli(ckpt_dir: Path, exs: list[schema.Example], tmp_path: Path) -> None:
    from trainer import score

    src, out = tmp_path / "imps.jsonl", tmp_path / "scores.jsonl"
    lines = [schema.encode(e.impression) for e in exs]
    lines.insert(3, b"{broken")
    src.write_bytes(b"\n".join(lines) + b"\n")
    args = argparse.Namespace(checkpoint=str(ckpt_dir), input=str(src), out=str(out))
    assert score.run(args, replace(load_config(env={}), trainer={"device": "cpu"})) == 0
    rows = [msgspec.json.decode(x) for x in out.read_bytes().splitlines()]
    assert [r["event_id"] for r in rows] == [e.impression.event_id for e in exs]
    learner = score.load_learner(ckpt_dir, device="cpu")
    assert learner.user_view is not None and len(learner.user_view) > 0  # the checkpoint's user vectors
    want = learner.score(featurize(exs, learner.tcfg, learner.user_view))  # the same model, training path
    np.testing.assert_allclose([r["p_click"] for r in rows], want[0], rtol=1e-6)
    np.testing.assert_allclose([r["p_conversion"] for r in rows], want[1], rtol=1e-6)


def test_train_without_broker_says_how_to_configure(tmp_path, capsys):
    cfg = load_config(env={}, trainer={"checkpoint_dir": str(tmp_path)})
    args = argparse.Namespace(resume=False, fresh=False, max_examples=None, idle_exit=None, checkpoint_dir=None,
                              record_trained_ids=False)
    assert train_cli(args, cfg) == 2
    assert "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" in capsys.readouterr().err


def test_train_rejects_a_bad_fiited_setting_by_name(cfg, tmp_path, capsys):
    from config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown field `budgett` - at `\$\.trainer\.fiited`"):
        replace(cfg, trainer={"fiited": {"budgett": 0.3}})  # a misspelt knob: refused with the configuration
    cfg = replace(cfg, trainer={"checkpoint_dir": str(tmp_path), "device": "cpu", "backend": "fiited",
                                "embedding_dim": 64, "fiited": {"budget": 0.0}})
    args = argparse.Namespace(resume=False, fresh=False, max_examples=None, idle_exit=None, checkpoint_dir=None,
                              record_trained_ids=False)
    assert train_cli(args, cfg) == 2  # a value out of range: refused when the store is built, by name
    assert "trainer.fiited.budget: expected in (0, 1.5]" in capsys.readouterr().err


def test_dedup_window_is_bounded():
    d = Dedup(capacity=3)
    assert [d.add(x) for x in "abca"] == [True, True, True, False]
    assert d.add("d") and "a" not in d and len(d) == 3 and d.ids() == ["b", "c", "d"]


def test_in_process_service_gives_torch_threads_back(cfg, tmp_path):
    # with the user model on, run() halves torch's intra-op threads (two OpenMP teams share the cores); an
    # in-process caller (benchmarks, notebooks) must get its own setting back afterwards
    import torch

    from trainer.loop import Trainer

    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for ex in make_examples(600):
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
    prod.flush(30)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        svc = Trainer(replace(cfg, trainer={"device": "cpu", "batch_size": 128}), resume=False)
        seen = []
        step = svc.learner.train_step
        svc.learner.train_step = lambda *a, **k: (seen.append(torch.get_num_threads()), step(*a, **k))[1]
        counters = svc.run(idle_exit_s=1.0)
        assert counters["examples_trained"] == 600
        assert set(seen) == {1}  # halved while the user model's thread runs beside the ranker
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
