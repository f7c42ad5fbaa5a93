"""The metrics store on a ClickHouse cluster (``metrics.cluster``): the DDL of both modes, and the dashboards'
queries reading Distributed tables under the names they use on one node.

chDB runs the Distributed tables when given a server-style config with a cluster (``remote_servers``, one
local shard here): the whole store (schema, inserts, the rollup refresh, every panel query) runs on them and
must answer what a single-node database with the same rows answers. What chDB cannot run is skipped with its
reason: the replicated engines need ClickHouse Keeper and ``ON CLUSTER`` a distributed DDL queue, which only a
server has; their statements are checked as text.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from dashboards import queries as q
from dashboards.definitions import DASHBOARDS
from dashboards.sink import dead_letter_rows, prediction_rows, stats_rows
from dashboards.store import TABLES, Store, StoreError, open_client, schema_statements, sorting_key
from streams import schema
from tests.test_store import panel_feature_stats, panel_stats, random_batches

CLUSTER = "streamrec"
CONFIG = f"""<clickhouse>
  <tcp_port>9000</tcp_port>
  <remote_servers><{CLUSTER}><shard><internal_replication>true</internal_replication>
    <replica><host>localhost</host><port>9000</port></replica>
  </shard></{CLUSTER}></remote_servers>
  <macros><shard>01</shard><replica>r1</replica></macros>
