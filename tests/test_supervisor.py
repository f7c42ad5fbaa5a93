"""The local stack's supervisor: crashed children come back, a crash loop backs off and never stops the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from deploy.supervisor import Child, Supervisor, backoff_s

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]


def _until(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_child_is_restarted_and_a_crash_loop_backs_off_without_stopping_the_others(tmp_path):
    sup = Supervisor(tmp_path / "config.yaml", tmp_path)
    steady = sup.start(Child("steady", [], program=SLEEP))
    looping = sup.start(Child("looping", [], program=CRASH))
    sup.watch(interval=0.05)
    try:
        first = steady.proc.pid
        os.kill(first, signal.SIGKILL)
        assert _until(lambda: steady.alive() and steady.proc.pid != first), "a SIGKILLed child must come back"
        assert steady.restarts == 1
        # the crashing child: restarted at once, then after 1 s, 2 s, ... and reported as crash looping
        assert _until(lambda: looping.restarts >= 3, timeout=20)
        status = sup.status()
        assert status["crash_looping.looping"] == 1.0 and status["up.steady"] == 1.0
        assert status["restarts.steady"] == 1.0 and status["crash_looping.steady"] == 0.0
        n = looping.restarts
        time.sleep(1.0)
        assert looping.restarts <= n + 1, "restarts must slow down while it keeps crashing"
        assert steady.alive() and steady.proc.pid != first  # the rest keeps running
    finally:
        sup.stop_all(timeout=5)
    assert not steady.alive() and not looping.alive()
    restarts = looping.restarts
    time.sleep(0.3)
    assert looping.restarts == restarts and not looping.alive(), "nothing restarts after stop_all"


def test_backoff_is_capped():
    delays = [backoff_s(n) for n in range(20)]
    assert delays == sorted(delays) and delays[0] == 0.0 and max(delays) == 30.0


def test_a_child_restarted_by_the_watch_thread_lives_until_stop_all(tmp_path):
    # PR_SET_PDEATHSIG fires when the thread that forked a child ends: the watch thread must outlive them all
    sup = Supervisor(tmp_path / "config.yaml", tmp_path)
    child = sup.start(Child("sleeper", [], program=SLEEP))
    sup.watch(interval=0.05)
    try:
        first = child.proc.pid
        os.kill(first, signal.SIGKILL)
        assert _until(lambda: child.alive() and child.proc.pid != first)
        sup.stop_watching()  # as LocalStack.stop does before stopping the children
        time.sleep(0.5)
        assert child.alive(), "the restarted child died with the watch thread"
    finally:
        sup.stop_all(timeout=5)
    assert not child.alive()


def test_children_die_with_a_killed_supervisor_even_if_they_ignore_sigterm(tmp_path):
    # a trainer stuck flushing to a broker that died with the same supervisor ignores SIGTERM in effect
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)")
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from deploy.supervisor import Child, Supervisor\n"
        f"sup = Supervisor(Path({str(tmp_path)!r}) / 'config.yaml', Path({str(tmp_path)!r}))\n"
        f"child = sup.start(Child('stubborn', [], program=[sys.executable, '-c', {stubborn!r}]))\n"
        "sup.watch(interval=0.05)\n"
        "print(child.proc.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        time.sleep(0.3)  # the child has installed its handler
        parent.kill()
        parent.wait()
        assert _until(lambda: not _alive(child_pid), timeout=10), "the child outlived its SIGKILLed supervisor"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child_pid is not None and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, waiting for its reaper
    except FileNotFoundError:
        return False


def test_a_once_child_that_finishes_is_not_restarted_but_one_that_crashes_is(tmp_path):
    sup = Supervisor(tmp_path / "config.yaml", tmp_path)
    done = sup.start(Child("done", [], program=[sys.executable, "-c", "pass"], once=True))
    crashing = sup.start(Child("crashing", [], program=CRASH, once=True))
    sup.watch(interval=0.05)
    try:
        assert _until(lambda: crashing.restarts >= 1), "a once child that crashes is restarted"
        time.sleep(0.3)
        assert done.finished and done.restarts == 0 and sup.status()["up.done"] == 0.0
    finally:
        sup.stop_all(timeout=5)
