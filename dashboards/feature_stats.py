"""Feature statistics records (:class:`streams.schema.FeatureStats`, from the stats dataflow) -> ``feature_stats`` rows.

The sink decodes the topic :func:`feature_stats_topic` with the schema (``schema.decode(raw, FeatureStats)``:
types, then :func:`streams.schema.check`); a record that fails becomes a dead letter with the reason, so this
module sees typed, checked records only. One record is one row: counts and histograms (``bins`` +
``counts``), exact moments (``mean``, ``std``, ``min``, ``max``; NULL where the record has none: count and
heavy-hitter records, or a histogram without values), ``quantiles`` at ``schema.FEATURE_QUANTILES``, heavy
hitters (``items`` + ``item_counts``) and the flow's emission time (``emitted_ts``, the dashboards' time axis).

>>> rec = schema.FeatureStats(stats_id="0:feed:dense.0:p0", window_start=0, window_end=60_000, domain="feed",
...     feature="dense.0", kind="histogram", partition=0, instance="p0", count=4, emitted_ts=61_000, mean=0.5,
...     std=0.1, min=0.3, max=0.7, bins=["-inf", "0"], edges=[0.0], counts=[0, 4], quantiles=[0.5, 0.6, 0.7])
>>> t = feature_stats_rows([rec], inserted_ms=62_000)
>>> t.num_rows, t.column("counts").to_pylist(), t.column("std").to_pylist(), t.column("items").to_pylist()
(1, [[0, 4]], [0.1], [[]])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from streams import schema
from config import Config


def feature_stats_topic(cfg: Config) -> str:
    return cfg.topics.feature_stats


def feature_stats_rows(records: list[schema.FeatureStats], inserted_ms: int) -> pa.Table:
    """One row per record, columns named as the ``feature_stats`` table's (dashboards/store.py)."""
    ts = lambda v: pa.array(np.asarray(v, dtype=np.int64), pa.timestamp("ms", tz="UTC"))  # noqa: E731
    opt = lambda name: pa.array([getattr(r, name) for r in records], pa.float64())  # noqa: E731 - None -> NULL
    u64s = lambda name: pa.array([getattr(r, name) for r in records], pa.list_(pa.uint64()))  # noqa: E731
    return pa.table({
        "window_start": ts([r.window_start for r in records]), "window_end": ts([r.window_end for r in records]),
        "emitted_ts": ts([r.emitted_ts for r in records]),
        "domain": pa.array([r.domain for r in records], pa.string()),
        "feature": pa.array([r.feature for r in records], pa.string()),
        "kind": pa.array([r.kind for r in records], pa.string()),
        "instance": pa.array([r.instance for r in records], pa.string()),
        "n": pa.array([r.count for r in records], pa.uint64()),
        "n_missing": pa.array([r.missing for r in records], pa.uint64()),
        "value": pa.array([r.value for r in records], pa.float64()),
        "mean": opt("mean"), "std": opt("std"), "min": opt("min"), "max": opt("max"),
        "quantiles": pa.array([r.quantiles for r in records], pa.list_(pa.float64())),
        "bins": pa.array([r.bins for r in records], pa.list_(pa.string())),
        "counts": u64s("counts"), "items": u64s("items"), "item_counts": u64s("item_counts"),
        "inserted_ts": ts([inserted_ms] * len(records)),
    })
