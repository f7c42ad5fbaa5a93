"""The stats dataflow as a Bytewax cluster, the way the manifests run it: several processes with several worker
threads each, every process with a recovery directory of its own (a StatefulSet pod's volume)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import yaml
from conftest import read_topics

from config import replace
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port
from streams.flows.service import recovery_config, run_labels, run_stats
from streams.flows.stats import stats_topic
from streams.sources import generate

ROOT = Path(__file__).resolve().parents[1]


def _partitions(d: Path) -> list[tuple[int, int]]:
    """(index, count) of every recovery partition in ``d``."""
    out = []
    for f in sorted(d.glob("part-*.sqlite3")):
        with sqlite3.connect(f) as c:
            out += [(int(i), int(n)) for _, i, n in c.execute("SELECT * FROM parts")]
    return out


def test_each_process_holds_its_own_recovery_partition(tmp_path):
    for i in range(3):  # a directory per process (pod volumes)
        recovery_config(str(tmp_path / f"pod{i}"), i, 3)
        assert _partitions(tmp_path / f"pod{i}") == [(i, 3)]
    for i in range(2):  # one directory shared by the processes of one host
        recovery_config(str(tmp_path / "shared"), i, 2)
    assert _partitions(tmp_path / "shared") == [(0, 2), (1, 2)]
    before = (tmp_path / "shared" / "part-1.sqlite3").stat().st_mtime_ns
    recovery_config(str(tmp_path / "shared"), 1, 2)  # a restart keeps what it has
    assert (tmp_path / "shared" / "part-1.sqlite3").stat().st_mtime_ns == before
    assert [p.name for p in (tmp_path / "shared").iterdir() if not p.name.startswith("part-")] == []
    recovery_config(str(tmp_path / "single"))
    assert _partitions(tmp_path / "single") == [(0, 1)]  # one process: as before


def _cluster(conf: Path, tmp_path: Path, processes: int, workers: int) -> list[tuple[int, str]]:
    addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(conf), "stats", "--bounded",
                               "--workers", str(workers), "--recovery-dir", str(tmp_path / f"recovery-{i}"),
                               "--processes", str(processes), "--process-id", str(i), "--addresses", addresses],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(processes)]
    try:
        return [(p.wait(90), p.stderr.read().decode()[-2000:]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_stats_cluster_of_two_processes_with_two_workers_each_equals_one_worker(tmp_path, broker):
    from conftest import make_config

    cfg = make_config(tmp_path, broker, partitions=4)
    kafka_io.ensure_topics(broker, cfg.topics.all(), cfg.topics.partitions)
    generate.produce(cfg, generate.simulate(generate.GeneratorConfig(n_impressions=2000, seed=5,
                                                                     impressions_per_s=20)).records,
                     progress=False)
    run_labels(cfg, bounded=True)
    run_stats(cfg, bounded=True)  # the reference: one process, one worker
    two = replace(cfg, topics={"feature_stats": cfg.topics.feature_stats + "_c",
                               "service_stats": cfg.topics.service_stats + "_c"})
    kafka_io.ensure_topics(broker, [two.topics.feature_stats, two.topics.service_stats], two.topics.partitions)
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump(msgspec.to_builtins(two)))
    for code, err in _cluster(conf, tmp_path, processes=2, workers=2):
        assert code == 0, err

    def records(c):
        return {r.stats_id: (r.count, r.counts, r.mean) for r in
                (schema.decode(m.value(), schema.FeatureStats) for m in read_topics(c, stats_topic(c)))}

    one, clustered = records(cfg), records(two)
    assert clustered == one and sum(n for i, (n, _, _) in one.items() if ":count:" in i) == 2000
    reports = [schema.decode(m.value(), schema.ServiceStats) for m in read_topics(two, two.topics.service_stats)]
    assert len({r.instance for r in reports if r.component == "stats"}) == 2  # both processes worked
    assert [_partitions(tmp_path / f"recovery-{i}") for i in range(2)] == [[(0, 2)], [(1, 2)]]
    # a restart resumes from the recovery partitions on the processes' own volumes: nothing is counted twice
    n_before = len(read_topics(two, stats_topic(two)))
    for code, err in _cluster(conf, tmp_path, processes=2, workers=2):
        assert code == 0, err
    assert len(read_topics(two, stats_topic(two))) == n_before
