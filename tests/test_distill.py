"""The teacher join (streams/flows/distill.py): on Bytewax's TestingSource (each example out exactly once, its
teacher attached in either order of arrival, late teachers dropped and counted, duplicates of either input,
the bound, bad teacher records as dead letters), then on the real broker with the FM and VM trainers as
processes: SIGKILL of the FM (the VM keeps training, every example trained once by each model) and SIGKILL +
recovery of the flow (nothing lost, nothing trained twice)."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from streams import schema
from streams.flows import distill
from streams.flows.distill import DistillBatch, DistillConfig, build_flow
from streams.names import Stat, Step

EX, TP = "examples", "teacher_predictions"
T0 = 1_700_000_000_000


def example(i: int, partition: int = 0) -> bytes:
    imp = schema.Impression(event_id=f"i{i}", ts=T0 + i, user_id=100 + i, ad_id=i % 7, campaign_id=1,
                            advertiser_id=1, domain=schema.DOMAINS[i % len(schema.DOMAINS)])
    return schema.encode(schema.Example(example_id=f"e{i}", impression=imp, click=i % 2, conversion=0))


def teacher(ids: list[int], version: int = 3, scored_ts: int = T0, p: float = 0.25) -> bytes:
    return schema.encode(schema.TeacherBatch(model_version=version, scored_ts=scored_ts,
                                             example_ids=[f"e{i}" for i in ids], p_click=[p] * len(ids),
                                             p_conversion=[p / 10] * len(ids)))


def batch(now_ms: int, *msgs: tuple[str, bytes], partition: int = 0) -> DistillBatch:
    return DistillBatch(partition, tuple((t, partition, k, raw) for k, (t, raw) in enumerate(msgs)), now_ms)


def run(batches: list[DistillBatch], wait_ms: int = 10_000, max_pending: int = 1000, partitions: int = 1,
        bounded: bool = False):
    """Run the flow on ``batches``; returns (examples out, dead letters, final counts of every partition)."""
    out: list = []
    flow = build_flow(DistillConfig(EX, TP, wait_ms, max_pending), TestingSource(batches), TestingSink(out),
                      partitions=partitions, bounded=bounded, clock=None)
    run_main(flow)
    examples, dead, counts = [], [], {}
    for key, o in out:
        for kind, k, p, raw in o.records:
            if kind == distill.EXAMPLE:
                ex = schema.decode(raw, schema.Example)
                assert not isinstance(ex, schema.Invalid), ex
                assert k == schema.user_key(ex.impression)
                examples.append(ex)
            else:
                dead.append(schema.decode(raw, schema.DeadLetter))
        counts[key] = o.counts
    total = Counter()
    for c in counts.values():
        total.update(c)
    return examples, dead, total


def test_teacher_attached_in_either_order_and_each_example_leaves_once():
    exs, dead, c = run([
        batch(T0, (EX, example(1)), (EX, example(2))),  # examples first
        batch(T0 + 100, (TP, teacher([1, 2, 3], version=7, scored_ts=T0 + 50))),  # 3: teacher first
        batch(T0 + 200, (EX, example(3)), (EX, example(4))),
        batch(T0 + 20_000),  # 4 waited past the 10 s: leaves without teacher
    ])
    by_id = {e.example_id: e for e in exs}
    assert len(exs) == len(by_id) == 4 and not dead
    for i in (1, 2, 3):
        t = by_id[f"e{i}"].teacher
        assert t == schema.Teacher(p_click=0.25, p_conversion=0.025, model_version=7, scored_ts=T0 + 50)
    assert by_id["e4"].teacher is None
    # the example itself is unchanged apart from the teacher
    assert schema.encode(schema.Example(**{**{f: getattr(by_id["e1"], f) for f in by_id["e1"].__struct_fields__},
                                           "teacher": None})) == example(1)
    assert c[Stat.EXAMPLES_IN] == c[Stat.EXAMPLES_OUT] == 4
    assert (c[Stat.EXAMPLES_WITH_TEACHER], c[Stat.EXAMPLES_WITHOUT_TEACHER], c[Stat.TEACHERS_IN]) == (3, 1, 3)


def test_late_teacher_is_dropped_and_counted_never_applied():
    exs, dead, c = run([
        batch(T0, (EX, example(1))),
        batch(T0 + 10_001),  # past the wait: e1 leaves without teacher
        batch(T0 + 10_002, (TP, teacher([1]))),  # too late
        batch(T0 + 10_003, (TP, teacher([1]))),  # and its replay
    ])
    assert [(e.example_id, e.teacher) for e in exs] == [("e1", None)]
    assert c[Stat.TEACHERS_LATE] == 2 and c[Stat.EXAMPLES_WITHOUT_TEACHER] == 1 and not dead


def test_duplicates_of_either_input_do_not_duplicate_output():
    exs, dead, c = run([
        batch(T0, (EX, example(1)), (EX, example(1)), (TP, teacher([2])), (TP, teacher([2], p=0.5))),
        batch(T0 + 10, (TP, teacher([1])), (EX, example(2)), (TP, teacher([1], p=0.9)), (EX, example(1)),
              (EX, example(2))),
        batch(T0 + 30_000, (EX, example(1)), (TP, teacher([2]))),  # replays long after
    ])
    assert sorted((e.example_id, e.teacher.p_click) for e in exs) == [("e1", 0.25), ("e2", 0.25)]  # first wins
    assert c[Stat.DUPLICATES] == 4 and c[Stat.TEACHERS_DUPLICATE] == 1 and c[Stat.TEACHERS_LATE] == 2
    assert c[Stat.EXAMPLES_OUT] == 2 and not dead


def test_max_pending_bounds_the_state_oldest_leave_without_teacher():
    exs, _, c = run([batch(T0, *[(EX, example(i)) for i in range(5)]),
                     batch(T0 + 1, (TP, teacher([0, 1, 2, 3, 4]))),
                     batch(T0 + 2, *[(TP, teacher([10 + i])) for i in range(5)])], max_pending=3)
    assert [(e.example_id, e.teacher is not None) for e in exs] == [
        ("e0", False), ("e1", False), ("e2", True), ("e3", True), ("e4", True)]
    assert c[Stat.PENDING_EVICTED] == 2 and c[Stat.TEACHERS_LATE] == 2
    assert c[Stat.TEACHERS_EXPIRED] == 2  # five orphan teachers, three kept


def test_bounded_end_of_input_lets_every_waiting_example_out():
    exs, _, c = run([batch(T0, (EX, example(1), ), (EX, example(2)), (TP, teacher([9])))], bounded=True)
    assert sorted(e.example_id for e in exs) == ["e1", "e2"] and all(e.teacher is None for e in exs)
    assert c[Stat.TEACHERS_EXPIRED] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_partitions_keep_their_own_state_and_outputs_keep_their_partition(workers):
    from bytewax.testing import cluster_main

    flow_out: list = []
    batches = [batch(T0, (EX, example(1, 0)), partition=0), batch(T0, (EX, example(2, 1)), partition=1),
               batch(T0 + 5, (TP, teacher([2])), partition=1), batch(T0 + 5, (TP, teacher([1])), partition=0)]
    flow = build_flow(DistillConfig(EX, TP, 1000, 10), TestingSource(batches), TestingSink(flow_out),
                      partitions=2, bounded=False, clock=None)
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    recs = [(p, schema.decode(raw, schema.Example)) for _, o in flow_out for kind, _, p, raw in o.records]
    assert sorted((p, ex.example_id, ex.teacher is not None) for p, ex in recs) == [(0, "e1", True), (1, "e2", True)]


def test_state_survives_a_snapshot_round_trip():
    """What Bytewax recovery stores (pickled) restores waiting examples, orphan teachers and the ids that left."""
    import pickle

    cfg = DistillConfig(EX, TP, 1000, 10)
    st = distill.DistillState(cfg)
    distill.step(st, ((EX, 0, 0, example(1)), (TP, 0, 0, teacher([2], version=9)), (EX, 0, 1, example(3)),
                      (TP, 0, 1, teacher([3]))), T0)
    back = distill.DistillState.restore(cfg, pickle.loads(pickle.dumps(st.snapshot())))
    out = distill.step(back, ((EX, 0, 2, example(2)), (TP, 0, 2, teacher([1, 3]))), T0 + 10)
    got = [schema.decode(raw, schema.Example) for _, _, _, raw in out]
    assert [(e.example_id, e.teacher.model_version) for e in got] == [("e2", 9), ("e1", 3)]
    assert back.counts[Stat.TEACHERS_LATE] == 1 and back.counts[Stat.EXAMPLES_OUT] == 3 and back.clock == T0 + 10


def test_bad_teacher_records_are_dead_letters_with_reasons():
    nan = schema.encode(schema.TeacherBatch(model_version=1, scored_ts=T0, example_ids=["e1"], p_click=[math.nan],
                                            p_conversion=[0.1]))
    bad = {
        b"not json": "unparseable",
        schema.encode(schema.TeacherBatch(model_version=1, scored_ts=T0, example_ids=["e1", "e2"], p_click=[0.1],
                                          p_conversion=[0.1, 0.2])): "teacher: columns of different lengths",
        nan: "schema",  # NaN has no JSON spelling: msgspec writes null, which is no float
        b'{"type":"teacher","model_version":1,"scored_ts":1,"example_ids":["e1"],"p_click":[1.5],'
        b'"p_conversion":[0.1]}': "teacher: p_click[0] = 1.5 is not a probability",
        b'{"type":"teacher","model_version":1,"scored_ts":1,"example_ids":["e1"],"p_click":[0.5],'
        b'"p_conversion":[-0.1]}': "teacher: p_conversion[0] = -0.1 is not a probability",
        teacher([1], version=-4): "teacher: negative model_version",
        teacher([1], scored_ts=T0 + 3_600_000): "teacher: scored_ts",
        schema.encode(schema.TeacherBatch(model_version=1, scored_ts=T0, example_ids=["e1<script>"], p_click=[0.1],
                                          p_conversion=[0.1])): "teacher: example_ids",
        schema.encode(schema.Example(example_id="e9", impression=schema.Impression(
            event_id="i9", ts=T0, user_id=1, ad_id=1, campaign_id=1, advertiser_id=1, domain="feed"), click=0,
            conversion=0)): "schema",  # an example on the teacher topic
    }
    exs, dead, c = run([batch(T0, (EX, example(1)), *[(TP, raw) for raw in bad], (EX, b"{broken")),
                        batch(T0 + 20_000)])
    assert [(e.example_id, e.teacher) for e in exs] == [("e1", None)]  # no bad row reached it
    assert len(dead) == len(bad) + 1 and c[Stat.DEAD_LETTERS] == len(bad) + 1
    assert all(d.step == Step.DISTILL_JOIN for d in dead)
    by_raw = {d.raw: d for d in dead}
    for raw, reason in bad.items():
        assert by_raw[raw].reason.startswith(reason), (raw, by_raw[raw].reason)
        assert by_raw[raw].topic == TP
    assert by_raw[b"{broken"].reason.startswith("example: unparseable") and by_raw[b"{broken"].topic == EX
    assert c["dead.teacher"] == 6 and c["dead.example"] == 1


# ----------------------------------------------------------------------------------------- on the broker

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import msgspec  # noqa: E402
import yaml  # noqa: E402

from streams.bus import kafka_io  # noqa: E402
from config import replace  # noqa: E402
from tests.conftest import read_topics  # noqa: E402
from tests.test_trainer_service import make_examples  # noqa: E402
from trainer import checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINER = {"batch_size": 256, "hash_buckets": 20_000, "device": "cpu", "user_model": False,
           "checkpoint_every_examples": 1024, "checkpoint_every_s": 60}


def _config(cfg, tmp_path: Path, name: str, **trainer) -> Path:
    c = replace(cfg, trainer={**TRAINER, "checkpoint_dir": str(tmp_path / f"ckpt-{name}"), **trainer})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(msgspec.to_builtins(c)))
    return path


def _spawn(config: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "MALLOC_"))}
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(config), *args], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait(cond, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.05)


def _produce_examples(cfg, exs, pace_s: float = 0.0) -> None:
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for i, e in enumerate(exs):
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(e), key=schema.user_key(e.impression))
        if pace_s and i % 500 == 499:
            prod.flush(30)
            time.sleep(pace_s)
    assert prod.flush(30) == 0


def _trained(ckpt: Path) -> Counter:
    _, st = checkpoint.load_latest(ckpt)
    return Counter(st["trained_ids"])


def _distill_stats(cfg) -> dict[str, float]:
    stats = [schema.decode(m.value(), schema.ServiceStats) for m in read_topics(cfg, cfg.topics.service_stats)]
    ours = sorted((s for s in stats if s.component == "distill"), key=lambda s: s.ts)
    assert ours, "the flow reports"
    return dict(ours[-1].values)


class _Tail:
    """Counts the messages of a topic as they arrive (a consumer of its own, polled on ``count()``)."""

    def __init__(self, cfg, topic: str):
        self.c = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "test-tail", **{"fetch.wait.max.ms": 20})
        self.c.assign(kafka_io.topic_partitions([topic], cfg.topics.partitions))
        self.n = 0

    def count(self) -> int:
        self.n += sum(m.error() is None for m in self.c.consume(num_messages=10_000, timeout=0.1))
        return self.n

    def close(self) -> None:
        self.c.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # ours, by pid
        if p.poll() is None:
            p.kill()
            p.wait()


def test_fm_and_vm_killed_mid_stream_vm_keeps_training_every_example_once_per_model(cfg, tmp_path):
    n = 6000
    cfg = replace(cfg, distill={"teacher_wait_s": 5.0})
    exs = make_examples(n, seed=3)
    fm = _config(cfg, tmp_path, "fm", role="fm", arm="fm")
    vm = _config(cfg, tmp_path, "vm", role="vm", arm="vm")
    flow_cfg = _config(cfg, tmp_path, "flow")
    log = tmp_path / "procs.log"
    procs = [_spawn(flow_cfg, log, "distill", "--recovery-dir", str(tmp_path / "rec"), "--epoch-s", "1"),
             _spawn(fm, log, "train", "--record-trained-ids"),
             _spawn(vm, log, "train", "--record-trained-ids", "--max-examples", str(n))]
    producer = threading.Thread(target=_produce_examples, args=(cfg, exs, 0.25))  # a live stream, ~2k/s
    try:
        _wait(lambda: log.read_text().count("training on") == 2, 60, "both trainers up", log)
        producer.start()
        _wait(lambda: checkpoint.latest(tmp_path / "ckpt-fm") is not None, 60, "the FM's first checkpoint", log)
        procs[1].send_signal(signal.SIGKILL)
        assert procs[1].wait(10) == -signal.SIGKILL
        killed_at = sum(_trained(tmp_path / "ckpt-fm").values())
        assert 0 < killed_at < n, "the kill must land mid-stream"
        # the VM is killed too, and resumes from its checkpoint while the FM is down
        _wait(lambda: checkpoint.latest(tmp_path / "ckpt-vm") is not None, 60, "the VM's first checkpoint", log)
        procs[2].send_signal(signal.SIGKILL)
        assert procs[2].wait(10) == -signal.SIGKILL
        vm_at = sum(_trained(tmp_path / "ckpt-vm").values())
        assert 0 < vm_at < n, "the VM's kill must land mid-stream"
        procs.append(_spawn(vm, log, "train", "--resume", "--record-trained-ids", "--max-examples", str(n - vm_at)))
        # with the FM down the VM trains everything: examples go on without teacher after the wait
        assert procs[-1].wait(60) == 0, log.read_text()[-3000:]
        producer.join(10)
        vm_ids = _trained(tmp_path / "ckpt-vm")
        assert len(vm_ids) == n and set(vm_ids.values()) == {1}
        assert set(vm_ids) == {e.example_id for e in exs}
        # the FM comes back, resumes from its checkpoint and trains the rest once; its re-scored teachers are late
        procs.append(_spawn(fm, log, "train", "--resume", "--record-trained-ids", "--idle-exit", "2"))
        assert procs[-1].wait(90) == 0, log.read_text()[-3000:]
        fm_ids = _trained(tmp_path / "ckpt-fm")
        assert len(fm_ids) == n and set(fm_ids.values()) == {1}
        time.sleep(1.5)  # the flow's next report
    finally:
        _stop(procs)
    distilled = [schema.decode(m.value(), schema.Example) for m in read_topics(cfg, cfg.topics.examples_distilled)]
    ids = Counter(e.example_id for e in distilled)
    assert set(ids) == {e.example_id for e in exs} and set(ids.values()) == {1}  # no crash of the flow: once each
    with_t = [e for e in distilled if e.teacher is not None]
    assert killed_at // 4 < len(with_t) < n, "teachers before the kill, none while the FM was down"
    assert all(0 <= e.teacher.p_click <= 1 and e.teacher.model_version >= 0 for e in with_t)
    s = _distill_stats(cfg)
    assert s[Stat.EXAMPLES_OUT] == n and s[Stat.EXAMPLES_WITH_TEACHER] == len(with_t)
    assert s[Stat.EXAMPLES_WITHOUT_TEACHER] == n - len(with_t)
    assert s[Stat.TEACHERS_LATE] >= n - killed_at  # every teacher the resumed FM published came too late
    assert s[Stat.TEACHER_COVERAGE] == len(with_t) / n
    print(f"coverage {s[Stat.TEACHER_COVERAGE]:.3f} teachers_late {s[Stat.TEACHERS_LATE]:.0f} "
          f"fm killed at {killed_at}/{n}")


def test_distill_flow_killed_and_recovered_loses_nothing_vm_trains_each_once(cfg, tmp_path):
    n = 12_000
    exs = make_examples(n, seed=5)
    part = {e.example_id: kafka_io.partition_for(schema.user_key(e.impression), cfg.topics.partitions) for e in exs}

    def produce():  # examples and, right behind them, their teachers (to the example's partition number)
        prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
        for k in range(0, n, 400):
            chunk = exs[k:k + 400]
            for e in chunk:
                kafka_io.produce(prod, cfg.topics.examples, schema.encode(e), key=schema.user_key(e.impression))
            for p in range(cfg.topics.partitions):
                ids = [e.example_id for e in chunk if part[e.example_id] == p]
                tb = schema.TeacherBatch(model_version=k, scored_ts=int(time.time() * 1000), example_ids=ids,
                                         p_click=[0.3] * len(ids), p_conversion=[0.03] * len(ids))
                kafka_io.produce(prod, cfg.topics.teacher_predictions, schema.encode(tb), partition=p)
            prod.flush(30)
            time.sleep(0.25)
        assert prod.flush(30) == 0

    flow_cfg = _config(cfg, tmp_path, "flow")
    vm = _config(cfg, tmp_path, "vm", role="vm", arm="vm")
    log = tmp_path / "procs.log"
    rec = str(tmp_path / "rec")
    flow = ["distill", "--recovery-dir", rec, "--epoch-s", "0.5"]
    producer = threading.Thread(target=produce)
    procs = [_spawn(flow_cfg, log, *flow), _spawn(vm, log, "train", "--record-trained-ids", "--max-examples", str(n))]
    try:
        producer.start()

        tail = _Tail(cfg, cfg.topics.examples_distilled)
        distilled = tail.count
        _wait(lambda: distilled() > n // 2, 60, "half of the examples distilled", log)
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(10) == -signal.SIGKILL
        at_kill = distilled()
        tail.close()
        assert at_kill < n, "the kill must land mid-stream"
        procs.append(_spawn(flow_cfg, log, *flow))  # recovers from its snapshot
        producer.join(60)
        assert procs[1].wait(90) == 0, log.read_text()[-3000:]
        vm_ids = _trained(tmp_path / "ckpt-vm")
        _, vm_state = checkpoint.load_latest(tmp_path / "ckpt-vm")
    finally:
        _stop(procs)
    assert len(vm_ids) == n and set(vm_ids.values()) == {1}  # nothing lost, nothing trained twice
    assert set(vm_ids) == {e.example_id for e in exs}
    distilled_exs = [schema.decode(m.value(), schema.Example) for m in read_topics(cfg, cfg.topics.examples_distilled)]
    out = Counter(e.example_id for e in distilled_exs)
    # the state survived the crash: every example met its teacher (30 s wait), before and after the kill
    assert all(e.teacher is not None and e.teacher.p_click == 0.3 for e in distilled_exs)
    assert set(out) == set(vm_ids)
    replayed = sum(out.values()) - n  # re-emitted after the recovery: the VM's dedup dropped them
    assert vm_state["counters"]["duplicates"] == replayed
    assert replayed < at_kill, "the flow resumed from a snapshot, not from the beginning"
    print(f"flow killed at {at_kill}/{n} distilled; {replayed} re-emitted after recovery, dropped by the VM")


@pytest.mark.slow
def test_up_with_fm_trains_the_fm_and_a_vm_per_domain_group(tmp_path):
    """`streamrec up --with-fm`: FM, teacher join and two vertical models as supervised children; each model
    reports its examples and the join its coverage."""
    from streams.bus.processes import free_port

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}, "STREAMREC_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "up", "--with-fm", "--events", "3000", "--ephemeral",
                           "--exit-when-done", "--port", str(free_port()), "--vm-domains", "feed,stories",
                           "--vm-domains", "video,search,display"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    m = {arm: int(n.replace(",", "")) for arm, n in re.findall(r"^  (\S+): ([\d,]+) examples trained", out, re.M)}
    assert set(m) == {"fm", "vm-feed-stories", "vm-video-search-display"}, out[-3000:]
    assert m["fm"] == 3000 and m["vm-feed-stories"] + m["vm-video-search-display"] == 3000
    cov = re.search(r"teacher join: ([\d,]+) examples out, ([\d,]+) with a teacher", out)
    assert cov and int(cov.group(1).replace(",", "")) == 3000 and int(cov.group(2).replace(",", "")) > 0
    print(out[out.index("models:"):])
    assert not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout, "a process outlived up"
