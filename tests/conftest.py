"""Shared fixtures: the embedded broker (one per test session) and a fresh configuration per test.

Every integration test runs against the real embedded broker and chDB, started here; tests against an
external Kafka or ClickHouse run only when STREAMREC_TEST_KAFKA / STREAMREC_TEST_CLICKHOUSE is set.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from streams.bus.broker import EmbeddedBroker
from config import Config, load_config

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    external = os.environ.get("STREAMREC_TEST_KAFKA")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b.bootstrap_servers


def make_config(data_dir: Path, bootstrap: str, partitions: int = 2, **sections) -> Config:
    """A Config with its own topic names (unique per call), data under ``data_dir``."""
    n = next(_counter)
    prefix = f"t{os.getpid()}_{n}_"
    topics = {name: prefix + name for name in ("impressions", "clicks", "conversions", "examples",
                                                "dead_letters", "predictions", "service_stats", "feature_stats",
                                                "teacher_predictions", "examples_distilled", "fm_embeddings",
                                                "solaris_pairs", "ads")}
    topics["partitions"] = partitions
    base = {"data_dir": str(data_dir), "kafka": {"bootstrap_servers": bootstrap}, "topics": topics,
            "trainer": {"checkpoint_dir": str(data_dir / "checkpoints")}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(env={}, **base)


@pytest.fixture
def cfg(tmp_path, broker) -> Config:
    """Fresh topics (created) and a data dir for one test."""
    from streams.bus import kafka_io

    c = make_config(tmp_path, broker)
    kafka_io.ensure_topics(broker, c.topics.all(), c.topics.partitions)
    return c


def read_topics(cfg: Config, topics, timeout: float = 60.0) -> list:
    """Every message of ``topics``, each partition from the beginning up to its end (partition EOF).

    Call it once the writers have flushed: EOF is judged from the fetch high watermark, which is exact on
    the embedded broker and on Kafka (unlike its ListOffsets answer).
    """
    import time

    from streams.bus import kafka_io

    topics = [topics] if isinstance(topics, str) else list(topics)
    consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "test-reader",
                                      **{"enable.partition.eof": True, "fetch.wait.max.ms": 20})
    consumer.assign(kafka_io.topic_partitions(topics, cfg.topics.partitions))
    out, eof = [], set()
    deadline = time.monotonic() + timeout
    try:
        while len(eof) < len(topics) * cfg.topics.partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read_topics: no end of {sorted(set(topics))} within {timeout}s")
            for m in consumer.consume(num_messages=10_000, timeout=0.5):
                if m.error() is None:
                    out.append(m)
                elif m.error().code() == kafka_io.KafkaError._PARTITION_EOF:
                    eof.add((m.topic(), m.partition()))
    finally:
        consumer.close()
    return out


@pytest.fixture(scope="module")
def chdb_client(tmp_path_factory, request):
    """One chDB engine per test module (chDB opens one path per process; closed at the module's end)."""
    from dashboards.store import open_client

    name = request.module.__name__.rsplit(".", 1)[-1]
    c = open_client(f"chdb://{tmp_path_factory.mktemp('chdb').resolve()}/{name}")
    yield c
    c.close()


@pytest.fixture
def store(chdb_client, request):
    """A fresh database (schema created) in the module's chDB engine."""
    from dashboards.store import Store

    s = Store(chdb_client, f"{request.module.__name__.rsplit('.', 1)[-1]}_{next(_counter)}")
    s.ensure_schema()
    return s


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the machine's 2 cores are shared: one thread is 3-4x faster than two
    under contention), the previous setting after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
