"""Kill -9 of every process of a running stack, the ranking service included, twice in a row (two seeds: the
kills land at different points of the stream): nothing lost, nothing applied twice, no impression of an
answered ranking request missing. `streamrec chaos --runs N` repeats it as often as wanted (README)."""

from __future__ import annotations

import pytest

from deploy.chaos import KILL_ORDER, REQUEST_K, run_chaos
from config import load_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("run", [1, 2])
def test_sigkill_of_each_process_loses_and_doubles_nothing(tmp_path, run):
    r = run_chaos(load_config(env={}), tmp_path, events=6_000, rate=800.0, seed=100 + run, progress=lambda m: None)
    assert [name for name, _ in r.kills] == list(KILL_ORDER)
    assert r.settled, "the stack did not finish the log after the kills"
    assert (r.lost, r.doubled, r.wrong_labels) == (0, 0, 0)
    assert r.labelled == r.trained == r.impressions == 6_000 and r.stored_rows == 2 * r.impressions
    assert r.dead_letters == r.bad_records > 0 and not r.unexpected_dead
    assert all(r.restarts[name] >= 1 for name in KILL_ORDER)
    # the ranking service answered before its kill and again after (the run waits for both), each answer with
    # k ads whose impressions the broker acknowledged: every one is on the impressions topic
    assert r.served_requests >= 2 and r.served_impressions == REQUEST_K * r.served_requests
    assert r.served_lost == 0
    # requests sent while it started (seconds: no listener, then no model yet) or was down are counted, not lost
    assert r.requests_failed > 0 and r.ok


def test_with_fm_each_model_is_held_to_its_own_examples():
    """The --with-fm bookkeeping (the run itself: `streamrec chaos --with-fm`, README): the FM must hold every
    example, each vertical model those of its domain group, and the store a row per model, example and
    objective; a model short of one example fails the run."""
    from deploy.chaos import FM_KILL_ORDER, FM_VM_GROUPS, ChaosResult, _fm_expected
    from deploy.up import generated_log
    from streams import schema
    from streams.sources.scenarios import ScenarioConfig

    records = generated_log(2_000, 5, 0.0, ScenarioConfig())
    doms = [r.domain for r in records if isinstance(r, schema.Impression)]
    want = _fm_expected(records)
    assert want["fm"] == len(doms) == 2_000
    assert sorted(want) == ["fm", "vm-feed-stories", "vm-video-search"]
    assert want["vm-feed-stories"] == sum(d in ("feed", "stories") for d in doms) > 0
    assert want["vm-feed-stories"] + want["vm-video-search"] == len(doms)  # the groups cover every domain
    assert {d for g in FM_VM_GROUPS for d in g} >= set(doms)
    # every process of the FM stack is killed: FM, each VM, the teacher join, and the rest
    assert {"trainer-fm", "distill", "trainer-vm-feed-stories", "trainer-vm-video-search"} <= set(FM_KILL_ORDER)
    r = ChaosResult(impressions=2_000, labelled=2_000, settled=True,
                    models={arm: (n, n, 0, 0) for arm, n in want.items()})
    r.stored_rows = 2 * 2 * 2_000  # the FM's rows and the VMs' (which split the examples between them)
    assert r.expected_rows == r.stored_rows and r.ok
    r.stored_rows -= 1
    assert not r.ok
