import os
import signal
import subprocess
import sys
import time

import pytest

from streams.bus import kafka_io
from streams.bus.broker import EmbeddedBroker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_start_create_topics_stop(tmp_path):
    with EmbeddedBroker(log_path=tmp_path / "b.log") as b:
        b.create_topics(["x", "y"], partitions=3)
        b.create_topics(["x"], partitions=3)  # idempotent
        assert kafka_io.list_topics(b.bootstrap_servers) == {"x": 3, "y": 3}
        with pytest.raises(ValueError, match="partitions"):
            b.create_topics(["x"], partitions=2)
        pid = b.proc.pid
    assert not _alive(pid)


def test_partition_for_matches_librdkafka_murmur2(broker):
    kafka_io.ensure_topics(broker, ["murmur"], 5)
    p = kafka_io.make_producer(broker)
    got = {}
    for i in range(300):
        key = str(i * 7919).encode()
        p.produce("murmur", key=key, value=b"v", on_delivery=lambda err, m: got.__setitem__(m.key(), m.partition()))
    p.flush(10)
    assert len(got) == 300
    assert all(kafka_io.partition_for(k, 5) == part for k, part in got.items())


def test_broker_dies_with_its_owner_on_sigkill(tmp_path):
    code = ("import sys, time; from streams.bus.broker import EmbeddedBroker; b = EmbeddedBroker().start(); "
            "print(b.proc.pid, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    broker_pid = int(owner.stdout.readline())
    assert _alive(broker_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while _alive(broker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(broker_pid), "broker outlived its owner"
