"""The sessions world (streams/sources/sessions.py) and `streamrec bench llatte` (benchmarks/llatte.py)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import msgspec
import numpy as np
import pytest

from deploy.cli import main
from streams import schema
from streams.sources import sessions
from streams.sources.generate import GeneratorConfig, hidden_tastes, session_tastes, simulate
from streams.sources.logfile import iter_jsonl
from streams.sources.sessions import SESSIONS, SessionsConfig, oracles

WORLD = {"n_users": 300, "n_ads": 100, "impressions_per_s": 2.0, "sessions": SESSIONS}


@pytest.fixture(scope="module")
def sim():
    return simulate(GeneratorConfig(n_impressions=6000, seed=5, **WORLD))


def test_off_by_default_and_refused_with_interest_shift():
    assert not GeneratorConfig().sessions.on and SESSIONS.on
    with pytest.raises(ValueError, match="interest-shift"):
        from streams.sources.scenarios import ScenarioConfig

        simulate(GeneratorConfig(n_impressions=10, n_users=50, n_ads=20, sessions=SESSIONS,
                                 scenario=ScenarioConfig(name="interest-shift")))
    with pytest.raises(ValueError, match="intent_drift"):
        SessionsConfig(n_interests=2, intent_drift=1.5)
    with pytest.raises(ValueError, match="not of the sessions world"):
        session_tastes(simulate(GeneratorConfig(n_impressions=10, n_users=50, n_ads=20)))


def _schedule(cfg: SessionsConfig, n: int = 4000, users: int = 50):
    it = sessions.interests(cfg, users, 8, 0.5, seed=1)
    w = np.full(users, 1.0 / users)
    return it, sessions.schedule(cfg, n, 1.0, w, it, 0.5, seed=1)


def test_sessions_are_gap_separated_and_intent_changes_between_them():
    cfg = SessionsConfig(n_interests=4, session_gap_s=600.0, intent_drift=0.3)
    it, s = _schedule(cfg)
    assert len(s.user) == 4000 and np.all(np.diff(s.t_s) >= 0)
    within, between, steps = [], [], []
    by_user: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(s.user.tolist()):
        by_user[u].append(i)
    for rows in by_user.values():
        for a, b in zip(rows, rows[1:]):
            same = s.session[a] == s.session[b]
            d = float(np.linalg.norm(s.intent[a] - s.intent[b]))
            (within if same else between).append(d)
            if same:
                assert s.step[b] == s.step[a] + 1
            else:  # a new session of the user starts at least session_gap_s after the previous one ended
                assert s.t_s[b] - s.t_s[a] >= cfg.session_gap_s
                steps.append(int(s.step[b]))
    assert within and between and set(steps) == {0}
    # the intent evolves within a session (it moves) but stays near its interest; a new session draws anew
    assert 0 < np.mean(within) < 0.6 * np.mean(between)
    # with no drift the intent is fixed for the whole session
    _, s0 = _schedule(msgspec.structs.replace(cfg, intent_drift=0.0))
    order = np.lexsort((s0.step, s0.session))
    ss, si = s0.session[order], s0.intent[order]
    consecutive = ss[1:] == ss[:-1]
    assert consecutive.any() and np.allclose(si[1:][consecutive], si[:-1][consecutive])


def test_history_is_the_latest_clicked_ads_in_time_order(sim):
    imps = [r for r in sim.records if isinstance(r, schema.Impression)]
    ad_of = {i.event_id: i.ad_id for i in imps}
    clicks: dict[int, list[tuple[int, int]]] = defaultdict(list)  # user -> [(click ts, ad)]
    for r in sim.records:
        if isinstance(r, schema.Click):
            clicks[r.user_id].append((r.ts, ad_of[r.impression_id]))
    L = sim.config.history_len
    first: dict[int, list[int]] = {}
    changed = 0
    for imp in imps:  # records are in time order: a user's first impression has no click before it
        init = first.setdefault(imp.user_id, imp.history)
        before = [a for t, a in sorted(clicks[imp.user_id]) if t < imp.ts]
        assert imp.history == (init + before)[-L:]
        changed += imp.history != init
    assert changed > len(imps) / 5  # histories follow the clicks


def test_oracle_with_the_intent_beats_the_average_taste(sim):
    o = oracles(sim)
    assert o["auc_intent"] > o["auc_average_taste"] + 0.03
    assert o["ne_intent"] < o["ne_average_taste"]
    intent, avg, ad = session_tastes(sim)
    u, a = hidden_tastes(sim)  # the sessions world's taste of the moment is the intent
    assert np.array_equal(u, intent) and np.array_equal(a, ad)
    # the average taste is each user's mixture mean: the intents of a heavy user average out near it
    user = sim.truth.column("user_id").to_numpy()
    top = np.bincount(user).argmax()
    m = user == top
    assert np.linalg.norm(intent[m].mean(0) - avg[m][0]) < np.linalg.norm(intent[m][0] - avg[m][0])


def test_generate_cli_world_sessions(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STREAMREC_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    out = tmp_path / "s.jsonl"
    assert main(["generate", "--events", "1500", "--seed", "2", "--world", "sessions", "--rate", "2",
                 "--out", str(out)]) == 0
    assert "oracle AUC" in capsys.readouterr().out
    written = [schema.decode(raw) for _, raw in iter_jsonl(out)]
    g = GeneratorConfig(n_impressions=1500, seed=2, impressions_per_s=2.0, sessions=SESSIONS)
    assert written == simulate(g).records  # --world sessions is the SESSIONS preset


def test_bench_llatte_tiny(monkeypatch, capsys, one_thread):
    from benchmarks import llatte

    # small tables: the test is about the plumbing, not the numbers
    monkeypatch.setattr(llatte, "FM", msgspec.structs.replace(llatte.FM, hash_buckets=2000))
    monkeypatch.setattr(llatte, "VM", msgspec.structs.replace(llatte.VM, hash_buckets=1000))
    monkeypatch.setattr(llatte, "AD_BUCKETS", 1009)
    # the user model feeds the FM and what the FM publishes: the LoopFM path carries the user model's vectors
    g = GeneratorConfig(n_impressions=800, seed=3, **{**llatte.WORLD, "n_users": 200})
    from benchmarks._simulated import example_stream

    sim = simulate(g)
    exs = example_stream(sim, "oracle", elapsed_s=0)
    run = llatte.fm_run(exs, 800, llatte.FM, (8, 1, 4), publish=True)
    assert run.params > 0 and not np.isnan(run.p_fm).any() and not np.isnan(run.p_user).any()
    last = [schema.decode(r, schema.FMEmbeddings) for r in run.published[-1]]
    users = [m for m in last if m.kind == "user"]
    v = np.array(users[0].vectors).reshape(len(users[0].ids), users[0].dim)
    assert users[0].dim == llatte.FM.embedding_dim + 8 and np.abs(v[:, -8:]).sum() > 0
    monkeypatch.setattr(sys, "argv", ["llatte", "--n", "800", "--lengths", "2,4", "--sizes", "8x1,8x2", "--dim", "8"])
    monkeypatch.setattr(llatte, "WORLD", {**llatte.WORLD, "n_users": 200})
    assert llatte.main() == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "llatte" and set(res["curve_length"]) == {"2", "4"}
    assert set(res["curve_size"]) == {"8x1", "8x2"} and res["largest"] == "8x2" and res["longest"] == 4
    assert res["size_params"]["8x2"] > res["size_params"]["8x1"]
    assert res["value"] == pytest.approx(100 * (res["fm_auc_largest"] - res["fm_auc_no_user_model"]), abs=0.02)
    assert res["oracle_auc"] > res["oracle_average_taste_auc"]
    assert all(0.3 < x < 1 for x in [*res["curve_length"].values(), res["vm_alone_auc"], res["vm_loopfm_auc"]])
