"""Kill -9 of every process of a running stack, the ranking service included, three times in a row: nothing
lost, nothing applied twice, no impression of an answered ranking request missing."""

from __future__ import annotations

import pytest

from deploy.chaos import KILL_ORDER, REQUEST_K, run_chaos
from config import load_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("run", [1, 2, 3])
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
