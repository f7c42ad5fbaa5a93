"""The metrics store: ClickHouse through clickhouse-connect, embedded (chDB) or a server, by URL alone.

``chdb:///abs/path`` opens the in-process engine (one path per process, locked against other processes:
only the dashboard process opens it); ``http(s)://user:pass@host:8123`` a server (credentials from the URL,
or ``CLICKHOUSE_USER`` / ``CLICKHOUSE_PASSWORD`` in the environment). The DDL is idempotent and every table
is a ReplacingMergeTree keyed by the row's identity, so the sink's at-least-once writes are harmless when
queries read with ``FINAL``.

>>> sorted(TABLES)
['dead_letters', 'feature_stats', 'prediction_rollup', 'predictions', 'service_stats', 'sink_offsets']

``prediction_rollup`` is the hot aggregate: per 10 s slot of training time, objective and domain, the counts
and sums behind calibration / NE and a logit-bucketed score histogram (positives and negatives) behind AUC and
prediction drift. It is not an incremental materialized view, because an MV adds every re-delivered insert
again; the sink recomputes the slots it touched from ``predictions FINAL`` (:data:`queries.ROLLUP_REFRESH`)
and the newest computation replaces the older (ReplacingMergeTree on ``computed_ts``), so it stays exact and
idempotent. (On ClickHouse 24+ a refreshable materialized view could run the same SELECT.)
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import clickhouse_connect
import pyarrow as pa

log = logging.getLogger(__name__)

TTL_DAYS = 30  # predictions / stats / dead letters older than this are dropped by ClickHouse

# {db} is replaced by the configured database. Valid on ClickHouse server 23+ and chDB 4.
TABLES: dict[str, str] = {
    # one row per (example, objective): a re-inserted example replaces its row (version = inserted_ts)
    "predictions": """
CREATE TABLE IF NOT EXISTS {db}.predictions (
    example_id String,
    objective LowCardinality(String),
    domain LowCardinality(String),
    model_version UInt64,
    score Float32,
    label UInt8,
    event_ts DateTime64(3, 'UTC'),
    emitted_ts DateTime64(3, 'UTC'),
    trained_ts DateTime64(3, 'UTC'),
    inserted_ts DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(inserted_ts)
ORDER BY (objective, domain, example_id)
TTL toDateTime(trained_ts) + INTERVAL {ttl} DAY""",
    "service_stats": """
CREATE TABLE IF NOT EXISTS {db}.service_stats (
    component LowCardinality(String),
    instance String,
    ts DateTime64(3, 'UTC'),
    name LowCardinality(String),
    value Float64
) ENGINE = ReplacingMergeTree
ORDER BY (component, name, instance, ts)
TTL toDateTime(ts) + INTERVAL {ttl} DAY""",
    # a dead letter's identity is where it came from, the step that rejected it and its bytes: the same record
    # rejected again after a restart (a new wall-clock ts, a reason naming another partition time) replaces
    # its row. Bad lines of a replayed file carry the file name as topic and the line number as offset.
    "dead_letters": """
CREATE TABLE IF NOT EXISTS {db}.dead_letters (
    ts DateTime64(3, 'UTC'),
    topic LowCardinality(String),
    partition Int32,
    offset Int64,
    step LowCardinality(String),
    reason String,
    raw_prefix String,
    raw_hash UInt64 MATERIALIZED cityHash64(raw_prefix)
) ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, offset, step, raw_hash)
TTL toDateTime(ts) + INTERVAL {ttl} DAY""",
    # the pre-aggregate behind the hot panels; see the module docstring and queries.ROLLUP_REFRESH
    "prediction_rollup": """
