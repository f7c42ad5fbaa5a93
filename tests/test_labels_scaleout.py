"""The labels dataflow as a 2-process Bytewax cluster, and SIGKILL + restart from the recovery directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import yaml
from test_labels_flow import _produce, _read_all, _workload

from streams import schema
from streams.bus import kafka_io
from config import replace
from deploy.flows import local_cluster
from streams.flows.service import run_labels
from streams.sources import generate

ROOT = Path(__file__).resolve().parents[1]


def _labels(cfg):
    return {e.example_id: (e.click, e.conversion) for _, _, e in _read_all(cfg, cfg.topics.examples, schema.Example)}


def test_two_processes_give_the_same_examples_as_one(tmp_path, broker):
    from conftest import make_config

    cfg = make_config(tmp_path, broker, partitions=4,
                      labels={"click_window_s": 60, "conversion_window_s": 600, "batch_size": 500})
    kafka_io.ensure_topics(broker, cfg.topics.all(), cfg.topics.partitions)
    msgs, expected, _ = _workload(cfg, n_imps=800, seed=3)
    _produce(cfg, msgs)
    two = replace(cfg, topics={name: getattr(cfg.topics, name) + "_2p"
                               for name in ("examples", "dead_letters", "service_stats")})
    kafka_io.ensure_topics(broker, two.topics.all(), two.topics.partitions)
    assert local_cluster(two, "labels", 2, ["--bounded"], timeout=60) == [0, 0]
    run_labels(cfg, bounded=True)
    one_ex, two_ex = _read_all(cfg, cfg.topics.examples, schema.Example), _read_all(two, two.topics.examples,
                                                                                     schema.Example)
    assert len(two_ex) == len(one_ex) == len(expected)  # exactly once in both
    assert _labels(two) == _labels(cfg) == expected
    stats = [s for _, _, s in _read_all(two, two.topics.service_stats, schema.ServiceStats)]
    assert len({s.instance for s in stats}) == 2  # both processes worked and reported


def _start(conf: Path, recovery: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(conf), "labels",
                             "--recovery-dir", str(recovery), "--epoch-s", "0.3", *extra], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_stream_then_restart_loses_no_impression(tmp_path, broker):
    from conftest import make_config

    cfg = make_config(tmp_path, broker, labels={"click_window_s": 30, "conversion_window_s": 120,
                                                "batch_size": 2000})
    kafka_io.ensure_topics(broker, cfg.topics.all(), cfg.topics.partitions)
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    g = generate.GeneratorConfig(n_impressions=20_000, seed=11, max_click_delay_s=20, max_conversion_delay_s=100)
    first = generate.simulate(g).records
    second = generate.simulate(msgspec.structs.replace(g, seed=12, n_impressions=5_000,
                                                       start_ts=first[-1].ts + 1_000)).records
    generate.produce(cfg, first, progress=False, watermark=False)

    proc = _start(conf, tmp_path / "recovery")  # tailing: never ends by itself
    probe = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "probe")
    probe.assign(kafka_io.topic_partitions([cfg.topics.examples], cfg.topics.partitions))
    try:
        deadline, seen = time.monotonic() + 60, 0
        while seen < 1000 and time.monotonic() < deadline:  # mid-stream: examples are coming out
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            seen += sum(m.error() is None for m in probe.consume(num_messages=10_000, timeout=0.1))
        proc.send_signal(signal.SIGKILL)
    finally:
        probe.close()
        proc.kill()
        proc.wait()
    emitted_before = len(_read_all(cfg, cfg.topics.examples, schema.Example))
    assert 0 < emitted_before < 25_000

    generate.produce(cfg, second, progress=False)  # more events, then the end-of-log watermark
    proc = _start(conf, tmp_path / "recovery", "--bounded")
    try:
        assert proc.wait(90) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ids = [e.example_id for _, _, e in _read_all(cfg, cfg.topics.examples, schema.Example)]
    want = {r.event_id for r in first + second if isinstance(r, schema.Impression)}
    assert set(ids) == want  # nothing lost; at-least-once duplicates carry the same deterministic id
    assert len(ids) - len(want) < len(want)  # the restart replayed from a snapshot, not from the beginning

