"""The metrics store: ClickHouse through clickhouse-connect, embedded (chDB) or a server, by URL alone.

``chdb:///abs/path`` opens the in-process engine (one path per process, locked against other processes:
only the dashboard process opens it); ``http(s)://user:pass@host:8123`` a server (credentials from the URL,
or ``CLICKHOUSE_USER`` / ``CLICKHOUSE_PASSWORD`` in the environment). The DDL is idempotent and every table
is a ReplacingMergeTree keyed by the row's identity, so the sink's at-least-once writes are harmless when
queries read with ``FINAL``.

A server can be away (refused, timed out, answering 5xx): a call then raises :class:`StoreUnavailable`, the
store reports itself down (:meth:`Store.status`) and, until its next retry time (0.5 s, doubling to 30 s),
refuses further calls at once instead of queueing every page query behind a dead connection. The first call
after that time tries again; one that succeeds clears it. ``Store.open(url, db, retry=True)`` returns a store
not yet connected when the server cannot be reached at start: each call tries to connect (and create the
schema) under the same rule.

>>> sorted(TABLES)
['dead_letters', 'feature_stats', 'prediction_rollup', 'predictions', 'service_stats', 'sink_offsets']

``prediction_rollup`` is the hot aggregate: per 10 s slot of training time, objective and domain, the counts
and sums behind calibration / NE and a logit-bucketed score histogram (positives and negatives) behind AUC and
prediction drift. It is not an incremental materialized view, because an MV adds every re-delivered insert
again; the sink recomputes the slots it touched from ``predictions FINAL`` (:data:`queries.ROLLUP_REFRESH`)
and the newest computation replaces the older (ReplacingMergeTree on ``computed_ts``), so it stays exact and
idempotent. (On ClickHouse 24+ a refreshable materialized view could run the same SELECT.)

A ClickHouse cluster (``metrics.cluster``, the name of a cluster in the servers' ``remote_servers``; "" = one
node, the default): each table becomes a local ``<table>_local`` on every node, in the replicated form of its
engine (``ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/<db>/<table>_local', '{replica}', ...)``,
the ``{shard}`` / ``{replica}`` macros from each server's config), and a ``Distributed`` table under the name
the queries use today, all created ``ON CLUSTER`` (:func:`schema_statements`). Rows are sharded by a hash of the
table's sorting key (its ReplacingMergeTree identity), so every copy of a row lands on the same shard and
``FINAL`` (applied by each shard) still keeps one. The cluster must replicate inside a shard through the
replicated tables (``<internal_replication>true</internal_replication>``), which needs ClickHouse Keeper.
Inserts wait until every shard has its rows (``insert_distributed_sync``: the rollup refresh that follows a
write reads them), and queries run with ``distributed_product_mode = 'global'`` so a subquery over another
Distributed table in a JOIN or ``IN`` reads the whole cluster once; Grafana's user needs the same setting in
its profile. Cluster tables are never rebuilt in place: a schema change is reported with what to do.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
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
    # one row per (arm, example, objective): a re-inserted example replaces its row (version = inserted_ts); arms
    # scoring the same example keep a row each. arm: the arm of the model that scored it (its trainer's
    # trainer.arm); served_arm / served_version: the arm and published version that served the impression
    # ('' / 0: logged traffic, not served by streamrec)
    "predictions": """
CREATE TABLE IF NOT EXISTS {db}.predictions (
    arm LowCardinality(String),
    example_id String,
    objective LowCardinality(String),
    domain LowCardinality(String),
    model_version UInt64,
    served_arm LowCardinality(String),
    served_version UInt64,
    cohort LowCardinality(String),
    score Float32,
    label UInt8,
    event_ts DateTime64(3, 'UTC'),
    emitted_ts DateTime64(3, 'UTC'),
    trained_ts DateTime64(3, 'UTC'),
    inserted_ts DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(inserted_ts)
ORDER BY (arm, objective, domain, example_id)
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
    # before arms every prediction came from the one trainer there was: the default arm's (TrainerConfig.arm);
    # served_arm / served_version take their defaults ('' / 0: logged traffic)
    "predictions": {"arm": "'main'"},
}


def sorting_key(ddl: str) -> list[str]:
    """The columns of a :data:`TABLES` statement's ``ORDER BY``: a row's identity, and its shard's in a cluster.

    >>> sorting_key(TABLES["sink_offsets"])
    ['topic', 'partition']
    """
    return [c.strip() for c in re.search(r"ORDER BY \((.*?)\)", ddl).group(1).split(",")]


