"""The join's cold tier (streams/flows/join_store.py): same examples as the all-in-memory join, smaller state,
and exactly-once examples across a kill + restore of a state that has spilled to disk."""

from __future__ import annotations

import collections
import pickle
import random

import pytest

from streams import schema
from streams.flows import join_store
from streams.flows.join import EXAMPLE, JoinConfig, JoinState, SourceBatch, flush, step

T0 = 1_700_000_000_000
TOPICS = ("imp", "clk", "cnv")
_TOPIC = {schema.Impression: "imp", schema.Click: "clk", schema.Conversion: "cnv"}


def _cfg(policy: str, store_dir=None) -> JoinConfig:
    return JoinConfig(TOPICS, click_window_ms=60_000, conversion_window_ms=600_000, policy=policy,
                      elapsed_ms=120_000, future_tolerance_ms=None, store_dir=store_dir)


def _stream(seed: int, n: int = 2500, batch: int = 40) -> list[tuple]:
    """Batches of one partition's messages in arrival order: an impression a second, clicks (10%, some outside
    their window, some arriving late), conversions (5%, some after the window closed), duplicate impressions
    re-sent minutes later (same ts), feedback for impressions never seen."""
    rng, evs = random.Random(seed), []
    for k in range(n):
        ts, iid = T0 + k * 1000, f"i{k}"
        evs.append((ts, schema.Impression(event_id=iid, ts=ts, user_id=k % 97, ad_id=k % 13, campaign_id=1,
                                          advertiser_id=1, domain="feed", dense=[rng.random()] * 4)))
        if rng.random() < 0.1:
            d = rng.randint(0, 70_000)
            evs.append((ts + d + rng.choice((0, 0, 90_000)), schema.Click(event_id=f"c{k}", impression_id=iid,
                                                                           ts=ts + d, user_id=k % 97)))
        if rng.random() < 0.05:
            d = rng.randint(0, 650_000)
            evs.append((ts + d + rng.choice((0, 0, 60_000)), schema.Conversion(
                event_id=f"v{k}", impression_id=iid, ts=ts + d, user_id=k % 97)))
        if rng.random() < 0.01:  # an at-least-once producer re-sends it minutes later
            evs.append((ts + rng.randint(100_000, 400_000), schema.Impression(
                event_id=iid, ts=ts, user_id=k % 97, ad_id=k % 13, campaign_id=1, advertiser_id=1, domain="feed")))
        if rng.random() < 0.005:
            evs.append((ts, schema.Conversion(event_id=f"o{k}", impression_id=f"never{k}", ts=ts, user_id=1)))
    evs.sort(key=lambda e: e[0])
    msgs = [(_TOPIC[type(e)], 0, j, schema.encode(e)) for j, (_, e) in enumerate(evs)]
    return [tuple(msgs[i:i + batch]) for i in range(0, len(msgs), batch)]


def _outputs(out) -> list[tuple]:
    """Outputs without the wall-clock stamps: examples as (id, click, conversion, click ts, conversion ts,
    decided, impression), dead letters as their reason."""
    rows = []
    for kind, key, value in out:
        if kind == EXAMPLE:
            ex = schema.decode(value, schema.Example)
            rows.append(("ex", key, ex.example_id, ex.click, ex.conversion, ex.click_ts, ex.conversion_ts,
                         ex.decided, schema.encode(ex.impression)))
        else:
            rows.append(("dead", schema.decode(value, schema.DeadLetter).reason))
    return rows


def _run(cfg: JoinConfig, batches, state=None) -> tuple[JoinState, list, list[int]]:
    state, out, mem = state or JoinState(cfg), [], []
    for b in batches:
        state, o = step(state, SourceBatch(0, b, frozenset()), now_ms=T0)
        out += o
        store = state.cold.store if state.cold is not None else None  # its caches: bounded (blocks, pages)
        mem.append(state.memory_bytes() - (store.memory_bytes() - store.index.nbytes() if store is not None else 0))
    state, o = flush(state, now_ms=T0)
    return state, _outputs(out + o), mem


