"""The ``labels`` Bytewax dataflow: impressions + clicks + conversions -> examples and dead letters.

Batch-per-partition design (one item is a batch of one partition's raw messages: per-event items cost
several microseconds each in Bytewax, README "Architecture")::

    source: SourceBatch(p, raw messages of partition number p of the three input topics, topics caught up)
      -> key_on "key": part_key(p) (streams/flows/routing.py)
      -> stateful_batch "join": join.step per partition (decode after the exchange: raw bytes only)
      -> OutBatch(encoded records, counters, pending)
      -> sink

The flow takes its source and sink as arguments: on Kafka they are the connectors of
``streams/flows/connectors.py`` (``streams/flows/service.py`` runs it so), in tests Bytewax's
``TestingSource`` and ``TestingSink``. Dead letters carry the full id of the step that refused the record,
``labels.join`` (:data:`streams.names.Step.LABELS_JOIN`).

Bounded mode: a partition finishes when its three topic-partitions reached their end; the join then emits
every pending impression (``end_of_stream``). Recovery: at-least-once; example ids are deterministic
(impression id, or ``<id>#late-click`` / ``#late-conversion``), so the trainer drops re-emitted examples.
With ``jcfg.store_dir`` set (``streams/flows/service.py``: ``<labels.recovery_dir>/join-state``), impressions
past their click window move to the join's cold tier on disk, which the snapshots cover
(``streams/flows/join_store.py``).
"""

from __future__ import annotations

import time

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from streams.flows import join
from streams.flows.join import OutBatch
from streams.flows.routing import part_key

FLOW_ID = "labels"


class _JoinLogic(StatefulBatchLogic[join.SourceBatch, OutBatch, tuple]):
    GAUGE_S = 1.0  # the state's size gauges (sampled, ~1 ms) are measured at most this often

    def __init__(self, state: join.JoinState, bounded: bool):
        self.state, self.bounded = state, bounded
        self.gauges, self.gauges_t = (0, 0, 0), -1.0

    def _emit(self, outs: list[join.Output], force: bool = False) -> tuple[list[OutBatch], bool]:
        t = time.monotonic()
        if force or t - self.gauges_t >= self.GAUGE_S:
            self.gauges, self.gauges_t = self.state.gauges(), t
        return [OutBatch(outs, dict(self.state.counts), self.state.n_pending(), self.gauges)], self.RETAIN

    def on_batch(self, values: list[join.SourceBatch]) -> tuple[list[OutBatch], bool]:
        now, outs = int(time.time() * 1000), []
        for batch in values:
            _, out = join.step(self.state, batch, now)
            outs.extend(out)
        return self._emit(outs)

    def on_eof(self) -> tuple[list[OutBatch], bool]:
        if not self.bounded:
            return [], self.RETAIN
        _, out = join.flush(self.state, int(time.time() * 1000))
        return self._emit(out, force=True)

    def snapshot(self) -> tuple:
        return self.state.snapshot()


def build_flow(jcfg: join.JoinConfig, source, sink, *, partitions: int, bounded: bool) -> Dataflow:
    """The labels dataflow: ``source`` yields :class:`~streams.flows.join.SourceBatch` items of partition
    numbers ``0..partitions-1``; ``sink`` receives ``(part_key, OutBatch)``."""
    flow = Dataflow(FLOW_ID)
    batches = op.input("input", flow, source)
    keys = [part_key(p, partitions) for p in range(partitions)]
    keyed = op.key_on("key", batches, lambda b: keys[b.partition])

    def builder(snap):
        state = join.JoinState.restore(snap, jcfg.store_dir) if snap is not None else join.JoinState(jcfg)
        return _JoinLogic(state, bounded)

    op.output("output", op.stateful_batch("join", keyed, builder), sink)
    return flow