def schema_statements(database: str, cluster: str = "", *, replicated: bool = True) -> list[tuple[str, str]]:
    """``(table, statement)`` in order, creating ``database`` and every table of :data:`TABLES` (table "" for the
    database itself). One node (``cluster`` ""): the statements of :data:`TABLES`. A cluster: per table a
    ``<table>_local`` in the replicated form of its engine and a ``Distributed`` table under the table's own
    name, sharded by ``cityHash64`` of its sorting key, each ``ON CLUSTER`` (see the module docstring).
    ``replicated=False`` keeps the plain engines and leaves out ``ON CLUSTER``: shards without replicas on
    nodes without Keeper, where the statements are run on every node (and chDB in the tests: it has neither
    Keeper nor a distributed DDL queue).

    >>> [t for t, _ in schema_statements("db", "c")][:3]
    ['', 'predictions_local', 'predictions']
    >>> print(schema_statements("db", "c")[-1][1])
    CREATE TABLE IF NOT EXISTS db.sink_offsets ON CLUSTER c AS db.sink_offsets_local
    ENGINE = Distributed(c, db, sink_offsets_local, cityHash64(topic, partition))
    """
    if not database.isidentifier():
        raise StoreError(f"metrics.database {database!r}: must be a plain identifier")
    if not cluster:
        return [("", f"CREATE DATABASE IF NOT EXISTS {database}")] + [
            (name, ddl.format(db=database, ttl=TTL_DAYS)) for name, ddl in TABLES.items()]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", cluster):
        raise StoreError(f"metrics.cluster {cluster!r}: must be a cluster name of the servers' remote_servers")
    quoted = f"`{cluster}`" if "-" in cluster else cluster
    on = f" ON CLUSTER {quoted}" if replicated else ""
    out = [("", f"CREATE DATABASE IF NOT EXISTS {database}{on}")]
    for name, ddl in TABLES.items():
        local = f"{name}_local"
        text = ddl.format(db=database, ttl=TTL_DAYS).replace(
            f"CREATE TABLE IF NOT EXISTS {database}.{name} (", f"CREATE TABLE IF NOT EXISTS {database}.{local}{on} (")
        if replicated:
            def engine(m: re.Match) -> str:
                args = [f"'/clickhouse/tables/{{shard}}/{database}/{local}'", "'{replica}'"] + (
                    [m.group(2)] if m.group(2) else [])
                return f"ENGINE = Replicated{m.group(1)}MergeTree({', '.join(args)})"
            text = re.sub(r"ENGINE = (\w*)MergeTree(?:\((.*?)\))?(?=\n)", engine, text)
        keys = [k for k in sorting_key(ddl) if " MATERIALIZED " not in f" {ddl_columns(ddl)[k]} "]
        out += [(local, text), (name, f"CREATE TABLE IF NOT EXISTS {database}.{name}{on} AS {database}.{local}\n"
                                      f"ENGINE = Distributed({quoted}, {database}, {local}, cityHash64({', '.join(keys)}))")]
    return out


def ddl_columns(ddl: str) -> dict[str, str]:
    """Column name -> type (with a ``MATERIALIZED`` clause, if any) of a ``CREATE TABLE`` statement of :data:`TABLES`.

    >>> ddl_columns(TABLES["sink_offsets"])
    {'topic': 'String', 'partition': 'Int32', 'next_offset': 'Int64'}
    """
    body = ddl[ddl.index("(") + 1:ddl.index("\n) ENGINE")]
    return dict(re.fullmatch(r"\s*(\w+) (.+?),?", line).groups() for line in body.strip().splitlines())


class StoreError(RuntimeError):
    """The metrics store refused a URL, a statement or a query."""


class StoreUnavailable(StoreError):
    """The metrics store did not answer (connection refused or lost, timeout, HTTP 5xx): retry later."""


