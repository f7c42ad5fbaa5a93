"""Child-process supervision for the local stack: start, watch, restart, stop in order, never orphan.

Children are started with ``PR_SET_PDEATHSIG`` so a ``kill -9`` of the supervisor takes them down too, and in
their own session, so a terminal's Ctrl-C reaches only the supervisor, which then stops them in order (a
trainer must checkpoint while the broker is still up).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from streams.broker import die_with_parent

log = logging.getLogger("streamrec.supervisor")


@dataclass
class Child:
    """One supervised ``streamrec`` subcommand.

    ``restart_args`` replace ``args`` after a crash (e.g. ``train --resume`` instead of ``train --fresh``).
    """

    name: str
    args: list[str]
    restart_args: list[str] | None = None
    max_restarts: int = 3
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log_path: Path | None = None

    def start(self, config_path: Path, log_dir: Path, first: bool = True) -> None:
        args = self.args if first or self.restart_args is None else self.restart_args
        cmd = [sys.executable, "-m", "deploy.cli", "--config", str(config_path), *args]
        self.log_path = log_dir / f"{self.name}.log"
        out = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, preexec_fn=die_with_parent,
                                         start_new_session=True)
        finally:
            out.close()
        log.debug("started %s pid=%s: %s", self.name, self.proc.pid, " ".join(cmd))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int | None:
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


class Supervisor:
    """Starts children in order, restarts crashed ones (bounded), stops them in reverse order."""

    def __init__(self, config_path: Path, log_dir: Path):
        self.config_path = config_path
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, child: Child) -> Child:
        child.start(self.config_path, self.log_dir)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Restart children that exited unexpectedly; raise once one exceeds its restart budget."""
        for c in self.children:
            if c.proc is None or c.alive():
                continue
            rc = c.proc.returncode
            if c.restarts >= c.max_restarts:
                raise RuntimeError(f"{c.name} exited with code {rc} and was restarted {c.restarts} times; "
                                   f"last lines of {c.log_path}:\n{c.tail()}")
            c.restarts += 1
            log.warning("%s exited with code %s; restarting (%d/%d)", c.name, rc, c.restarts, c.max_restarts)
            c.start(self.config_path, self.log_dir, first=False)

    def stop_all(self, timeout: float = 15.0) -> None:
        for c in reversed(self.children):
            c.stop(timeout)

    def wait_until(self, cond, timeout: float, interval: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if cond():
                return True
            time.sleep(interval)
        return False