</clickhouse>
"""


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """chDB with a one-shard cluster named ``streamrec`` (this module's own engine: chDB opens one per process)."""
    d = tmp_path_factory.mktemp("chdb-cluster")
    (d / "config.xml").write_text(CONFIG)
    c = open_client(f"chdb://{d.resolve()}/engine?config-file={d.resolve()}/config.xml")
    yield c
    c.close()


def test_one_node_ddl_is_the_tables_as_they_were():
    stmts = schema_statements("db")
    assert stmts[0] == ("", "CREATE DATABASE IF NOT EXISTS db")
    assert dict(stmts[1:]) == {name: ddl.format(db="db", ttl=30) for name, ddl in TABLES.items()}
    assert not any("ON CLUSTER" in s or "Replicated" in s or "Distributed" in s for _, s in stmts)


def test_cluster_ddl_replicates_every_table_and_distributes_it_by_its_identity():
    one = dict(schema_statements("db"))
    stmts = schema_statements("db", "prod")
    assert stmts[0] == ("", "CREATE DATABASE IF NOT EXISTS db ON CLUSTER prod")
    made = dict(stmts)
    assert [t for t, _ in stmts[1:]] == [x for name in TABLES for x in (f"{name}_local", name)]
    for name in TABLES:
        local, dist = made[f"{name}_local"], made[name]
        engine = re.search(r"ENGINE = (\w+)\((.*)\)\n", local)
        plain = re.search(r"ENGINE = (\w+)(?:\((.*)\))?\n", one[name])
        assert engine.group(1) == "Replicated" + plain.group(1)  # the same engine's replicated form
        path, replica, *version = [a.strip() for a in engine.group(2).split(",")]
        assert (path, replica) == (f"'/clickhouse/tables/{{shard}}/db/{name}_local'", "'{replica}'")
        assert version == ([plain.group(2)] if plain.group(2) else [])  # the same version column
        # columns, sorting key and TTL as on one node
        assert local.replace(f"db.{name}_local ON CLUSTER prod (", f"db.{name} (").replace(
            engine.group(0), plain.group(0)) == one[name]
        keys = [k for k in sorting_key(TABLES[name]) if name != "dead_letters" or k != "raw_hash"]
        assert dist == (f"CREATE TABLE IF NOT EXISTS db.{name} ON CLUSTER prod AS db.{name}_local\n"
                        f"ENGINE = Distributed(prod, db, {name}_local, cityHash64({', '.join(keys)}))")
    # no replication: the plain engines, statements for every node, no ON CLUSTER
    flat = dict(schema_statements("db", "prod", replicated=False))
    assert not any("ON CLUSTER" in s or "Replicated" in s for s in flat.values())
    assert all(flat[name].startswith(f"CREATE TABLE IF NOT EXISTS db.{name} AS ") for name in TABLES)


def test_a_bad_cluster_name_is_refused_before_connecting():
    for bad in ("a b", "x;DROP", "1st"):
        with pytest.raises(StoreError, match="metrics.cluster"):
            Store(None, "db", "chdb:///nowhere", cluster=bad)


def _fill(store: Store, now: int) -> None:
    """The rows test_store's every-panel test writes: predictions (+ rollup), stats, a dead letter, features."""
    from dashboards.feature_stats import feature_stats_rows

    batches = random_batches(np.random.default_rng(4), n_batches=4, now_ms=now)
    store.insert("predictions", prediction_rows(batches, 0))
    store.insert("predictions", prediction_rows(batches[:1], 0))  # redelivered: FINAL keeps one of each
    store.refresh_rollup(now - 10 * 60_000, now)
    store.insert("service_stats", stats_rows(panel_stats(now)))
    store.insert("dead_letters", dead_letter_rows([schema.dead_letter("unparseable: x", b"x", ts=now)]))
    store.insert("feature_stats", feature_stats_rows(panel_feature_stats(now), now))
    store.record_offsets({("predictions", 0): 7})


def test_every_panel_reads_the_distributed_tables_as_it_reads_one_node(client):
    single = Store(client, "one_node")
    single.ensure_schema()
    sharded = Store(client, "sharded", cluster=CLUSTER, replicated=False)
    sharded.ensure_schema()
    sharded.ensure_schema()  # idempotent
    engines = dict(client.query("SELECT name, engine FROM system.tables WHERE database = 'sharded'").result_rows)
    assert engines == {**{t: "Distributed" for t in TABLES},
                       **{f"{t}_local": "ReplacingMergeTree" for t in TABLES}}
    now = int(time.time() * 1000)
    for store in (single, sharded):
        _fill(store, now)
    # every row went through the Distributed table to the shard's local table, synchronously
    for t in TABLES:
        n = client.query(f"SELECT count() FROM sharded.{t}_local").result_rows[0][0]
        assert n == client.query(f"SELECT count() FROM one_node.{t}").result_rows[0][0] and n > 0, t
    assert sharded.sink_offsets() == single.sink_offsets() == {("predictions", 0): 7}
    params = q.live_parameters(2, "feed")
    for panel in DASHBOARDS["overview"].panels:
        a = single.query(q.render(panel.sql, "live"), params)
        b = sharded.query(q.render(panel.sql, "live"), params)
        assert a.columns == b.columns, panel.id
        assert a.rows, f"panel {panel.id}: no rows"
        # the same rows; values that depend on now() (ages) may differ by the time between the two queries
        assert len(a.rows) == len(b.rows), panel.id
        for ra, rb in zip(sorted(a.rows, key=repr), sorted(b.rows, key=repr)):
            for x, y in zip(ra, rb):
                if isinstance(x, float) and isinstance(y, float):
                    assert y == pytest.approx(x, rel=1e-6, abs=5.0 if "age" in panel.id else 1e-9), panel.id
                else:
                    assert x == y or "age" in panel.id, (panel.id, x, y)


def test_a_database_of_the_other_mode_is_refused_with_what_to_do(client):
    Store(client, "was_one_node").ensure_schema()
    with pytest.raises(StoreError, match="metrics.cluster is 'streamrec' but was_one_node.predictions is a "
                                         "ReplacingMergeTree table of a single node"):
        Store(client, "was_one_node", cluster=CLUSTER, replicated=False).ensure_schema()
    Store(client, "was_cluster", cluster=CLUSTER, replicated=False).ensure_schema()
    with pytest.raises(StoreError, match="is a Distributed table .* set metrics.cluster"):
        Store(client, "was_cluster").ensure_schema()


def test_an_older_cluster_table_is_reported_not_rebuilt(client):
    client.command("CREATE DATABASE IF NOT EXISTS older")
    client.command("CREATE TABLE older.sink_offsets_local (topic String, partition Int32, next_offset Int64) "
                   "ENGINE = ReplacingMergeTree(next_offset) ORDER BY topic")
    client.command("INSERT INTO older.sink_offsets_local VALUES ('t', 0, 5)")
    with pytest.raises(StoreError, match=r"older.sink_offsets_local on cluster 'streamrec' has sorting key "
                                         r"'topic'.*not rebuilt automatically"):
        Store(client, "older", cluster=CLUSTER, replicated=False).ensure_schema()
    assert client.query("SELECT count() FROM older.sink_offsets_local").result_rows == [(1,)]  # untouched


def test_replicated_tables_on_cluster_need_a_server(client):
    """The statements a server runs. chDB refuses them: no Keeper for the replicated engines and no distributed
    DDL queue for ON CLUSTER; where it refuses with exactly that, the rest needs a ClickHouse server cluster."""
    store = Store(client, "replicated", cluster=CLUSTER)
    try:
        store.ensure_schema()
    except Exception as e:  # noqa: BLE001 - only the two refusals below are a skip, anything else fails
        why = str(e)
        if "QUERY_IS_PROHIBITED" in why or "Replicated DDL queries are disabled" in why or "NO_ZOOKEEPER" in why:
            pytest.skip(f"chDB cannot run ON CLUSTER / Replicated*MergeTree (needs a ClickHouse server with "
                        f"Keeper): {why.splitlines()[0][:160]}")
        raise
    engines = dict(client.query("SELECT name, engine FROM system.tables WHERE database = 'replicated'").result_rows)
    assert engines["predictions_local"] == "ReplicatedReplacingMergeTree" and engines["predictions"] == "Distributed"