RETRY_S = (0.5, 30.0)  # while the store is down: first retry interval, doubling up to the second


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` means the store could not be reached, as opposed to a statement it refused:
    clickhouse-connect raises ``OperationalError`` for network errors and for 5xx answers it gave up retrying.

    >>> from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
    >>> unreachable(OperationalError("HTTP 503")), unreachable(DatabaseError("Code: 62. Syntax error"))
    (True, False)
    """
    from clickhouse_connect.driver.exceptions import OperationalError

    return isinstance(e, (OperationalError, ConnectionError, TimeoutError, StoreUnavailable))


def _where(url: str) -> str:
    """A URL without its credentials, for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}" if url else ""


def open_client(url: str):
    """A clickhouse-connect client for ``chdb:///abs/path`` (directory created) or an ``http(s)://`` URL.
    A chDB URL's query goes to the engine as its options, e.g. ``chdb:///abs/path?config-file=/abs/config.xml``
    (a server-style config: ``remote_servers``, ``macros``; how the tests give chDB a cluster)."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        if parts.netloc or not parts.path.startswith("/"):
            raise StoreError(f"metrics.clickhouse_url {url!r}: expected chdb:///absolute/path (three slashes)")
        Path(parts.path).mkdir(parents=True, exist_ok=True)
        if parts.query:  # clickhouse-connect's DSN parser would keep only the options it knows
            return clickhouse_connect.get_client(interface="chdb", path=f"{parts.path}?{parts.query}")
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
    thread-safe). ``database`` is created with every table on :meth:`ensure_schema`. ``client`` may be None
    with a ``url``: the first call connects (see the module docstring)."""

    def __init__(self, client, database: str, url: str = "", *, cluster: str = "", replicated: bool = True):
        if not database.isidentifier():
            raise StoreError(f"metrics.database {database!r}: must be a plain identifier")
        if client is None and not url:
            raise StoreError("Store: give a client or a URL to connect to")
        schema_statements(database, cluster)  # validates the cluster name before anything connects
        self.client, self.db, self.url = client, database, url
        self.cluster, self.replicated = cluster, replicated
        # a cluster: inserts reach every shard before they return; subqueries over Distributed tables read once
        self.insert_settings = {"insert_distributed_sync": 1} if cluster else {}
        self.query_settings = {"distributed_product_mode": "global"} if cluster else {}
        self.lock = threading.Lock()
        self._needs_schema = client is None  # a store that connects by itself creates its schema first
        self._error, self._down_since, self._retry_at, self._retry_s = "", None, 0.0, RETRY_S[0]

    @classmethod
    def open(cls, url: str, database: str, *, retry: bool = False, cluster: str = "",
             replicated: bool = True) -> "Store":
        """Connect to ``url`` and create the schema (on ``cluster``, if given: see the module docstring).
        ``retry``: a server that cannot be reached now is not an error: the store comes back unconnected,
        reports itself down and connects on a later call."""
        store = cls(None, database, url, cluster=cluster, replicated=replicated)
        try:
            store.ensure_schema()
        except StoreUnavailable as e:
            if not retry:
                raise
            log.warning("%s; serving and retrying meanwhile", e)
        return store

    def ensure_schema(self) -> None:
        self._needs_schema = True
        self._call(lambda client: None)  # _call creates it first

    def _create_schema(self, client) -> None:
        for table in TABLES:  # before creating anything: tables of the other mode, a cluster's older tables
            self._check_engine(table)
            if self.cluster:
                self._check_local(table)  # compared, never rebuilt
        for table, statement in schema_statements(self.db, self.cluster, replicated=self.replicated):
            if table in TABLES and not self.cluster:
                self._migrate(table, TABLES[table])
            client.command(statement)

    def _engine(self, table: str) -> str | None:
        rows = self.client.query("SELECT engine FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                                 parameters={"d": self.db, "t": table}).result_rows
        return rows[0][0] if rows else None

    def _check_engine(self, table: str) -> None:
        """A table created for the other mode (one node / a cluster) is an error that says what to do."""
        engine = self._engine(table)
        if engine is None or (engine == "Distributed") == bool(self.cluster):
            return
        if self.cluster:
            raise StoreError(f"metrics.cluster is {self.cluster!r} but {self.db}.{table} is a {engine} table of a "
                             f"single node: move its rows to the cluster (INSERT INTO the new Distributed table "
                             f"SELECT FROM it) under another database, or drop it")
        raise StoreError(f"{self.db}.{table} is a Distributed table (a ClickHouse cluster's) but metrics.cluster "
                         f"is empty: set metrics.cluster to the cluster's name")

    def _check_local(self, table: str) -> None:
        """A cluster's ``<table>_local`` with another sorting key or other columns than this version's."""
        local, ddl = f"{table}_local", TABLES[table]
        have = self.client.query("SELECT sorting_key FROM system.tables WHERE database = {d:String} AND "
                                 "name = {t:String}", parameters={"d": self.db, "t": local}).result_rows
        if not have:
            return
        cols = dict(self.client.query("SELECT name, type FROM system.columns WHERE database = {d:String} AND "
                                      "table = {t:String}", parameters={"d": self.db, "t": local}).result_rows)
        want = {n: t.split(" MATERIALIZED ")[0] for n, t in ddl_columns(ddl).items()}
        if have[0][0] == ", ".join(sorting_key(ddl)) and cols == want:
            return
        raise StoreError(f"{self.db}.{local} on cluster {self.cluster!r} has sorting key {have[0][0]!r} and columns "
                         f"{sorted(cols)}, this version wants {', '.join(sorting_key(ddl))!r} and {sorted(want)}: "
                         f"cluster tables are not rebuilt automatically; ALTER them ON CLUSTER (new columns: "
                         f"ALTER TABLE ... ADD COLUMN on {local} and {table}) or recreate them")

    # ---- every call goes through _call: connect when needed, notice a store that went away ----------------
    def _call(self, fn):
        """``fn(client)`` under the lock; an unreachable store raises :class:`StoreUnavailable` and is marked down."""
        with self.lock:
            now = time.monotonic()
            if self._down_since is not None and now < self._retry_at:
                raise StoreUnavailable(self._down_message(now))
            try:
                if self.client is None:
                    self.client = open_client(self.url)
                if self._needs_schema:
                    self._create_schema(self.client)
                    self._needs_schema = False
                out = fn(self.client)
            except Exception as e:
                if not unreachable(e):
                    raise
                self._mark_down(e, now)
                raise StoreUnavailable(self._down_message(now)) from e
            if self._down_since is not None:
                log.warning("metrics store %s reachable again after %.0fs", _where(self.url), now - self._down_since)
            self._error, self._down_since, self._retry_s = "", None, RETRY_S[0]
            return out

    def _mark_down(self, e: BaseException, now: float) -> None:
        self._error = " ".join(str(e).split())[:300] or type(e).__name__
        if self._down_since is None:
            self._down_since, self._retry_s = now, RETRY_S[0]
        else:
            self._retry_s = min(self._retry_s * 2, RETRY_S[1])
        self._retry_at = now + self._retry_s

    def _down_message(self, now: float) -> str:
        where = f" {_where(self.url)}" if self.url else ""
        return (f"metrics store{where} unreachable for {now - self._down_since:.0f}s: {self._error} "
                f"(next try in {max(self._retry_at - now, 0):.1f}s)")

    def status(self) -> dict:
        """``{"ok", "error", "down_s", "retry_in_s"}``: down since a call found the store unreachable, until
        one succeeds (a store nobody calls keeps its last verdict)."""
        now = time.monotonic()
        if self._down_since is None:
            return {"ok": True, "error": "", "down_s": 0.0, "retry_in_s": 0.0}
        return {"ok": False, "error": self._error, "down_s": round(now - self._down_since, 1),
                "retry_in_s": round(max(self._retry_at - now, 0.0), 1)}

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
        self._call(lambda c: c.insert_arrow(f"{self.db}.{table}", data, settings=self.insert_settings))
        return data.num_rows

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> QueryResult:
        """Run ``sql`` (``{db}`` replaced by the database; ``{name:Type}`` bound from ``parameters``)."""
        sql = sql.replace("{db}", self.db)
        res = self._call(lambda c: c.query(sql, parameters=dict(parameters or {}),
                                           settings=self.query_settings))
        rows = [tuple(_clean(v) for v in r) for r in res.result_rows]
        return QueryResult(list(res.column_names), rows)

    def refresh_rollup(self, from_ms: int, to_ms: int) -> None:
        """Recompute ``prediction_rollup`` for the slots overlapping ``[from_ms, to_ms]`` (training time)."""
        from dashboards.queries import ROLLUP_REFRESH, ROLLUP_SLOT_S

        lo = from_ms // 1000 // ROLLUP_SLOT_S * ROLLUP_SLOT_S
        hi = to_ms // 1000 // ROLLUP_SLOT_S * ROLLUP_SLOT_S + ROLLUP_SLOT_S
        self._call(lambda c: c.command(ROLLUP_REFRESH.replace("{db}", self.db), parameters={"lo": lo, "hi": hi},
                                       settings={**self.insert_settings, **self.query_settings}))

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
            if self.client is not None:
                self.client.close()
