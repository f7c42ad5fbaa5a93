"""The teacher join (streams/flows/distill.py): on Bytewax's TestingSource (each example out exactly once, its
teacher attached in either order of arrival, late teachers dropped and counted, duplicates of either input,
the bound, bad teacher records as dead letters), then on the real broker with the FM and VM trainers as
processes: SIGKILL of the FM (the VM keeps training, every example trained once by each model) and SIGKILL +
recovery of the flow (nothing lost, nothing trained twice)."""

from __future__ import annotations

import math
from collections import Counter

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


def test_partitions_keep_their_own_state_and_outputs_keep_their_partition():
    flow_out: list = []
    batches = [batch(T0, (EX, example(1, 0)), partition=0), batch(T0, (EX, example(2, 1)), partition=1),
               batch(T0 + 5, (TP, teacher([2])), partition=1), batch(T0 + 5, (TP, teacher([1])), partition=0)]
    run_main(build_flow(DistillConfig(EX, TP, 1000, 10), TestingSource(batches), TestingSink(flow_out),
                        partitions=2, bounded=False, clock=None))
    recs = [(p, schema.decode(raw, schema.Example)) for _, o in flow_out for kind, _, p, raw in o.records]
    assert sorted((p, ex.example_id, ex.teacher is not None) for p, ex in recs) == [(0, "e1", True), (1, "e2", True)]


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
