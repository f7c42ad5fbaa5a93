"""`streamrec up`: the whole local stack as one supervised command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from streams.bus.processes import free_port

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    todo, found = [pid], []
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -e" not in line]


def _up(tmp_path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen:
    env = {**os.environ, "STREAMREC_DATA_DIR": str(tmp_path)}
    # sigint_ignored: started the way a shell starts a background job (`streamrec up --stay &`)
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, preexec_fn=pre)


def _chdb_counts(path) -> dict:
    # chDB allows one process per store path: read it in a fresh process once `up` has released it.
    code = ("import json, sys; from dashboards.store import Store; s = Store.open(sys.argv[1], 'streamrec'); "
            "q = lambda sql: s.query(sql).rows; "
            "print(json.dumps({'examples': q('SELECT uniqExact(example_id) FROM streamrec.predictions')[0][0], "
            "'domains': q('SELECT uniqExact(domain) FROM streamrec.predictions')[0][0], "
            "'dead': q('SELECT count() FROM streamrec.dead_letters')[0][0]})); s.close()")
    r = subprocess.run([sys.executable, "-c", code, f"chdb://{path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    return json.loads(r.stdout.strip().splitlines()[-1])


def test_up_processes_events_end_to_end_and_leaves_nothing_running(tmp_path):
    port = str(free_port())
    proc = _up(tmp_path, "--events", "10000", "--bad-rate", "0.02", "--exit-when-done", "--port", port)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"streamrec up did not finish:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "done: " in out and "10,000 trained" in out and "dashboard: http://127.0.0.1:" in out
    assert not _processes_mentioning(str(tmp_path)), "a stack process outlived `streamrec up`"
    malformed = int(re.search(r"\(([\d,]+) malformed\)", out).group(1).replace(",", ""))
    assert malformed > 0
    counts = _chdb_counts(tmp_path / "chdb")
    # every dead letter is an injected malformed event: no feedback orphaned by windows closing early
    assert counts == {"examples": 10000, "domains": 4, "dead": malformed}
    # the trainer's user-model thread wrote the user-vector index that `streamrec users` reads
    info = subprocess.run([sys.executable, "-m", "deploy.cli", "users", "info"], capture_output=True, text=True,
                          env={**os.environ, "STREAMREC_DATA_DIR": str(tmp_path)}, timeout=60)
    assert info.returncode == 0 and re.search(r"users/index: [\d,]+ users, dim 32", info.stdout), info
    assert "user vectors: " in out and "`streamrec up` again continues from here" in out
    # Again: the durable stack continues where it stopped (topics, dataflow recovery, checkpoints, metrics);
    # this run's progress is its own 2,000 examples, and nothing of the first run is trained again
    # (the same dashboard port too: the previous run's connections may hold it in TIME_WAIT, which is free)
    again = _up(tmp_path, "--events", "2000", "--exit-when-done", "--port", port)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "done: " in out and "2,000 trained" in out, out[-3000:]
    assert "generating 2,000 impressions (seed 1," in out  # a new seed: new event ids
    assert _chdb_counts(tmp_path / "chdb")["examples"] == 12000
    # An ephemeral run in the same data dir: a new in-memory broker's topics start at offset 0, and the metrics
    # sink must not resume from the offsets it recorded against the durable broker (it would skip their start).
    eph = _up(tmp_path, "--events", "1000", "--ephemeral", "--exit-when-done", "--port", port)
    out, _ = eph.communicate(timeout=300)
    assert eph.returncode == 0 and "done: " in out and "1,000 trained" in out, out[-3000:]


def test_ctrl_c_stops_every_process_in_order(tmp_path):
    proc = _up(tmp_path, "--events", "2000", "--stay", "--port", str(free_port()), sigint_ignored=True)
    deadline = time.monotonic() + 240
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "press Ctrl-C" in line or not line:
            break
    assert "press Ctrl-C" in lines[-1], "".join(lines)[-3000:]
    kids = _descendants(proc.pid)
    assert len(kids) >= 6  # storage, broker, dashboard, labels, stats, trainer
    # A terminal's Ctrl-C reaches the supervisor's process group only: the children run in their own sessions.
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # the children die with it (PR_SET_PDEATHSIG)
        out, _ = proc.communicate()
        pytest.fail(f"streamrec up ignored SIGINT:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "did not stop" not in out, out[-3000:]
    time.sleep(0.5)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}") and open(f"/proc/{k}/stat").read().split()[2] != "Z"]
    # the trainer checkpointed on the way down (SIGTERM from the supervisor, broker still up)
    ckpts = list(tmp_path.glob("stack/checkpoints/*"))
    assert ckpts, "trainer left no checkpoint"


def test_up_refuses_a_dashboard_port_in_use(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "deploy.cli", "up", "--events", "100", "--port", str(port)],
                           env={**os.environ, "STREAMREC_DATA_DIR": str(tmp_path)}, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2 and f"127.0.0.1:{port} is in use" in r.stderr and "--port" in r.stderr, r.stderr
    assert not list(tmp_path.glob("runs/*")), "nothing may start"


def test_progress_is_the_slowest_arms(cfg):
    """Several trainers (arms) report as component trainer, one instance each: progress is the slowest arm's
    examples taken (trained + scored-only for another arm's traffic), counted from this run's start."""
    from deploy.stack import StatsWatcher
    from streams import schema
    from streams.bus import kafka_io

    producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    now = int(time.time() * 1000)
    reports = [("A", now - 60_000, {"examples_trained": 500.0}),  # an earlier run: the baseline
               ("A", now + 1, {"examples_trained": 1500.0, "examples_other_arm": 0.0}),
               ("B", now + 2, {"examples_trained": 200.0, "examples_other_arm": 700.0}),  # learn_from: own
               ("A", now - 1, {"examples_trained": 1200.0})]  # an older report of A read last does not win
    for arm, ts, values in reports:
        st = schema.ServiceStats(component="trainer", ts=ts, values=values, instance=arm)
        kafka_io.produce(producer, cfg.topics.service_stats, schema.encode(st), partition=0)
    assert producer.flush(30) == 0
    watcher = StatsWatcher(cfg, since_ms=now - 30_000)
    try:
        deadline = time.monotonic() + 30
        while watcher.trained() != 900.0 and time.monotonic() < deadline:
            watcher.poll()
        # A: 1500 - 500 = 1000 this run; B: 200 + 700 = 900 -> the slowest, B
        assert watcher.trained() == 900.0
    finally:
        watcher.close()
