"""Kill -9 of every process of a running stack, three times in a row: nothing lost, nothing applied twice."""

from __future__ import annotations

import pytest

from deploy.chaos import KILL_ORDER, run_chaos
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
