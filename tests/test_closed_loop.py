"""The closed loop end to end (issue 16): `streamrec up --serve` with two arms, one deliberately worse, on a
small stream: served -> labelled -> trained -> published -> served, and the arm the oracle says serves truly
better ads wins the online CTR.

Arm A trains; arm B has learning rates 0 (it serves its initial, random model: its ranking of the candidates
is random). Sizing: in-process, with the same generator and trainer defaults, a model trained on 20k warm-up
impressions puts ads of mean true p_click ~0.030 in its top 10 of 100 candidates, against ~0.021 for a random
top 10. Measured through the whole stack (45 s at 60 requests/s, ~2,600 requests): A 0.0280 (online CTR 0.0296
on 9,880 impressions), B 0.0211 (CTR 0.0206 on 16,100): the CTRs differ by ~4.4 standard errors. The split is
uneven because the most active users (Zipf) weigh: the top one sends ~13% of the requests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from streams.bus.processes import free_port

pytestmark = pytest.mark.slow

try:  # the service and the publisher come from their own branches; until both are merged there is no loop
    import serving  # noqa: F401
    import trainer.publish  # noqa: F401
    MISSING = None
except ImportError as e:
    MISSING = f"the closed loop needs `serving` and `trainer.publish` ({e})"


def _row(out: str, arm: str) -> dict[str, float]:
    """One arm's row of the audience's table (deploy.audience.table)."""
    m = re.search(rf"^{arm}\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+) \+- ([\d.]+)\s+(\S+)\s+([\d.]+)",
                  out, re.M)
    assert m, f"no row for arm {arm} in:\n{out[-3000:]}"
    n = [float(x.replace(",", "")) for x in m.groups()[:6]] + [float(m.group(8))]
    return dict(zip(("requests", "served", "clicks", "conversions", "ctr", "ci", "true_p_click"), n))


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_the_oracle_better_arm_wins_online(tmp_path):
    config = {"topics": {"partitions": 2},
              "labels": {"idle_s": 1.0},
              "trainer": {"publish_every_s": 2.0},
              "serving": {"arms": [{"name": "A", "share": 0.5},
                                   {"name": "B", "share": 0.5, "trainer": {"lr_dense": 0.0, "lr_sparse": 0.0}}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "STREAMREC_DATA_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "deploy.cli", "--config", str(path), "up", "--events", "20000", "--bad-rate", "0",
           "--seed", "0", "--ephemeral", "--exit-when-done", "--port", str(free_port()), "--serve",
           "--serve-port", str(free_port()), "--serve-seconds", "30", "--serve-rate", "90"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"streamrec up --serve did not finish:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    # no process of the stack died on the way (two arms' trainers once raced on one user-index file)
    assert "exited with code" not in out and "restarting" not in out, out[-4000:]
    a, b = _row(out, "A"), _row(out, "B")
    print(f"A {a}\nB {b}")
    # both arms served: users are split by hash, and the most active users (Zipf: the top one sends ~13% of the
    # requests) make the split uneven, but never one-sided
    assert a["requests"] > 500 and b["requests"] > 500, out[-3000:]
    assert a["served"] == 10 * a["requests"] and b["served"] == 10 * b["requests"]
    # the oracle: A, which learned, serves truly better ads than B's random ranking
    assert a["true_p_click"] > 1.1 * b["true_p_click"], (a, b)
    # and the online CTR agrees
    assert a["ctr"] > b["ctr"], (a, b)
    assert "oracle prefers A; online CTR prefers A (agree)" in out
    # the loop closed: what was served was labelled from the audience's clicks and trained on while it ran
    trained = int(re.search(r"closed loop: ([\d,]+) examples trained", out).group(1).replace(",", ""))
    assert trained > 0.5 * (a["served"] + b["served"]), out[-3000:]
