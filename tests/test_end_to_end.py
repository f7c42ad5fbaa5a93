"""End to end through the real broker, the real Bytewax labels dataflow, the trainer and chDB.

Each component runs as its own ``streamrec`` process, exactly as `streamrec up` and the manifests run them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from conftest import read_topics
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port
from streams.sources.generate import GeneratorConfig, simulate
from streams.sources.replay import produce

pytestmark = pytest.mark.slow

N_IMPRESSIONS = 20_000


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    return path


def _streamrec(config: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float, what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish within {timeout}s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, broker):
    """Generate 20k impressions (+2% malformed events), run labels, trainer and dashboard processes."""
    from conftest import make_config

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = make_config(tmp, broker, partitions=2,
                      # without the near-line user model: how much it adds depends on how much time its thread
                      # gets (train_duty), i.e. on the machine's load, which made this AUC vary (0.61-0.67);
                      # the user model's own learning is tested in tests/test_users*.py and `up` runs it
                      trainer={"checkpoint_every_examples": 5000, "batch_size": 256, "user_model": False},
                      dashboard={"port": free_port()})
    kafka_io.ensure_topics(broker, cfg.topics.all(), cfg.topics.partitions)
    config = _write_config(cfg, tmp / "config.yaml")

    sim = simulate(GeneratorConfig(n_impressions=N_IMPRESSIONS, seed=11, bad_rate=0.02))
    stats = produce(cfg, sim.records, progress=False)
    assert stats.impressions == N_IMPRESSIONS

    dashboard = _streamrec(config, "dashboard")
    try:
        _finish(_streamrec(config, "labels", "--bounded"), 300, "labels dataflow")
        _finish(_streamrec(config, "train", "--fresh", "--idle-exit", "5"), 300, "trainer")
        url = f"http://127.0.0.1:{cfg.dashboard.port}"
        yield {"cfg": cfg, "sim": sim, "url": url, "config": config, "dashboard": dashboard}
    finally:
        dashboard.send_signal(signal.SIGTERM)
        try:
            dashboard.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            dashboard.kill()
            dashboard.communicate()


def test_every_impression_becomes_exactly_one_example_with_true_labels(pipeline):
    cfg, sim = pipeline["cfg"], pipeline["sim"]
    examples = [schema.decode(v.value(), schema.Example) for v in read_topics(cfg, cfg.topics.examples)]
    assert all(isinstance(e, schema.Example) for e in examples)
    ids = Counter(e.example_id for e in examples)
    truth = sim.truth.to_pydict()
    assert set(ids) == set(truth["impression_id"]), "examples and impressions differ"
    assert max(ids.values()) == 1, "an impression became more than one example"
    got = {e.example_id: (e.click, e.conversion) for e in examples}
    want = {i: (c, v) for i, c, v in zip(truth["impression_id"], truth["click"], truth["conversion"])}
    wrong = [i for i in want if got[i] != want[i]]
    assert not wrong, f"{len(wrong)} examples have labels different from the generator's ground truth"
    assert sum(c for c, _ in got.values()) > 100 and sum(v for _, v in got.values()) > 10


def test_injected_bad_events_land_in_dead_letters_with_reasons(pipeline):
    cfg, sim = pipeline["cfg"], pipeline["sim"]
    n_bad = sim.counts()["bad"]
    assert n_bad == round(0.02 * (len(sim.records) - n_bad))
    letters = [schema.decode(v.value(), schema.DeadLetter) for v in read_topics(cfg, cfg.topics.dead_letters)]
    assert all(isinstance(d, schema.DeadLetter) for d in letters)
    from_inputs = [d for d in letters if d.topic in cfg.topics.input_topics()]
    assert len(from_inputs) == n_bad
    assert all(d.reason and d.offset >= 0 for d in from_inputs)
    kinds = {d.reason.split(":")[0] for d in from_inputs}
    assert len(kinds) >= 2, f"expected several kinds of rejection, got {kinds}"


def test_model_learns_per_domain(pipeline):
    cfg = pipeline["cfg"]
    batches = [schema.decode(v.value(), schema.PredictionBatch) for v in read_topics(cfg, cfg.topics.predictions)]
    batches.sort(key=lambda b: b.model_version)  # training order (the topic's partitions interleave it)
    scores: dict[str, tuple] = {}
    for b in batches:
        for i, p, y, d in zip(b.example_ids, b.p_click, b.click, b.domains):
            scores[i] = (p, y, d)  # a re-scored example keeps its latest score
    assert len(scores) == N_IMPRESSIONS
    p, y, d = (np.array(x) for x in zip(*scores.values()))
    # Progressive validation: each batch scored before training on it; the second half shows what was learned.
    # (The generator's oracle reaches ~0.81 here, a model that learned nothing 0.5. Measured through the stack:
    # 0.611-0.6455 over five runs on a loaded 2-core machine: the order in which the trainer takes the two
    # partitions' examples varies with timing, and with it what was learned before each score.)
    late = np.arange(len(p)) >= len(p) // 2
    auc = roc_auc_score(y[late], p[late])
    print(f"click AUC, second half: {auc:.4f}")
    assert auc > 0.58, f"click AUC {auc:.3f}: the model did not learn the generator's signal"
    for dom in set(d):
        m = late & (d == dom)
        assert roc_auc_score(y[m], p[m]) > 0.55, f"domain {dom}: no learning visible"


def test_per_domain_metric_rows_in_clickhouse(pipeline):
    """The dashboard process (sole owner of chDB) ingested the predictions: per-domain rows via its API."""
    url = pipeline["url"]
    deadline = time.monotonic() + 60
    rows = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/panels/quality?minutes=1440", timeout=10) as r:
                rows = json.load(r).get("rows", [])
        except OSError:
            rows = []
        domains = {row.get("domain") for row in rows}
        if len(domains) >= 4 and sum(row.get("n", 0) for row in rows) >= N_IMPRESSIONS:
            break
        time.sleep(1)
    domains = {row.get("domain") for row in rows}
    assert len(domains) >= 4, f"expected per-domain metric rows for 4 domains, got {rows}"
    for row in rows:
        assert 0.5 < row["auc"] <= 1.0 and row["ne"] > 0