CREATE TABLE IF NOT EXISTS {db}.prediction_rollup (
    slot DateTime('UTC'),
    objective LowCardinality(String),
    domain LowCardinality(String),
    n UInt64,
    positives UInt64,
    sum_score Float64,
    sum_logloss Float64,
    buckets Array(UInt16),
    pos Array(UInt64),
    neg Array(UInt64),
    computed_ts DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(computed_ts)
ORDER BY (objective, domain, slot)
TTL slot + INTERVAL {ttl} DAY""",
    # one row per schema.FeatureStats record of the stats dataflow: (feature, domain, window, instance); bins are
    # labels that stay the same for a feature across windows (fixed edges), so PSI compares like with like.
    # emitted_ts (wall clock when the flow closed the window) is the time axis of the panels and of the TTL:
    # a replayed log's event-time windows may be years old
    "feature_stats": """
CREATE TABLE IF NOT EXISTS {db}.feature_stats (
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    emitted_ts DateTime64(3, 'UTC'),
    domain LowCardinality(String),
    feature LowCardinality(String),
    kind LowCardinality(String),
    instance String,
    n UInt64,
    n_missing UInt64,
    value Float64,
    mean Nullable(Float64),
    std Nullable(Float64),
    min Nullable(Float64),
    max Nullable(Float64),
    quantiles Array(Float64),
    bins Array(String),
    counts Array(UInt64),
    items Array(UInt64),
    item_counts Array(UInt64),
    inserted_ts DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(inserted_ts)
ORDER BY (feature, domain, window_start, window_end, instance)
TTL toDateTime(emitted_ts) + INTERVAL {ttl} DAY""",
    # the sink's own resume point; the largest next_offset wins
    "sink_offsets": """
CREATE TABLE IF NOT EXISTS {db}.sink_offsets (
    topic String,
    partition Int32,
    next_offset Int64
) ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (topic, partition)""",
}


# columns a rebuilt table gains, computed from an older table's rows (other new columns take their defaults)
MIGRATION_FILL: dict[str, dict[str, str]] = {
    # before emitted_ts existed the rows were read by window_end; when the sink stored them is the nearest
    # wall-clock time; the tolerant parser's rows were histograms when they had bins
    "feature_stats": {"emitted_ts": "inserted_ts", "kind": "if(empty(bins), 'count', 'histogram')"},
}


def ddl_columns(ddl: str) -> dict[str, str]:
    """Column name -> type (with a ``MATERIALIZED`` clause, if any) of a ``CREATE TABLE`` statement of :data:`TABLES`.

    >>> ddl_columns(TABLES["sink_offsets"])
    {'topic': 'String', 'partition': 'Int32', 'next_offset': 'Int64'}
    """
    body = ddl[ddl.index("(") + 1:ddl.index("\n) ENGINE")]
    return dict(re.fullmatch(r"\s*(\w+) (.+?),?", line).groups() for line in body.strip().splitlines())


class StoreError(RuntimeError):
    """The metrics store refused a URL, a statement or a query."""


def open_client(url: str):
    """A clickhouse-connect client for ``chdb:///abs/path`` (directory created) or an ``http(s)://`` URL."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        if parts.netloc or not parts.path.startswith("/"):
            raise StoreError(f"metrics.clickhouse_url {url!r}: expected chdb:///absolute/path (three slashes)")
        Path(parts.path).mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=url)
    if parts.scheme in ("http", "https"):
        kw: dict[str, Any] = {}
        if not parts.username and os.environ.get("CLICKHOUSE_USER"):
            kw["username"] = os.environ["CLICKHOUSE_USER"]
        if not parts.password and os.environ.get("CLICKHOUSE_PASSWORD"):
            kw["password"] = os.environ["CLICKHOUSE_PASSWORD"]
        return clickhouse_connect.get_client(dsn=url, **kw)
    raise StoreError(f"metrics.clickhouse_url {url!r}: scheme must be chdb, http or https, got {parts.scheme!r}")


@dataclass
class QueryResult:
    """Column names and rows (tuples) of one query; NaN / inf become ``None`` so results are valid JSON."""

    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r)) for r in self.rows]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Store:
    """A client plus a lock: the sink thread writes while the web server reads (chDB clients are not
    thread-safe). ``database`` is created with every table on :meth:`ensure_schema`."""

    def __init__(self, client, database: str):
        if not database.isidentifier():
            raise StoreError(f"metrics.database {database!r}: must be a plain identifier")
        self.client, self.db = client, database
        self.lock = threading.Lock()

    @classmethod
    def open(cls, url: str, database: str) -> "Store":
        store = cls(open_client(url), database)
        store.ensure_schema()
        return store

    def ensure_schema(self) -> None:
        with self.lock:
            self.client.command(f"CREATE DATABASE IF NOT EXISTS {self.db}")
            for name, ddl in TABLES.items():
                self._migrate(name, ddl)
                self.client.command(ddl.format(db=self.db, ttl=TTL_DAYS))

    def _migrate(self, table: str, ddl: str) -> bool:
        """Rebuild ``table`` when an older version of streamrec created it with another sorting key (the
        ReplacingMergeTree's identity) or other columns: rename it, create the new one, copy the rows over
        (columns both have, converted; new ones from :data:`MIGRATION_FILL` or their defaults), drop the old.
        Returns whether it rebuilt."""
        want_key = re.search(r"ORDER BY \((.*?)\)", ddl).group(1)
        want_cols = ddl_columns(ddl)
        want_types = {n: t.split(" MATERIALIZED ")[0] for n, t in want_cols.items()}
        res = self.client.query("SELECT sorting_key FROM system.tables WHERE database = {d:String} AND "
                                "name = {t:String}", parameters={"d": self.db, "t": table})
        if not res.result_rows:
            return False
        have_key = res.result_rows[0][0]
        have_cols = {n: (t, k) for n, t, k in self.client.query(
            "SELECT name, type, default_kind FROM system.columns WHERE database = {d:String} AND table = {t:String}",
            parameters={"d": self.db, "t": table}).result_rows}
        if have_key == want_key and {n: t for n, (t, _) in have_cols.items()} == want_types:
            return False
        log.warning("store: rebuilding %s.%s (sorting key %s -> %s; columns %s -> %s)", self.db, table, have_key,
                    want_key, sorted(have_cols), sorted(want_cols))
        old = f"{self.db}.{table}_before_migration"
        self.client.command(f"DROP TABLE IF EXISTS {old}")
        self.client.command(f"RENAME TABLE {self.db}.{table} TO {old}")
        self.client.command(ddl.format(db=self.db, ttl=TTL_DAYS))
        fill = MIGRATION_FILL.get(table, {})
        cols, exprs = [], []
        for name, typ in want_cols.items():
            if " MATERIALIZED " in f" {typ} ":
                continue
            if name in have_cols and have_cols[name][1] != "MATERIALIZED":
                was = have_cols[name][0]
                nan_to_null = typ.startswith("Nullable(Float") and not was.startswith("Nullable")
                cols.append(name)
                exprs.append(f"if(isNaN({name}), NULL, {name})" if nan_to_null else name)
            elif name in fill:
                cols.append(name)
                exprs.append(fill[name])
        self.client.command(f"INSERT INTO {self.db}.{table} ({', '.join(cols)}) SELECT {', '.join(exprs)} FROM {old}")
        self.client.command(f"DROP TABLE {old}")
        return True

    def insert(self, table: str, data: pa.Table) -> int:
        """Columnar insert (``insert_arrow``) of ``data`` whose column names match the table's."""
        if table not in TABLES:
            raise StoreError(f"insert: unknown table {table!r} (known: {', '.join(TABLES)})")
        if data.num_rows == 0:
            return 0
        with self.lock:
            self.client.insert_arrow(f"{self.db}.{table}", data)
        return data.num_rows

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> QueryResult:
        """Run ``sql`` (``{db}`` replaced by the database; ``{name:Type}`` bound from ``parameters``)."""
        sql = sql.replace("{db}", self.db)
        with self.lock:
            res = self.client.query(sql, parameters=dict(parameters or {}))
        rows = [tuple(_clean(v) for v in r) for r in res.result_rows]
        return QueryResult(list(res.column_names), rows)

    def refresh_rollup(self, from_ms: int, to_ms: int) -> None:
        """Recompute ``prediction_rollup`` for the slots overlapping ``[from_ms, to_ms]`` (training time)."""
        from dashboards.queries import ROLLUP_REFRESH, ROLLUP_SLOT_S

        lo = from_ms // 1000 // ROLLUP_SLOT_S * ROLLUP_SLOT_S
        hi = to_ms // 1000 // ROLLUP_SLOT_S * ROLLUP_SLOT_S + ROLLUP_SLOT_S
        with self.lock:
            self.client.command(ROLLUP_REFRESH.replace("{db}", self.db),
                                parameters={"lo": lo, "hi": hi})

    def sink_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> next offset to read, as last recorded by the sink."""
        res = self.query("SELECT topic, partition, max(next_offset) FROM {db}.sink_offsets GROUP BY topic, partition")
        return {(t, int(p)): int(o) for t, p, o in res.rows}

    def record_offsets(self, offsets: Mapping[tuple[str, int], int]) -> None:
        if not offsets:
            return
        keys = list(offsets)
        self.insert("sink_offsets", pa.table({
            "topic": pa.array([t for t, _ in keys], pa.string()),
            "partition": pa.array([p for _, p in keys], pa.int32()),
            "next_offset": pa.array([offsets[k] for k in keys], pa.int64())}))

    def close(self) -> None:
        with self.lock:
            self.client.close()
