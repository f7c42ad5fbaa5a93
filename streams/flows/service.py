"""The dataflows as services: on Kafka, in this process, with Bytewax recovery.

``run_labels``, ``run_stats`` and ``run_distill`` wire each flow to its Kafka connectors (``streams/flows/connectors.py``)
and run it with ``workers`` threads, or as one process of a Bytewax cluster (``process_id``/``addresses``:
every process runs the same call with its own id; ``addresses[i]`` is ``host:port`` of process ``i``).
``epoch_s`` is the snapshot interval (Bytewax's default 10 s): what a crash replays. The commands that start
them (``streamrec labels``, ``streamrec stats``, ``streamrec distill``, and local clusters) are in ``deploy/flows.py``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir

from streams.bus import kafka_io
from config import NO_BROKER, Config
from streams.flows import join
from streams.flows import distill
from streams.flows.connectors import (DistillSink, FeatureStatsSink, KafkaDistillSource, KafkaExamplesSource,
                                      KafkaPartitionsSource, LabelsSink, StatsReporter)
from streams.flows.labels import build_flow
from streams.flows.stats import build_stats_flow, stats_topic


def recovery_config(directory: str, process_id: int = 0, processes: int = 1) -> RecoveryConfig | None:
    """Bytewax recovery in ``directory``; None for "". A cluster of ``processes`` holds ``processes`` recovery
    partitions, each exactly once: process ``i`` adds partition ``i`` (of ``processes``) to its directory when
    the directory lacks it. So each process may have a directory of its own (a StatefulSet pod's volume: Bytewax
    routes snapshots to whichever process holds their partition), or all may share one (one host). A single
    process has partition 0 of 1 (`python -m bytewax.recovery DIR 1`). The partition count is fixed when the
    directories are first initialised: a cluster of another size needs new directories (Bytewax refuses
    partitions of different counts)."""
    if not directory:
        return None
    d = Path(directory)
    part = d / f"part-{process_id}.sqlite3"
    if not part.exists():
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".init-", dir=d) as tmp:  # every partition, keep this process's
            init_db_dir(Path(tmp), processes)
            os.replace(Path(tmp, part.name), part)  # atomic: processes sharing the directory never see half a file
    return RecoveryConfig(str(d))


_SCRATCH: list[tempfile.TemporaryDirectory] = []  # cold tiers of flows without recovery: gone at exit


def join_state_dir(recovery_dir: str) -> str:
    """Where the labels join keeps its cold tier (streams/flows/join_store.py): ``<recovery_dir>/join-state``,
    covered by the flow's recovery; without recovery, a scratch directory removed when the process exits."""
    if recovery_dir:
        return str(Path(recovery_dir) / "join-state")
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="streamrec-join-state-"))
    return _SCRATCH[0].name


def run_flow(flow: Dataflow, *, recovery_dir: str = "", workers: int = 1, epoch_s: float | None = None,
             process_id: int | None = None, addresses: list[str] | None = None) -> None:
    """Run ``flow`` until its sources end (bounded) or forever (tailing)."""
    if workers < 1:
        raise ValueError(f"{flow.flow_id}: workers must be >= 1, got {workers}")
    if addresses is not None and not (process_id is not None and 0 <= process_id < len(addresses)):
        raise ValueError(f"{flow.flow_id}: process id must be in [0, {len(addresses)}) for {len(addresses)} "
                         f"addresses, got {process_id}")
    epoch = None if epoch_s is None else timedelta(seconds=epoch_s)
    rec = recovery_config(recovery_dir, process_id or 0, len(addresses) if addresses else 1)
    if workers == 1 and addresses is None:
        from bytewax.testing import run_main

        run_main(flow, epoch_interval=epoch, recovery_config=rec)
    else:
        from bytewax.run import cli_main

        cli_main(flow, workers_per_process=workers, process_id=process_id, addresses=addresses,
                 epoch_interval=epoch, recovery_config=rec)


def run_labels(cfg: Config, *, bounded: bool, **run) -> None:
    """The labels flow on ``cfg.topics`` (recovery in ``labels.recovery_dir``); ``run``: see :func:`run_flow`."""
    if not cfg.kafka.bootstrap_servers:
        raise ValueError(NO_BROKER)
    jcfg = join.JoinConfig.from_config(cfg)  # validates policy and windows before anything starts
    jcfg = dataclasses.replace(jcfg, store_dir=join_state_dir(cfg.labels.recovery_dir))
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions, cfg.kafka.client)
    flow = build_flow(jcfg, KafkaPartitionsSource(cfg, bounded), LabelsSink(cfg), partitions=cfg.topics.partitions,
                      bounded=bounded)
    run_flow(flow, recovery_dir=cfg.labels.recovery_dir, **run)


def run_stats(cfg: Config, *, bounded: bool, recovery_dir: str = "", **run) -> None:
    """The stats flow on ``cfg.topics.examples``; ``run``: see :func:`run_flow`."""
    if not cfg.kafka.bootstrap_servers:
        raise ValueError(NO_BROKER)
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, [cfg.topics.examples, stats_topic(cfg)],
                           cfg.topics.partitions, cfg.kafka.client)
    flow = build_stats_flow(KafkaExamplesSource(cfg, bounded), FeatureStatsSink(cfg), partitions=cfg.topics.partitions,
                            report=StatsReporter(cfg))
    run_flow(flow, recovery_dir=recovery_dir, **run)


def run_distill(cfg: Config, *, bounded: bool, **run) -> None:
    """The teacher join (streams/flows/distill.py): ``topics.examples`` + ``topics.teacher_predictions`` ->
    ``topics.examples_distilled`` (recovery in ``distill.recovery_dir``); ``run``: see :func:`run_flow`."""
    if not cfg.kafka.bootstrap_servers:
        raise ValueError(NO_BROKER)
    dcfg = distill.DistillConfig.from_config(cfg)  # validates the bounds before anything starts
    t = cfg.topics
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, [t.examples, t.teacher_predictions, t.examples_distilled,
                                                         t.dead_letters, t.service_stats], t.partitions,
                           cfg.kafka.client)
    flow = distill.build_flow(dcfg, KafkaDistillSource(cfg, bounded), DistillSink(cfg), partitions=t.partitions,
                              bounded=bounded)
    run_flow(flow, recovery_dir=cfg.distill.recovery_dir, **run)