@pytest.mark.parametrize("policy", ["window", "elapsed"])
def test_cold_tier_emits_what_memory_emits(tmp_path, policy):
    batches = _stream(seed=3)
    _, want, mem_hot = _run(_cfg(policy), batches)
    st, got, mem_cold = _run(_cfg(policy, str(tmp_path)), batches)
    assert collections.Counter(got) == collections.Counter(want)
    kinds = collections.Counter(r[7] if r[0] == "ex" else r[1].split(":")[0] for r in want)
    assert kinds["window_closed" if policy == "window" else "elapsed"] > 1000 and kinds["duplicate event_id"] > 5
    assert kinds["late conversion"] > 0 and kinds["conversion outside attribution window"] > 0
    if policy == "elapsed":
        assert kinds["late_positive"] > 10  # some from compacted impressions: the block read back
    assert st.cold.next_block > 3 and st.cold.trash  # blocks written, emitted, forgotten
    # the in-memory state: ten minutes of whole impressions without the cold tier, about one with it
    assert max(mem_cold) < 0.4 * max(mem_hot), (max(mem_cold), max(mem_hot))


def test_kill_and_restore_spilled_state_exactly_once(tmp_path, monkeypatch):
    """Snapshots every 5 batches (Bytewax epochs); the process dies 3 batches after one; Bytewax restores that
    snapshot (or the one before: an epoch not committed yet) and replays the input after its offsets. The
    examples that left before the snapshot plus those after the restore are exactly the examples of a run
    without a crash, although blocks were written (and some purged) after the snapshot."""
    monkeypatch.setattr(join_store, "KEEP_GENS", 2)  # purges happen within the run
    batches = _stream(seed=5)
    _, want, _ = _run(_cfg("window"), batches)
    for back in (0, 1):  # restore the last snapshot, or the one before it
        d = tmp_path / f"back{back}"
        cfg = _cfg("window", str(d))
        state, emitted, snaps = JoinState(cfg), [], []  # snaps: (batches consumed, pickled snapshot, out so far)
        crash = 41 * 5 + 3
        for i, b in enumerate(batches[:crash]):
            if i % 5 == 0:
                snaps.append((i, pickle.dumps(state.snapshot()), len(emitted)))
            state, o = step(state, SourceBatch(0, b, frozenset()), now_ms=T0)
            emitted += o
        at, snap, n_out = snaps[-1 - back]
        assert state.cold.next_block > pickle.loads(snap)[15][2]  # blocks written after the snapshot
        assert state.cold.store.db.execute("SELECT v FROM meta").fetchone() is not None  # purged for good
        del state  # killed: no close, no flush
        restored = JoinState.restore(pickle.loads(snap), str(d))
        _, after, _ = _run(cfg, batches[at:], restored)
        got = _outputs(emitted[:n_out]) + after
        assert collections.Counter(got) == collections.Counter(want)


def test_restore_refuses_a_snapshot_the_store_was_purged_past(tmp_path, monkeypatch):
    monkeypatch.setattr(join_store, "KEEP_GENS", 1)
    cfg, batches = _cfg("window", str(tmp_path)), _stream(seed=7, n=1500)
    state, snaps = JoinState(cfg), []
    for b in batches:
        snaps.append(pickle.dumps(state.snapshot()))
        state, _ = step(state, SourceBatch(0, b, frozenset()), now_ms=T0)
    state.snapshot()
    with pytest.raises(RuntimeError, match="older than the rows deleted for good"):
        JoinState.restore(pickle.loads(snaps[1]), str(tmp_path))
    JoinState.restore(pickle.loads(snaps[-1]), str(tmp_path))  # the latest is fine


