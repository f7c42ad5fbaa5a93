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
    p = kafka_io.make_producer(broker, **{"delivery.report.only.error": False})
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


def _read_values(bootstrap: str, topic: str, partitions: int, timeout: float = 60.0) -> list[bytes]:
    consumer = kafka_io.make_consumer(bootstrap, "reader", **{"enable.partition.eof": True})
    consumer.assign(kafka_io.topic_partitions([topic], partitions))
    out, eof, deadline = [], set(), time.monotonic() + timeout
    try:
        while len(eof) < partitions and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=10_000, timeout=0.5):
                if m.error() is None:
                    out.append(m.value())
                elif m.error().code() == kafka_io.KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
    finally:
        consumer.close()
    assert len(eof) == partitions, f"no end of {topic} within {timeout}s"
    return out


def test_durable_broker_keeps_acknowledged_messages_across_sigkills_of_broker_and_storage(tmp_path):
    from streams.bus.storage import StorageServer

    with StorageServer(tmp_path / "s3", log_path=tmp_path / "s3.log") as s3:
        broker = EmbeddedBroker(log_path=tmp_path / "b.log", storage_port=s3.port).start()
        try:
            broker.create_topics(["t"], partitions=4)
            producer = kafka_io.make_producer(broker.bootstrap_servers)
            for i in range(5000):
                kafka_io.produce(producer, "t", b"m%d" % i, partition=i % 4)
            assert producer.flush(30) == 0  # acknowledged
            broker.proc.send_signal(signal.SIGKILL)
            broker.proc.wait()
            s3.proc.send_signal(signal.SIGKILL)
            s3.proc.wait()
            s3.start()
            broker.start()  # same port, storage and cluster id
            assert sorted(_read_values(broker.bootstrap_servers, "t", 4)) == sorted(b"m%d" % i for i in range(5000))
            # storage away while the broker runs: what the broker refuses is produced again once it is back
            s3.stop()
            for i in range(5000, 5200):
                kafka_io.produce(producer, "t", b"m%d" % i, partition=i % 4)
            producer.poll(3.0)
            s3.start()
            assert producer.flush(60) == 0
            got = _read_values(broker.bootstrap_servers, "t", 4)
            assert set(got) == {b"m%d" % i for i in range(5200)}  # nothing lost (a retry may repeat one)
        finally:
            broker.stop()
