"""Kafka I/O edge: a broker that is away costs a few log lines, never a lost message."""

from __future__ import annotations

import logging

from streams.bus import kafka_io
from streams.bus.kafka_io import _Reporter


def test_a_repeated_problem_is_logged_once_per_interval_with_a_count(caplog):
    report, log = _Reporter(every_s=3600), logging.getLogger("test.reporter")
    with caplog.at_level(logging.WARNING, "test.reporter"):
        for _ in range(1000):
            report(log, "trainer consumer", "_TRANSPORT: Connection refused")
        report(log, "trainer consumer", "_ALL_BROKERS_DOWN: 1/1 brokers are down")
        report(log, "labels source partition 2", "_TRANSPORT: Connection refused")
    assert [r.getMessage() for r in caplog.records] == [
        "trainer consumer: _TRANSPORT: Connection refused",
        "trainer consumer: _ALL_BROKERS_DOWN: 1/1 brokers are down",
        "labels source partition 2: _TRANSPORT: Connection refused"]
    report.every_s = 0.0
    with caplog.at_level(logging.WARNING, "test.reporter"):
        report(log, "trainer consumer", "_TRANSPORT: Connection refused")
    assert caplog.records[-1].getMessage().endswith("(999 more like it since)")


def test_producers_retry_until_delivered():
    conf = kafka_io.producer_config("h:9092", {"message.timeout.ms": 1000})
    assert kafka_io.producer_config("h:9092")["message.timeout.ms"] == 0  # 0: no delivery timeout
    assert conf["message.timeout.ms"] == 1000  # a user's setting still wins
