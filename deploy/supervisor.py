"""Child-process supervision for the local stack: start, watch, restart (backing off), stop in order, never orphan.

Children are started with ``PR_SET_PDEATHSIG`` so a ``kill -9`` of the supervisor takes them down too, and in
their own session, so a terminal's Ctrl-C reaches only the supervisor, which then stops them in order (a
trainer must checkpoint while the broker is still up).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from streams.bus.processes import start_child
from streams.names import Stat

log = logging.getLogger("streamrec.supervisor")


@dataclass
class Child:
    """One supervised ``streamrec`` subcommand (or, with ``program``, any command).

    ``restart_args`` replace ``args`` after a crash (e.g. ``train --resume`` instead of ``train --fresh``).
    ``once``: a child with finite work (the simulated audience): exiting with code 0 means done, and it is not
    restarted; any other exit is a crash as for every child.
    """

    name: str
    args: list[str]
    restart_args: list[str] | None = None
    program: list[str] | None = None  # run this instead of ``streamrec --config FILE``, followed by args
    on_restart: Callable[[Child], None] | None = None  # called after each restart (e.g. wait until ready)
    env: dict[str, str] = field(default_factory=dict)
    once: bool = False
    proc: subprocess.Popen | None = None
    restarts: int = 0
    quick_crashes: int = 0  # consecutive exits within STABLE_S of their start: the backoff's exponent
    started_at: float = 0.0
    restart_at: float | None = None  # monotonic time of the pending restart, while backing off
    log_path: Path | None = None

    def start(self, config_path: Path, log_dir: Path, first: bool = True) -> None:
        args = self.args if first or self.restart_args is None else self.restart_args
        prog = self.program or [sys.executable, "-m", "deploy.cli", "--config", str(config_path)]
        cmd = [*prog, *args]
        self.log_path = log_dir / f"{self.name}.log"
        self.proc = start_child(cmd, self.log_path, self.env)
        self.started_at, self.restart_at = time.monotonic(), None
        log.debug("started %s pid=%s: %s", self.name, self.proc.pid, " ".join(cmd))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def finished(self) -> bool:
        """A ``once`` child that exited with code 0: its work is done."""
        return self.once and self.proc is not None and self.proc.poll() == 0

    @property
    def crash_looping(self) -> bool:
        return self.quick_crashes >= CRASH_LOOP

    def tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int | None:
        self.restart_at = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


STABLE_S = 30.0  # a child that ran this long before exiting restarts at once; quicker exits back off
BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # delay before restart, by consecutive quick crashes
CRASH_LOOP = 3  # consecutive quick crashes that the stack reports as a crash loop


def backoff_s(quick_crashes: int) -> float:
    """Delay before the next restart after ``quick_crashes`` consecutive quick exits (capped, never infinite).

    >>> [backoff_s(n) for n in (0, 1, 2, 3, 10)]
    [0.0, 1.0, 2.0, 4.0, 30.0]
    """
    return BACKOFF_S[min(quick_crashes, len(BACKOFF_S) - 1)]


class Supervisor:
    """Starts children in order, restarts crashed ones, stops them in reverse order.

    A child that keeps crashing is restarted with a growing delay (:func:`backoff_s`) and reported as crash
    looping, never given up on: one component that cannot run (a bad message it cannot get past, a port in
    use) must not take the rest of the stack down with it. :meth:`watch` runs :meth:`check` in a thread, so
    children come back while the caller is busy (producing a log, say).
    """

    def __init__(self, config_path: Path, log_dir: Path):
        self.config_path = config_path
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._lock = threading.RLock()
        self._watching: threading.Event | None = None
        self._stopping = False  # set by stop_watching/stop_all: from then on nothing restarts

    def start(self, child: Child) -> Child:
        with self._lock:
            child.start(self.config_path, self.log_dir)
            self.children.append(child)
        return child

    def check(self) -> None:
        """Restart children that exited unexpectedly, each once its backoff delay has passed."""
        now = time.monotonic()
        with self._lock:
            for c in self.children if not self._stopping else ():
                if c.proc is None or c.alive() or c.finished:
                    continue
                if c.restart_at is None:  # a new exit: schedule the restart
                    quick = now - c.started_at < STABLE_S
                    c.quick_crashes = c.quick_crashes + 1 if quick else 0
                    delay = backoff_s(c.quick_crashes)
                    c.restart_at = now + delay
                    log.warning("%s exited with code %s after %.0fs; restarting%s%s", c.name, c.proc.returncode,
                                now - c.started_at, f" in {delay:.0f}s" if delay else "",
                                f" (crash loop: {c.quick_crashes} quick exits in a row; see {c.log_path})"
                                if c.crash_looping else "")
                if now >= c.restart_at:
                    c.restarts += 1
                    c.start(self.config_path, self.log_dir, first=False)
                    if c.on_restart is not None:
                        c.on_restart(c)

    def watch(self, interval: float = 0.25, on_tick=None) -> None:
        """Call :meth:`check` (then ``on_tick()``, if given) every ``interval`` seconds in a daemon thread until
        :meth:`stop_all`.

        The thread lives until every child is stopped: ``PR_SET_PDEATHSIG`` fires when the *thread* that
        started a child ends, so the children it restarted would be killed the moment it returned.
        """
        if self._watching is not None:
            return
        stop = self._watching = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.check()
                    with self._lock:
                        if on_tick is not None and not self._stopping:
                            on_tick()
                except Exception:  # noqa: BLE001 - the watcher must outlive one failed restart (e.g. fork)
                    log.exception("supervisor: restart check failed")

        threading.Thread(target=loop, name="supervisor", daemon=True).start()

    def status(self) -> dict[str, float]:
        """Per child: ``up.<name>`` (1 or 0), ``restarts.<name>``, ``crash_looping.<name>`` (service stats)."""
        with self._lock:
            out: dict[str, float] = {}
            for c in self.children:
                out[f"{Stat.UP}.{c.name}"] = float(c.alive())
                out[f"{Stat.RESTARTS}.{c.name}"] = float(c.restarts)
                out[f"{Stat.CRASH_LOOPING}.{c.name}"] = float(c.crash_looping)
            return out

    def stop_watching(self) -> None:
        """No more restarts and no more ``on_tick`` calls once this returns (the thread itself ends in
        :meth:`stop_all`, after the children)."""
        with self._lock:  # a check (and tick) in progress finishes first
            self._stopping = True

    def stop_all(self, timeout: float = 15.0) -> None:
        self.stop_watching()
        with self._lock:
            for c in reversed(self.children):
                c.stop(timeout)
        if self._watching is not None:
            self._watching.set()

    def wait_until(self, cond, timeout: float, interval: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if cond():
                return True
            time.sleep(interval)
        return False