def test_state_gauges_reach_the_join_state_panel(tmp_path, store):
    """Two partitions' gauges, summed by the labels sink's stats as it publishes them, drawn by the panel."""
    import time

    from config import Config
    from dashboards import queries as q
    from dashboards.definitions import DASHBOARDS
    from dashboards.sink import stats_rows
    from streams.flows.connectors import _Stats
    from streams.flows.join import OutBatch

    stats, gauges = _Stats(Config()), []
    for p, policy in enumerate(("window", "elapsed")):
        st = JoinState(_cfg(policy, str(tmp_path / policy)))
        for b in _stream(seed=9 + p, n=600):
            st, _ = step(st, SourceBatch(p, b, frozenset()), now_ms=T0)
        gauges.append(st.gauges())
        stats.update(f"p{p}", OutBatch([], dict(st.counts), st.n_pending(), gauges[-1]))
        assert gauges[-1][1] == st.cold.disk_bytes() > 0 and gauges[-1][2] == st.cold.n > 0
    values = stats.totals()
    now = int(time.time() * 1000)
    store.insert("service_stats", stats_rows([schema.ServiceStats("labels", now, values, "labels-1")]))
    got = {}
    for pid in ("join_state", "join_compacted"):
        panel = DASHBOARDS["overview"].panel(pid)
        got.update({r["series"]: r["value"]
                    for r in store.query(q.render(panel.sql, "live"), q.live_parameters(2)).records()})
    want = [sum(g[i] for g in gauges) for i in range(3)]
    assert got == {"in memory": want[0], "on disk (cold tier)": want[1], "impressions in the cold tier": want[2]}


def test_crc_index_finds_every_block_of_an_id_and_forgets_dropped_ones(monkeypatch):
    import numpy as np
    import zlib

    from streams.flows.join_store import CrcIndex

    monkeypatch.setattr(CrcIndex, "MERGE_CAP", 300)
    monkeypatch.setattr(CrcIndex, "DROP_SWEEP", 4)
    idx, where = CrcIndex(), collections.defaultdict(set)
    rng = random.Random(1)
    for bid in range(40):
        ids = [f"i{rng.randrange(2000)}" for _ in range(rng.randrange(1, 60))]
        idx.add(bid, np.array([zlib.crc32(i.encode()) for i in ids], np.uint32))
        for i in ids:
            where[i].add(bid)
    assert 2 < len(idx.segs) < 20 and all((np.diff(s.astype(np.int64)) >= 0).all() for s in idx.segs)
    gone = set(range(0, 40, 3))
    for b in sorted(gone):
        idx.drop([b])
    for i, bids in where.items():
        assert bids - gone <= idx.candidates(zlib.crc32(i.encode())) <= set(range(40)) - gone
    swept = np.array(sorted(gone - idx.dropped), np.uint64)  # dropped and swept: gone from the arrays too
    assert len(swept) >= 12 and not any(np.isin(s & np.uint64(0xFFFFFFFF), swept).any() for s in idx.segs)


def test_a_snapshot_from_before_the_cold_tier_restores_with_it(tmp_path):
    """A recovery directory written by the all-in-memory join (15-field snapshots, a config without the cold
    tier's fields) restores into a join with a cold tier: the same examples as a run without a restart."""
    batches = _stream(seed=11, n=1200)
    _, want, _ = _run(_cfg("window"), batches)
    st, out = JoinState(_cfg("window")), []
    for b in batches[:20]:
        st, o = step(st, SourceBatch(0, b, frozenset()), now_ms=T0)
        out += o
    snap = st.snapshot()[:15]
    for name in ("store_dir", "hot_ms", "spills"):  # as a config pickled before these fields existed
        del snap[0].__dict__[name]
    restored = JoinState.restore(pickle.loads(pickle.dumps(snap)), str(tmp_path))
    st, after, _ = _run(_cfg("window", str(tmp_path)), batches[20:], restored)
    assert st.cold.next_block > 0 and collections.Counter(_outputs(out) + after) == collections.Counter(want)
