"""Feature statistics records from the stats dataflow -> ``feature_stats`` rows, decoded tolerantly.

The stats dataflow (``streams/flows/stats.py``) publishes one JSON record per window and domain to the topic
:func:`feature_stats_topic`. Accepted shape (unknown fields are ignored; ``type`` may be absent)::

    {"type": "feature_stats", "window_start": 1700000000000, "window_end": 1700000060000,
     "domain": "feed", "instance": "stats-0",
     "features": [{"name": "dense_0", "count": 1200, "missing": 3, "mean": 0.41, "std": 1.1,
                   "min": -2.0, "max": 5.0, "bins": ["-1", "0", "1"], "counts": [300, 600, 300]}, ...]}

``features`` may also be a mapping ``name -> stats``; a record may instead carry one feature at the top level
(``"feature": "dense_0"`` plus the stats). A histogram is ``bins`` (labels, or numbers such as lower edges)
with ``counts``, or ``edges`` (k + 1 numbers) with ``counts`` (k), or ``histogram`` (a mapping bin -> count).
Bins must stay the same for a feature across windows (fixed edges or category ids): PSI compares shares bin by
bin. Timestamps are ms; ``ts`` stands for ``window_end`` when that is missing.

>>> rows, problem = feature_stats_rows([b'{"window_start": 0, "window_end": 1000, "domain": "feed",'
...     b' "features": {"x": {"count": 4, "bins": [0, 1], "counts": [1, 3]}}}'], inserted_ms=5)
>>> problem, rows.num_rows, rows.column("bins").to_pylist()
([], 1, [['0', '1']])
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from streams import schema
from config import Config

MAX_BINS = 512


def feature_stats_topic(cfg: Config) -> str:
    return cfg.topics.feature_stats


def _label(b: Any) -> str:
    if isinstance(b, float):
        return f"{b:.6g}"
    return str(b)


def _num(d: dict, key: str, default: float = math.nan) -> float:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key}: expected a number, got {type(v).__name__}")
    return float(v)


def _histogram(f: dict) -> tuple[list[str], list[float]]:
    counts = f.get("counts")
    if isinstance(f.get("histogram"), dict):
        bins, counts = list(f["histogram"]), list(f["histogram"].values())
    elif "bins" in f and counts is not None:
        bins = f["bins"]
    elif "edges" in f and counts is not None:
        bins = f["edges"][: len(counts)]
    else:
        return [], []
    if not isinstance(bins, list) or not isinstance(counts, list) or len(bins) != len(counts):
        raise ValueError(f"histogram: bins and counts must be lists of equal length, got {len(bins)} and "
                         f"{len(counts) if isinstance(counts, list) else type(counts).__name__}")
    if len(bins) > MAX_BINS:
        raise ValueError(f"histogram: {len(bins)} bins, at most {MAX_BINS}")
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError("histogram: counts must be non-negative numbers")
    return [_label(b) for b in bins], [float(c) for c in counts]


def _features(rec: dict) -> list[dict]:
    feats = rec.get("features")
    if isinstance(feats, dict):
        return [{**v, "name": k} for k, v in feats.items() if isinstance(v, dict)]
    if isinstance(feats, list):
        return [f for f in feats if isinstance(f, dict)]
    if "feature" in rec or "name" in rec:
        return [{**rec, "name": rec.get("feature", rec.get("name"))}]
    raise ValueError("no features: expected 'features' (list or mapping) or a top-level 'feature'")


def parse_record(raw: bytes) -> list[tuple]:
    """One record -> row tuples ``(window_start, window_end, domain, feature, instance, n, n_missing, mean, std,
    min, max, bins, counts)``; raises ``ValueError`` naming the problem."""
    try:
        rec = msgspec.json.decode(raw)
    except schema.DECODE_ERRORS as e:
        raise ValueError(schema.unparseable(e)) from None
    if not isinstance(rec, dict):
        raise ValueError(f"schema: expected a JSON object, got {type(rec).__name__}")
    if rec.get("type", "feature_stats") != "feature_stats":
        raise ValueError(f"schema: type {rec.get('type')!r}, expected 'feature_stats'")
    end = _num(rec, "window_end", _num(rec, "ts", math.nan))
    start = _num(rec, "window_start", end)
    if not (math.isfinite(start) and math.isfinite(end)) or start > end or end <= 0:
        raise ValueError(f"schema: window_start/window_end must be ms timestamps, start <= end (got {start}, {end})")
    domain, instance = str(rec.get("domain", "")), str(rec.get("instance", ""))
    rows = []
    for f in _features(rec):
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("schema: every feature needs a non-empty string 'name'")
        bins, counts = _histogram(f)
        n = _num(f, "count", sum(counts))
        rows.append((int(start), int(end), domain, name, instance, n, _num(f, "missing", 0.0), _num(f, "mean"),
                     _num(f, "std"), _num(f, "min"), _num(f, "max"), bins, counts))
    return rows


def feature_stats_rows(raws: list[bytes], inserted_ms: int) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Rows of every good record, and ``(index, reason)`` of the bad ones (for dead letters)."""
    rows, problems = [], []
    for i, raw in enumerate(raws):
        try:
            rows += parse_record(raw)
        except (ValueError, TypeError, KeyError) as e:
            problems.append((i, f"feature_stats: {e}"))
    cols = list(zip(*rows)) if rows else [()] * 13
    ts = lambda v: pa.array(np.asarray(v, dtype=np.int64), pa.timestamp("ms", tz="UTC"))  # noqa: E731
    f64 = lambda v: pa.array(v, pa.float64())  # noqa: E731
    return pa.table({
        "window_start": ts(cols[0]), "window_end": ts(cols[1]), "domain": pa.array(cols[2], pa.string()),
        "feature": pa.array(cols[3], pa.string()), "instance": pa.array(cols[4], pa.string()),
        "n": f64(cols[5]), "n_missing": f64(cols[6]), "mean": f64(cols[7]), "std": f64(cols[8]),
        "min": f64(cols[9]), "max": f64(cols[10]), "bins": pa.array(cols[11], pa.list_(pa.string())),
        "counts": pa.array(cols[12], pa.list_(pa.float64())),
        "inserted_ts": ts([inserted_ms] * len(rows)),
    }), problems
