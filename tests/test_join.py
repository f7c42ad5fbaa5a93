"""The attribution join on lists: windows, out-of-order feedback, duplicates, dead letters, time rules."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from streams import schema
from streams.flows.join import EXAMPLE, MALFORMED, JoinConfig, JoinState, SourceBatch, flush, step

T0 = 1_700_000_000_000
IMP, CLK, CNV = "imp", "clk", "cnv"
CFG = JoinConfig((IMP, CLK, CNV), click_window_ms=60_000, conversion_window_ms=600_000, future_tolerance_ms=None)


def imp(i: str, ts: int, user: int = 1) -> schema.Impression:
    return schema.Impression(event_id=i, ts=ts, user_id=user, ad_id=1, campaign_id=1, advertiser_id=1, domain="feed")


def clk(c: str, i: str, ts: int) -> schema.Click:
    return schema.Click(event_id=c, impression_id=i, ts=ts, user_id=1)


def cnv(c: str, i: str, ts: int) -> schema.Conversion:
    return schema.Conversion(event_id=c, impression_id=i, ts=ts, user_id=1)


_TOPIC = {schema.Impression: IMP, schema.Click: CLK, schema.Conversion: CNV}


def msgs(*events, offset: int = 0):
    return tuple((_TOPIC[type(e)], 0, offset + k, schema.encode(e)) for k, e in enumerate(events))


def watermarks(ts: int):
    wm = schema.encode(schema.Watermark(ts=ts))
    return tuple((t, 0, 10_000, wm) for t in (IMP, CLK, CNV))


def decoded(out):
    """Encoded join outputs -> Example / DeadLetter objects (checks keys on the way)."""
    objs = []
    for kind, key, value in out:
        obj = schema.decode(value, schema.Example if kind == EXAMPLE else schema.DeadLetter)
        assert not isinstance(obj, schema.Invalid), (obj, value[:200])
        assert key == (str(obj.impression.user_id).encode() if kind == EXAMPLE else None)
        objs.append(obj)
    return objs


def run(batches, caught_up=frozenset(), cfg=CFG, now_ms=123):
    state, out = JoinState(cfg), []
    for b in batches:
        state, o = step(state, SourceBatch(0, b, caught_up), now_ms=now_ms)
        out.extend(decoded(o))
    return state, out


def step_(state, batch, caught_up=frozenset(), now_ms=0):
    state, out = step(state, SourceBatch(0, batch, caught_up), now_ms=now_ms)
    return state, decoded(out)


def examples(out):
    return {o.example_id: (o.click, o.conversion, o.click_ts, o.conversion_ts)
            for o in out if isinstance(o, schema.Example)}


def reasons(out):
    return sorted(o.reason.split(":")[0] for o in out if isinstance(o, schema.DeadLetter))


def test_windows_per_objective_and_decision():
    evs = msgs(imp("i1", T0), clk("c1", "i1", T0 + 30_000), cnv("v1", "i1", T0 + 500_000),
               imp("i2", T0 + 1000), clk("c2", "i2", T0 + 1000 + 61_000), cnv("v2", "i2", T0 + 1000 + 601_000))
    # data beyond every deadline in all three topics closes the windows from data alone
    later = msgs(imp("i3", T0 + 10_000_000), clk("c3", "i3", T0 + 10_000_000), cnv("v3", "i3", T0 + 10_000_000),
                 offset=100)
    state, out = run([evs, later])
    got = {o.example_id: o for o in out if isinstance(o, schema.Example)}
    assert set(got) == {"i1", "i2"}
    assert (got["i1"].click, got["i1"].conversion, got["i1"].click_ts, got["i1"].decided) == (
        1, 1, T0 + 30_000, "window_closed")
    assert (got["i2"].click, got["i2"].conversion) == (0, 0)  # both just outside their windows
    assert got["i1"].emitted_ts == 123
    assert reasons(out) == ["click outside attribution window", "conversion outside attribution window"]
    assert list(state.pending) == ["i3"]  # state dropped on emission: bounded by the window
    _, out2 = step_(state, watermarks(T0 + 20_000_000))
    assert [(o.example_id, o.click, o.conversion, o.decided) for o in out2] == [("i3", 1, 1, "end_of_stream")]


def test_slow_topic_holds_time_back_unless_caught_up():
    first = msgs(imp("i1", T0), imp("i9", T0 + 5_000_000))  # impressions far ahead, clicks not read yet
    state, out = run([first])
    assert not out and state.time() is None
    # the clicks arrive later: the early click still joins
    _, out = step_(state, msgs(clk("c1", "i1", T0 + 10_000)))
    assert not out
    # conversions topic at its end: it no longer holds time back
    _, out = step_(state, msgs(clk("c9", "i9", T0 + 5_000_001)), frozenset({CNV}))
    assert examples(out) == {"i1": (1, 0, T0 + 10_000, None)}


def test_feedback_before_impression_is_buffered_then_joined_or_orphaned():
    early = msgs(clk("c1", "i1", T0 + 5_000), cnv("v1", "i1", T0 + 9_000), clk("c2", "nope", T0 + 1_000))
    state, out = run([early, msgs(imp("i1", T0), offset=10)])
    assert not out and "nope" in state.orphans and "i1" not in state.orphans
    _, out = step_(state, watermarks(T0 + 10**8))
    assert examples(out) == {"i1": (1, 1, T0 + 5_000, T0 + 9_000)}
    dl = [o for o in out if isinstance(o, schema.DeadLetter)]
    assert [d.reason for d in dl] == ["orphan click: no impression nope within window"]
    assert (dl[0].topic, dl[0].offset, dl[0].step) == (CLK, 2, "labels.join")
    assert state.n_pending() == 0


def test_duplicates_late_feedback_and_bad_records_are_dead_letters():
    evs = msgs(imp("i1", T0), imp("i1", T0), clk("c1", "i1", T0 + 10), clk("c1", "i1", T0 + 10))
    bad = ((IMP, 0, 50, b"{not json"), (CLK, 0, 51, b'{"type": "click", "event_id": "x"}'),
           (IMP, 0, 52, schema.encode(imp("i5", T0)).replace(b'"feed"', b'"fed"')))
    state, out = run([evs, bad, watermarks(T0 + 700_000)])
    late = msgs(clk("c7", "i1", T0 + 20), offset=60)
    _, out2 = step_(state, late)
    assert examples(out) == {"i1": (1, 0, T0 + 10, None)}
    assert reasons(out) == ["duplicate event_id", "duplicate event_id", "invalid", "schema", "unparseable"]
    decode_dl = [o for o in out if isinstance(o, schema.DeadLetter) and o.reason.split(":")[0] in MALFORMED]
    assert {o.step for o in out if isinstance(o, schema.DeadLetter)} == {"labels.join"}
    assert sorted((d.topic, d.offset) for d in decode_dl) == [(CLK, 51), (IMP, 50), (IMP, 52)]
    assert decode_dl[0].raw in {b"{not json", bad[1][3], bad[2][3]}
    assert [o.reason for o in out2] == ["late click: impression 'i1' already emitted"]
    assert state.counts["events_in"] == 8


def test_remembered_ids_expire_with_time():
    state, _ = run([msgs(imp("i1", T0), clk("c1", "i1", T0 + 1)), watermarks(T0 + 650_000)])
    assert "i1" in state.done[0] | state.done[1] and "c1" in state.seen_fb[0] | state.seen_fb[1]
    step_(state, watermarks(T0 + 10**8))
    assert "i1" in state.done[0] | state.done[1]  # one more window at least
    step_(state, watermarks(T0 + 2 * 10**8))
    assert not any(state.done) and not any(state.seen_fb)


def test_flush_and_snapshot_round_trip():
    state, _ = run([msgs(imp("i1", T0), clk("c0", "zz", T0), clk("c1", "i1", T0 + 7))])
    snap = state.snapshot()
    restored = JoinState.restore(snap)
    _, out = flush(restored, now_ms=5)
    out = decoded(out)
    assert examples(out) == {"i1": (1, 0, T0 + 7, None)} and reasons(out) == ["orphan click"]
    assert [o.decided for o in out if isinstance(o, schema.Example)] == ["end_of_stream"]
    assert state.pending and "i1" in snap[4]  # flushing the restored copy left the original untouched


def end_of_log(ts: int):
    mark = schema.encode(schema.Watermark(ts=ts, source=schema.END_OF_LOG))
    return tuple((t, 0, 20_000, mark) for t in (IMP, CLK, CNV))


LIVE = JoinConfig((IMP, CLK, CNV), 60_000, 600_000)  # wall-clock check on, as in a running stack


def test_end_of_log_closes_the_logs_windows_without_moving_time():
    now = T0 + 3_600_000
    log = msgs(imp("i1", T0), clk("c1", "i1", T0 + 5), imp("i2", T0 + 10))
    state, out = run([log, end_of_log(T0 + 10 + 600_001)], cfg=LIVE, now_ms=now)
    assert examples(out) == {"i1": (1, 0, T0 + 5, None), "i2": (0, 0, None, None)}
    assert {o.decided for o in out} == {"end_of_stream"} and state.n_pending() == 0
    # live traffic after the log, its click read before it: joined, not dead-lettered as stale or orphan
    live = msgs(clk("c3", "i3", now + 2_000), offset=30) + msgs(imp("i3", now), offset=31)
    _, out = step_(state, live, now_ms=now + 3_000)
    assert out == [] and "i3" in state.pending
    _, out = step_(state, end_of_log(now + 600_001), now_ms=now + 3_000)
    assert examples(out) == {"i3": (1, 0, now + 2_000, None)}
    # a mark seen on two of the three topics does not flush: the third may still hold feedback
    state, out = run([msgs(imp("i4", T0)), end_of_log(T0 + 10**7)[:2]], cfg=LIVE, now_ms=now)
    assert out == [] and "i4" in state.pending


def test_event_time_never_runs_ahead_of_the_wall_clock():
    now = T0 + 3_600_000
    future = msgs(cnv("v1", "i0", now + 6 * 3_600_000))  # a conversion stamped 6 h ahead (a skewed clock)
    state, out = run([msgs(imp("i0", now - 1000)), future, watermarks(now + 10**8)], cfg=LIVE, now_ms=now)
    assert state.time() > now and state.clock(now) == now
    # its window has not closed: the live click read before its impression still joins
    _, out = step_(state, msgs(clk("c2", "i2", now + 1000), offset=5), now_ms=now + 1000)
    assert out == [] and "i2" in state.orphans
    _, out = step_(state, msgs(imp("i2", now + 500), offset=6), now_ms=now + 1000)
    assert out == [] and "i2" in state.pending and "i2" not in state.orphans


def test_snapshot_keeps_end_of_log_marks():
    state, _ = run([msgs(imp("i1", T0)), end_of_log(T0 + 10**7)[:2]], cfg=LIVE, now_ms=T0 + 10)
    restored = JoinState.restore(state.snapshot())
    _, out = step_(restored, end_of_log(T0 + 10**7)[2:], now_ms=T0 + 10)
    assert examples(out) == {"i1": (0, 0, None, None)}
    old = JoinState.restore(state.snapshot()[:13])  # a snapshot from before the marks existed
    assert old.eol_ts == [None, None, None] and "i1" in old.pending


def _scenario(rng: random.Random, n: int):
    """Events inside one click window: impressions, in-window and out-of-window feedback, orphans, dups."""
    evs = []
    for k in range(n):
        i = f"i{k}"
        ts = T0 + rng.randrange(0, 20_000)
        evs.append(imp(i, ts, user=k))
        for j in range(rng.randrange(0, 3)):
            evs.append(clk(f"c{k}.{j}", i, ts + rng.randrange(-2_000, 30_000)))
        if rng.random() < 0.3:
            evs.append(cnv(f"v{k}", i, ts + rng.randrange(0, 30_000)))
        if rng.random() < 0.1:
            evs.append(evs[-1])  # exact duplicate
    evs.append(clk("orphan", "missing", T0 + 100))
    return evs


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 12), order_seed=st.integers(0, 10**6),
       batch=st.integers(1, 5))
def test_examples_do_not_depend_on_arrival_order_within_a_window(seed, n, order_seed, batch):
    evs = _scenario(random.Random(seed), n)
    shuffled = evs[:]
    random.Random(order_seed).shuffle(shuffled)
    outs = []
    for order in (evs, shuffled):
        m = msgs(*order)
        chunks = [m[k:k + batch] for k in range(0, len(m), batch)] + [watermarks(T0 + 10**8)]
        state, out = run(chunks)
        outs.append((examples(out), reasons(out)))
        n_dl = sum(isinstance(o, schema.DeadLetter) for o in out)
        assert len(evs) == len(examples(out)) + state.counts["feedback_joined"] + n_dl  # all accounted for
        assert state.n_pending() == 0
    assert outs[0] == outs[1]


ELAPSED = JoinConfig((IMP, CLK, CNV), click_window_ms=60_000, conversion_window_ms=600_000, policy="elapsed",
                     elapsed_ms=120_000, future_tolerance_ms=None)


def test_elapsed_policy_emits_early_then_late_positive_corrections():
    evs = msgs(imp("i1", T0), clk("c1", "i1", T0 + 30_000), imp("i2", T0 + 1_000), imp("i3", T0 + 2_000),
               cnv("v3", "i3", T0 + 50_000))
    state, out = run([evs, watermarks(T0 + 200_000)], cfg=ELAPSED)
    got = {o.example_id: (o.click, o.conversion, o.decided) for o in out if isinstance(o, schema.Example)}
    assert got == {"i1": (1, 0, "elapsed"), "i2": (0, 0, "elapsed"), "i3": (0, 1, "elapsed")}
    # feedback after the elapsed emission but inside its window: a duplicate positive with its own id
    late = msgs(cnv("v1", "i1", T0 + 300_000), clk("c2", "i2", T0 + 59_000), cnv("v1b", "i1", T0 + 310_000),
                offset=50)
    _, out2 = step_(state, late)
    corr = {o.example_id: (o.click, o.conversion, o.conversion_ts, o.decided) for o in out2}
    assert corr == {"i1#late-conversion": (1, 1, T0 + 300_000, "late_positive"),
                    "i2#late-click": (1, 0, None, "late_positive")}
    assert state.counts["late_positives"] == 2  # the second conversion of i1 adds no second correction
    _, out3 = step_(state, watermarks(T0 + 10**7))
    assert out3 == [] and not state.pending  # state kept until the max window closed, nothing re-emitted
    _, out4 = step_(state, msgs(cnv("v9", "i3", T0 + 400_000), offset=90))
    assert [o.reason.split(":")[0] for o in out4] == ["late conversion"]


def test_elapsed_longer_than_the_windows_is_the_window_policy():
    cfg = JoinConfig((IMP, CLK, CNV), 60_000, 600_000, policy="elapsed", elapsed_ms=10**9, future_tolerance_ms=None)
    _, out = run([msgs(imp("i1", T0), clk("c1", "i1", T0 + 5)), watermarks(T0 + 10**7)], cfg=cfg)
    assert [(o.example_id, o.click, o.decided) for o in out] == [("i1", 1, "end_of_stream")]


def test_spliced_example_bytes_equal_the_encoded_struct():
    i = schema.Impression(event_id="i_.:#/@+=~-9", ts=T0, user_id=9, ad_id=2, campaign_id=3, advertiser_id=4,
                          domain="video", cat=[1, 2], dense=[0.5, -1.0], history=[7])
    _, out = run([msgs(i, clk("c1", i.event_id, T0 + 9)), watermarks(T0 + 10**7)])
    want = schema.Example(example_id=i.event_id, impression=i, click=1, conversion=0, click_ts=T0 + 9,
                          decided="end_of_stream", emitted_ts=123)
    assert out == [want]
    # an id that would need escaping (quotes, backslashes) is no id: a dead letter naming the field
    weird = schema.Impression(event_id='we"ird\\id', ts=T0, user_id=9, ad_id=2, campaign_id=3, advertiser_id=4,
                              domain="video")
    _, out = run([msgs(weird)])
    assert [o.reason for o in out] == ["invalid: event_id: only letters, digits and _.:#/@+=~- are allowed"]


def test_every_kind_of_bad_input_is_a_counted_dead_letter():
    import numpy as np

    from streams.sources.hostile import make_bad_records

    good = [imp(f"g{k}", T0 + k) for k in range(5)] + [clk("c0", "g0", T0 + 5), cnv("v0", "g0", T0 + 6)]
    bad = make_bad_records(good, 40, np.random.default_rng(0))
    topic = {"impression": IMP, "click": CLK, "conversion": CNV}
    raw = tuple((topic[b.topic_kind], 0, 100 + k, b.raw) for k, b in enumerate(bad))
    huge = (IMP, 0, 999, b'{"type":"impression","junk":"' + b"x" * 70_000 + b'"}')
    wrong_topic = (CLK, 0, 1000, schema.encode(imp("g9", T0)))
    cfg = JoinConfig((IMP, CLK, CNV), 60_000, 600_000)  # wall-clock check on
    now = T0 + 10**8  # past the closing watermark: windows close no later than the wall clock
    future = (IMP, 0, 1001, schema.encode(imp("f1", now + 2 * 24 * 3600 * 1000)))
    state, out = run([msgs(*good) + raw + (huge, wrong_topic, future)], cfg=cfg, now_ms=now)
    stale = msgs(imp("old", T0 - 700_000), offset=2000)
    _, out2 = step_(state, stale + watermarks(T0 + 10**7), now_ms=now)
    dead = [o for o in out + out2 if isinstance(o, schema.DeadLetter)]
    assert len(dead) == len(bad) + 4
    assert {d.raw for d in dead if d.offset in range(100, 140)} == {b.raw[:65536] for b in bad}  # raw kept <= 64 KiB
    cats = {d.reason.split(":")[0] for d in dead}
    assert {"too large", "wrong topic", "future timestamp", "stale impression", "schema", "unparseable",
            "invalid"} <= cats
    assert all(d.topic in (IMP, CLK, CNV) and d.offset >= 0 for d in dead)
    counted = {k[5:]: v for k, v in state.counts.items() if k.startswith("dead.")}
    assert sum(counted.values()) == state.counts["dead_letters"] == len(dead)
    assert {o.example_id for o in out + out2 if isinstance(o, schema.Example)} == {f"g{k}" for k in range(5)}
