"""Every SQL statement the dashboards and alert rules run, in one place, written once for three targets.

A template uses these macros, expanded by :func:`render`:

* ``$WINDOW(col)``     - the time filter: the live page binds ``{window_s:UInt32}``, Grafana uses ``$__timeFilter``;
* ``$REF_WINDOW(col)`` - the reference window for drift: as long as the window, ``ref_shift_s`` earlier;
* ``$BUCKET(col)``     - the time bucket ``t``: unix seconds for the page, a DateTime for Grafana;
* ``$BUCKET_S`` / ``$WINDOW_S`` - the bucket / window width in seconds (for rates);
* ``$DOMAIN``          - the domain filter: ``{domain:String}`` (``''`` = all) or the Grafana variable ``${domain}``.

Targets: ``live`` (the page; parameters from :func:`live_parameters`), ``grafana`` (dashboard panels, with the
dashboard variables ``domain`` and ``ref_shift``) and ``alert`` (Grafana alert rules: no dashboard variables,
every domain, the reference shift written in). ``{db}`` stays for :meth:`dashboards.store.Store.query` to fill
in. Windows are on training time (wall clock when the example was scored), so replays of old logs show live.
Only functions of ClickHouse 23.x are used (sumMap, arrayCumSum, window functions, lambdas).

Result shapes (what the page and Grafana expect):
timeseries -> rows ``(t, series, value)`` (long format); stat -> one row ``(value)``; table -> any columns;
alert rules -> rows ``(series, value)``.

>>> print(render("SELECT 1 WHERE $WINDOW(ts) AND $DOMAIN", "live"))
SELECT 1 WHERE ts >= now64(3) - toIntervalSecond({window_s:UInt32}) AND ({domain:String} = '' OR domain = {domain:String})
>>> "$__timeFilter(ts)" in render("SELECT 1 WHERE $WINDOW(ts)", "grafana")
True
"""

from __future__ import annotations

import re

BUCKETS_S = (10, 30, 60, 300, 600, 1800, 3600)  # bucket widths the page picks from
MAX_POINTS = 120  # buckets per series on the page
MAX_WINDOW_MIN = 7 * 24 * 60

TARGETS = ("live", "grafana", "alert")
_MACROS = {
    "live": {
        "WINDOW": r"\1 >= now64(3) - toIntervalSecond({window_s:UInt32})",
        "REF_WINDOW": (r"\1 >= now64(3) - toIntervalSecond({window_s:UInt32} + {ref_shift_s:UInt32}) AND "
                       r"\1 < now64(3) - toIntervalSecond({ref_shift_s:UInt32})"),
        "WINDOW_S": "{window_s:UInt32}",
        "BUCKET": r"toUnixTimestamp(toStartOfInterval(\1, toIntervalSecond({bucket_s:UInt32})))",
        "BUCKET_S": "{bucket_s:UInt32}",
        "DOMAIN": "({domain:String} = '' OR domain = {domain:String})",
    },
    "grafana": {
        "WINDOW": r"$__timeFilter(\1)",
        "REF_WINDOW": (r"\1 >= $__fromTime - toIntervalSecond(${ref_shift}) AND "
                       r"\1 < $__toTime - toIntervalSecond(${ref_shift})"),
        "WINDOW_S": "greatest(dateDiff('second', $__fromTime, $__toTime), 1)",
        "BUCKET": r"toStartOfInterval(\1, toIntervalSecond(greatest($__interval_s, 10)))",
        "BUCKET_S": "greatest($__interval_s, 10)",
        "DOMAIN": "('${domain}' IN ('', 'all') OR domain = '${domain}')",
    },
}
_MACROS["alert"] = {**_MACROS["grafana"], "DOMAIN": "1 = 1",
                    "REF_WINDOW": (r"\1 >= $__fromTime - toIntervalSecond(%(ref)d) AND "
                                   r"\1 < $__toTime - toIntervalSecond(%(ref)d)")}


def render(template: str, target: str, *, ref_shift_s: int = 3600) -> str:
    """Expand the macros of ``template`` for ``target`` ("live", "grafana" or "alert"); ``ref_shift_s`` is
    written into the reference window of the ``alert`` target (the others take it as a parameter/variable)."""
    if target not in _MACROS:
        raise ValueError(f"render: target must be one of {TARGETS}, got {target!r}")
    m = _MACROS[target]
    ref = m["REF_WINDOW"] % {"ref": int(ref_shift_s)} if target == "alert" else m["REF_WINDOW"]
    sql = re.sub(r"\$REF_WINDOW\((\w+)\)", ref, template)
    sql = re.sub(r"\$WINDOW\((\w+)\)", m["WINDOW"], sql)
    sql = re.sub(r"\$BUCKET\((\w+)\)", m["BUCKET"], sql)
    sql = sql.replace("$BUCKET_S", m["BUCKET_S"]).replace("$WINDOW_S", m["WINDOW_S"]).replace("$DOMAIN", m["DOMAIN"])
    if "$WINDOW" in sql or "$BUCKET" in sql or "$REF_WINDOW" in sql:
        raise ValueError(f"render: unexpanded macro in {template!r}")
    return sql


def live_parameters(minutes: float, domain: str = "", ref_minutes: float = 0) -> dict[str, object]:
    """Query parameters of the live page: a bounded window, a bucket giving <= ``MAX_POINTS`` points, and the
    drift reference shift (``ref_minutes`` earlier; 0 = the window just before this one).

    >>> live_parameters(60)
    {'window_s': 3600, 'bucket_s': 30, 'domain': '', 'ref_shift_s': 3600}
    """
    window_s = int(min(max(minutes, 1), MAX_WINDOW_MIN) * 60)
    bucket_s = next((b for b in BUCKETS_S if window_s / b <= MAX_POINTS), BUCKETS_S[-1])
    ref_shift_s = int(min(ref_minutes, MAX_WINDOW_MIN) * 60) if ref_minutes and ref_minutes > 0 else window_s
    return {"window_s": window_s, "bucket_s": bucket_s, "domain": domain or "", "ref_shift_s": ref_shift_s}


# ---- metric fragments (aggregates over the rows of one group) ----------------------------------------------
_P = "least(greatest(toFloat64(score), 1e-7), 1 - 1e-7)"  # clamp so log() stays finite
AUC = "if(min(label) = max(label), NULL, arrayAUC(groupArray(score), groupArray(label)))"
LOGLOSS = f"-avg(label * log({_P}) + (1 - label) * log(1 - {_P}))"
# normalized entropy: log loss over the entropy of the base rate; undefined when the group has one class
NE = (f"if(avg(label) <= 0 OR avg(label) >= 1, NULL, ({LOGLOSS}) / "
      "-(avg(label) * log(avg(label)) + (1 - avg(label)) * log(1 - avg(label))))")
CALIBRATION = "if(sum(label) = 0, NULL, sum(toFloat64(score)) / sum(label))"  # predicted / observed positives

_PRED = "{db}.predictions FINAL"
_WHERE = "$WINDOW(trained_ts) AND $DOMAIN"

# ---- tables ----------------------------------------------------------------------------------------------
QUALITY_BY_OBJECTIVE = f"""
SELECT domain, objective, count() AS n, sum(label) AS positives,
       {AUC} AS auc, {NE} AS ne, {CALIBRATION} AS calibration
FROM {_PRED}
WHERE {_WHERE}
GROUP BY domain, objective
ORDER BY domain, objective"""

# one row per domain, click metrics then conversion metrics (n = examples scored); inner aliases differ from
# the outer ones because ClickHouse resolves an alias before a column of the same name
QUALITY = f"""
SELECT domain,
       anyIf(o_n, objective = 'click') AS n,
       anyIf(o_pos, objective = 'click') AS clicks,
       anyIf(o_auc, objective = 'click') AS auc,
       anyIf(o_ne, objective = 'click') AS ne,
       anyIf(o_cal, objective = 'click') AS calibration,
       anyIf(o_pos, objective = 'conversion') AS conversions,
       anyIf(o_auc, objective = 'conversion') AS cvr_auc,
       anyIf(o_ne, objective = 'conversion') AS cvr_ne,
       anyIf(o_cal, objective = 'conversion') AS cvr_calibration
FROM (
    SELECT domain, objective, count() AS o_n, sum(label) AS o_pos, {AUC} AS o_auc, {NE} AS o_ne,
           {CALIBRATION} AS o_cal
    FROM {_PRED}
    WHERE {_WHERE}
    GROUP BY domain, objective)
GROUP BY domain
ORDER BY domain"""

DEAD_LETTERS_BY_REASON = """
SELECT reason, step, topic, count() AS n, max(ts) AS last_seen
FROM {db}.dead_letters FINAL
WHERE $WINDOW(ts)
GROUP BY reason, step, topic
ORDER BY n DESC, reason
LIMIT 50"""


# ---- time series: (t, series, value) --------------------------------------------------------------------
_LAT = "(toUnixTimestamp64Milli(trained_ts) - toUnixTimestamp64Milli({col})) / 1000.0"
# event to dashboard: the sink stamps inserted_ts when the row becomes queryable
_DASH_LAT = "(toUnixTimestamp64Milli(inserted_ts) - toUnixTimestamp64Milli(event_ts)) / 1000.0"
FRESHNESS = f"""
SELECT t, kv.1 AS series, kv.2 AS value
FROM (
    SELECT $BUCKET(trained_ts) AS t,
           quantiles(0.5, 0.99)({_LAT.format(col="event_ts")}) AS ev,
           quantilesIf(0.5, 0.99)({_LAT.format(col="emitted_ts")}, toUnixTimestamp64Milli(emitted_ts) > 0) AS em,
           quantiles(0.5, 0.99)({_DASH_LAT}) AS da
    FROM {_PRED}
    WHERE objective = 'click' AND {_WHERE}
    GROUP BY t)
ARRAY JOIN [('event to trained p50', ev[1]), ('event to trained p99', ev[2]),
            ('labelled to trained p50', em[1]), ('labelled to trained p99', em[2]),
            ('event to dashboard p50', da[1]), ('event to dashboard p99', da[2])] AS kv
ORDER BY t, series"""

# examples scored per second from the predictions themselves, plus the rates each component reports
THROUGHPUT = f"""
SELECT t, series, value FROM (
    SELECT $BUCKET(trained_ts) AS t, 'examples scored/s' AS series, count() / $BUCKET_S AS value
    FROM {_PRED}
    WHERE objective = 'click' AND {_WHERE}
    GROUP BY t
    UNION ALL
    SELECT t, series, sum(v) AS value FROM (
        SELECT $BUCKET(ts) AS t,
               multiIf(component = 'replay', 'events produced/s', component = 'labels', 'labels events in/s',
                       component = 'trainer', 'trainer examples/s', concat(component, ' ', name)) AS series,
               instance, avg(value) AS v
        FROM {{db}}.service_stats FINAL
        WHERE $WINDOW(ts) AND name IN ('events_per_s', 'examples_per_s')
        GROUP BY t, series, instance)
    GROUP BY t, series)
ORDER BY t, series"""

# per process: seconds since it last reported, and the supervisor's view (up, restarts, crash looping)
STACK_HEALTH = """
SELECT process, max(silent_s) AS last_report_s, max(up) AS up, max(restarts) AS restarts, max(looping) AS crash_looping
FROM (
    SELECT toString(component) AS process, toNullable(dateDiff('second', max(ts), now64(3))) AS silent_s,
           CAST(NULL, 'Nullable(Float64)') AS up, CAST(NULL, 'Nullable(Float64)') AS restarts,
           CAST(NULL, 'Nullable(Float64)') AS looping
    FROM {db}.service_stats FINAL
    WHERE $WINDOW(ts)
    GROUP BY process
    UNION ALL
    SELECT splitByChar('.', toString(name))[2] AS process, CAST(NULL, 'Nullable(Int64)') AS silent_s,
           toNullable(argMaxIf(value, ts, startsWith(toString(name), 'up.'))) AS up,
           toNullable(argMaxIf(value, ts, startsWith(toString(name), 'restarts.'))) AS restarts,
           toNullable(argMaxIf(value, ts, startsWith(toString(name), 'crash_looping.'))) AS looping
    FROM {db}.service_stats FINAL
    WHERE $WINDOW(ts) AND component = 'supervisor'
    GROUP BY process)
GROUP BY process
ORDER BY process"""

DEAD_LETTERS_RATE = """
SELECT $BUCKET(ts) AS t, splitByChar(':', reason)[1] AS series, count() / $BUCKET_S AS value
FROM {db}.dead_letters FINAL
WHERE $WINDOW(ts)
GROUP BY t, series
ORDER BY t, series"""


# ---- single numbers: (value) ----------------------------------------------------------------------------
def stat(metric: str, objective: str = "click") -> str:
    """One number over the whole window (all selected domains pooled)."""
    return f"SELECT {metric} AS value FROM {_PRED} WHERE objective = '{objective}' AND {_WHERE}"


EXAMPLES_SCORED = stat("count()")
FRESHNESS_P50 = stat(f"quantile(0.5)({_LAT.format(col='event_ts')})")
# prediction rows stored since a time, whoever inserted them (a restarted sink counts only its own inserts)
STORED_PREDICTIONS = ("SELECT count() AS value FROM {db}.predictions FINAL "
                      "WHERE trained_ts >= fromUnixTimestamp64Milli({since_ms:Int64})")
DEAD_LETTERS_TOTAL = "SELECT count() AS value FROM {db}.dead_letters FINAL WHERE $WINDOW(ts)"


# ---- the hot pre-aggregate (prediction_rollup) ----------------------------------------------------------
ROLLUP_SLOT_S = 10  # the smallest live bucket (BUCKETS_S[0]); slots are whole multiples of it
LOGIT_CLAMP, BUCKETS_PER_LOGIT = 8, 64  # score buckets: logit(p) clamped to +-8, 1/64 wide -> 0..1024
SCORE_BUCKET = (f"toUInt16(round((least(greatest(log({_P} / (1 - {_P})), -{LOGIT_CLAMP}), {LOGIT_CLAMP}) "
                f"+ {LOGIT_CLAMP}) * {BUCKETS_PER_LOGIT}))")
DRIFT_BINS_PER_LOGIT = 1  # prediction drift compares score shares in bins one logit wide

# recomputes whole slots from the deduplicated rows: running it twice, or after a re-delivery, changes nothing
ROLLUP_REFRESH = f"""
INSERT INTO {{db}}.prediction_rollup
SELECT slot, objective, domain, n, positives, sum_score, sum_logloss,
       tupleElement(h, 1), tupleElement(h, 2), tupleElement(h, 3), now64(3)
FROM (
    SELECT toDateTime(intDiv(toUnixTimestamp(trained_ts), {ROLLUP_SLOT_S}) * {ROLLUP_SLOT_S}, 'UTC') AS slot,
           objective, domain, count() AS n, sum(label) AS positives, sum(toFloat64(score)) AS sum_score,
           -sum(label * log({_P}) + (1 - label) * log(1 - {_P})) AS sum_logloss,
           sumMap([{SCORE_BUCKET}], [toUInt64(label)], [toUInt64(1 - label)]) AS h
    FROM {{db}}.predictions FINAL
    WHERE trained_ts >= toDateTime({{lo:UInt32}}, 'UTC') AND trained_ts < toDateTime({{hi:UInt32}}, 'UTC')
    GROUP BY slot, objective, domain)"""

_ROLL = "{db}.prediction_rollup FINAL"
_HIST = "sumMap(buckets, pos, neg)"
_HP, _HN = f"tupleElement({_HIST}, 2)", f"tupleElement({_HIST}, 3)"
# AUC from the merged histogram: P(score+ > score-) + 1/2 P(same bucket), buckets in ascending score order
R_AUC = (f"if(arraySum({_HP}) = 0 OR arraySum({_HN}) = 0, NULL, "
         f"arraySum(arrayMap((p, c, n) -> p * (c - 0.5 * n), {_HP}, arrayCumSum({_HN}), {_HN})) "
         f"/ (arraySum({_HP}) * arraySum({_HN})))")
_BR = "(sum(positives) / sum(n))"
R_NE = (f"if(sum(positives) = 0 OR sum(positives) = sum(n), NULL, (sum(sum_logloss) / sum(n)) / "
        f"-({_BR} * log({_BR}) + (1 - {_BR}) * log(1 - {_BR})))")
R_CALIBRATION = "if(sum(positives) = 0, NULL, sum(sum_score) / sum(positives))"
R_COUNT = "sum(n)"


def rollup_by_domain(metric: str, objective: str) -> str:
    """``metric`` (an R_* fragment over rollup rows) per time bucket and domain: rows ``(t, series, value)``."""
    if objective not in ("click", "conversion"):
        raise ValueError(f"rollup_by_domain: objective must be click or conversion, got {objective!r}")
    return f"""
SELECT $BUCKET(slot) AS t, toString(domain) AS series, {metric} AS value
FROM {_ROLL}
WHERE objective = '{objective}' AND $WINDOW(slot) AND $DOMAIN
GROUP BY t, series
ORDER BY t, series"""


def rollup_stat(metric: str, objective: str = "click") -> str:
    return f"SELECT {metric} AS value FROM {_ROLL} WHERE objective = '{objective}' AND $WINDOW(slot) AND $DOMAIN"


ROLLUP_QUALITY = f"""
SELECT toString(domain) AS domain_, objective AS objective_, {R_COUNT} AS examples, sum(positives) AS labelled_positives,
       {R_AUC} AS auc, {R_NE} AS ne, {R_CALIBRATION} AS calibration
FROM {_ROLL}
WHERE $WINDOW(slot) AND $DOMAIN
GROUP BY domain_, objective_
ORDER BY domain_, objective_"""


# ---- drift: PSI of a window against the reference window ------------------------------------------------
PSI_FLOOR = 1e-4  # a bin's share is at least this, so empty bins give a large but finite term


def psi_expr(cur: str, ref: str) -> str:
    """PSI = sum over bins (c - r) * ln(c / r) of two sparse histograms ``(keys, counts)`` (sumMap results);
    shares are floored at :data:`PSI_FLOOR`; NULL when either side is empty."""
    keys = f"arrayDistinct(arrayConcat(tupleElement({cur}, 1), tupleElement({ref}, 1)))"

    def shares(h: str) -> str:
        return (f"arrayMap(k -> greatest(tupleElement({h}, 2)[indexOf(tupleElement({h}, 1), k)] "
                f"/ arraySum(tupleElement({h}, 2)), {PSI_FLOOR}), {keys})")

    return (f"if(empty(tupleElement({cur}, 1)) OR empty(tupleElement({ref}, 1)), NULL, "
            f"arraySum(arrayMap((c, r) -> (c - r) * log(c / r), {shares(cur)}, {shares(ref)})))")


_SCORE_BINS = (f"sumMap(arrayMap(b -> intDiv(b, {BUCKETS_PER_LOGIT // DRIFT_BINS_PER_LOGIT}), buckets), "
               "arrayMap((p, q) -> p + q, pos, neg))")


def _score_hist(window: str, keys: str) -> str:
    return f"""
    SELECT {keys}, {_SCORE_BINS} AS h, sum(n) AS cnt
    FROM {_ROLL}
    WHERE {window}(slot) AND $DOMAIN
    GROUP BY {keys}"""


# per domain and objective: the whole window against the reference window
PREDICTION_DRIFT = f"""
SELECT c.domain AS domain, c.objective AS objective, {psi_expr("c.h", "r.h")} AS psi, c.cnt AS n, r.cnt AS ref_n
FROM ({_score_hist("$WINDOW", "domain, objective")}) AS c
INNER JOIN ({_score_hist("$REF_WINDOW", "domain, objective")}) AS r
    ON c.domain = r.domain AND c.objective = r.objective
ORDER BY psi DESC, domain, objective"""


def prediction_drift_series(objective: str = "click") -> str:
    """Each time bucket's score distribution against the whole reference window, per domain."""
    return f"""
SELECT c.t AS t, c.series AS series, {psi_expr("c.h", "r.h")} AS value
FROM (
    SELECT $BUCKET(slot) AS t, toString(domain) AS series, {_SCORE_BINS} AS h
    FROM {_ROLL} WHERE objective = '{objective}' AND $WINDOW(slot) AND $DOMAIN GROUP BY t, series) AS c
INNER JOIN (
    SELECT toString(domain) AS series, {_SCORE_BINS} AS h
    FROM {_ROLL} WHERE objective = '{objective}' AND $REF_WINDOW(slot) AND $DOMAIN GROUP BY series) AS r
    ON c.series = r.series
ORDER BY t, series"""


def _feature_hist(window: str, keys: str) -> str:
    return f"""
    SELECT {keys}, sumMap(bins, counts) AS h, sum(n) AS cnt, sum(mean * n) / greatest(sum(n), 1) AS avg_value
    FROM {{db}}.feature_stats FINAL
    WHERE {window}(window_end) AND $DOMAIN
    GROUP BY {keys}"""


FEATURE_DRIFT = f"""
SELECT toString(c.domain) AS domain, toString(c.feature) AS feature, {psi_expr("c.h", "r.h")} AS psi,
       c.cnt AS n, r.cnt AS ref_n, c.avg_value AS mean, r.avg_value AS ref_mean
FROM ({_feature_hist("$WINDOW", "domain, feature")}) AS c
INNER JOIN ({_feature_hist("$REF_WINDOW", "domain, feature")}) AS r
    ON c.domain = r.domain AND c.feature = r.feature
ORDER BY psi DESC, domain, feature
LIMIT 50"""

# the most drifted feature per domain and time bucket (each bucket against the whole reference window)
FEATURE_DRIFT_SERIES = f"""
SELECT t, series, max(psi) AS value FROM (
    SELECT c.t AS t, toString(c.domain) AS series, {psi_expr("c.h", "r.h")} AS psi
    FROM (
        SELECT $BUCKET(window_end) AS t, domain, feature, sumMap(bins, counts) AS h
        FROM {{db}}.feature_stats FINAL WHERE $WINDOW(window_end) AND $DOMAIN GROUP BY t, domain, feature) AS c
    INNER JOIN ({_feature_hist("$REF_WINDOW", "domain, feature")}) AS r
        ON c.domain = r.domain AND c.feature = r.feature)
GROUP BY t, series
ORDER BY t, series"""


# ---- label delay: impression to the label reaching the trainer (emitted_ts - event_ts) -------------------
DELAY_EDGES_S = (60, 300, 900, 3600, 6 * 3600, 24 * 3600, 7 * 24 * 3600)
DELAY_LABELS = ("< 1 min", "1-5 min", "5-15 min", "15-60 min", "1-6 h", "6-24 h", "1-7 d", ">= 7 d")
_EDGES = "[" + ", ".join(map(str, DELAY_EDGES_S)) + "]"
_LABELS = "[" + ", ".join(f"'{x}'" for x in DELAY_LABELS) + "]"
LABEL_DELAY = f"""
SELECT {_LABELS}[idx + 1] AS delay, countIf(objective = 'click') AS examples,
       countIf(objective = 'click' AND label = 1) AS clicks, countIf(objective = 'conversion' AND label = 1) AS conversions,
       sum(conversions) OVER (ORDER BY idx ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
           / greatest(sum(conversions) OVER (), 1) AS conversions_cum_share
FROM (
    SELECT objective, label,
           arrayCount(e -> (toUnixTimestamp64Milli(emitted_ts) - toUnixTimestamp64Milli(event_ts)) / 1000.0 >= e,
                      {_EDGES}) AS idx
    FROM {_PRED}
    WHERE toUnixTimestamp64Milli(emitted_ts) > 0 AND {_WHERE})
GROUP BY idx
ORDER BY idx"""


# ---- service stats: lag and embedding memory (latest value per instance and bucket) ---------------------
def _latest(names: str) -> str:
    return f"""
        SELECT $BUCKET(ts) AS t, component, name, instance, argMax(value, ts) AS v
        FROM {{db}}.service_stats FINAL
        WHERE $WINDOW(ts) AND {names}
        GROUP BY t, component, name, instance"""


def _counter(component: str, name: str) -> str:
    return f"sumIf(v, component = '{component}' AND name = '{name}')"


def _has(component: str, name: str) -> str:
    return f"countIf(component = '{component}' AND name = '{name}') > 0"


# messages produced but not yet consumed, from the counters each component publishes (no broker offsets)
LAG = f"""
SELECT t, tupleElement(kv, 1) AS series, tupleElement(kv, 2) AS value
FROM (
    SELECT t,
        arrayFilter(x -> tupleElement(x, 3), [
            ('labels behind replay', greatest({_counter("replay", "events_produced")} - {_counter("labels", "events_in")}, 0),
             {_has("replay", "events_produced")} AND {_has("labels", "events_in")}),
            ('trainer behind labels', greatest({_counter("labels", "examples_out")}
                                               - {_counter("trainer", "examples_trained")}, 0),
             {_has("labels", "examples_out")} AND {_has("trainer", "examples_trained")})]) AS lags
    FROM ({_latest("name IN ('events_produced', 'events_in', 'examples_out', 'examples_trained')")})
    GROUP BY t)
ARRAY JOIN lags AS kv
ORDER BY t, series"""



def backlog(bucket: str) -> str:
    """Rows ``(b, backlog)``: the trainer's backlog in examples per time bucket ``bucket`` (an expression of
    ``ts``), the smallest it can have been in the bucket: labels ``examples_out`` (its first count in the bucket,
    summed over instances) minus trainer ``examples_trained`` (its last count, newest instance); only buckets
    where both reported. Counters only grow, so a bucket above a threshold was above it all through."""
    return f"""
    SELECT b, greatest(sumIf(v, component = 'labels') - maxIf(v, component = 'trainer'), 0) AS backlog
    FROM (
        SELECT {bucket} AS b, component, instance, if(component = 'labels', min(value), max(value)) AS v
        FROM {{db}}.service_stats FINAL
        WHERE $WINDOW(ts) AND ((component = 'labels' AND name = 'examples_out')
                               OR (component = 'trainer' AND name = 'examples_trained'))
        GROUP BY b, component, instance)
    GROUP BY b
    HAVING countIf(component = 'labels') > 0 AND countIf(component = 'trainer') > 0"""


TRAINING_BACKLOG = f"""
SELECT b AS t, 'examples labelled, not yet trained' AS series, backlog AS value
FROM ({backlog("$BUCKET(ts)")})
ORDER BY t"""

# FIITED embedding memory reported by the trainer: fiited_pool_bytes_d<dim>, fiited_rows_d<dim> (embedding_store.fiited.memory_report)
EMBEDDING_BYTES = f"""
SELECT t, concat('pool ', replaceOne(name, 'fiited_pool_bytes_d', '')) AS series, sum(v) AS value
FROM ({_latest("component = 'trainer' AND name LIKE 'fiited_pool_bytes_d%'")})
GROUP BY t, series
ORDER BY t, series"""

USER_VECTORS = f"""
SELECT t, concat('event to user vector ', extract(name, 'p\\d+')) AS series, max(v) AS value
FROM ({_latest("component = 'trainer' AND name IN ('user_freshness_p50_ms', 'user_freshness_p99_ms')")})
GROUP BY t, series
ORDER BY t, series"""

EMBEDDING_DIMS = """
SELECT toUInt32OrZero(extract(name, '(\\d+)$')) AS dim,
       sumIf(v, name LIKE 'fiited_rows_d%') AS rows,
       sumIf(v, name LIKE 'fiited_pool_bytes_d%') AS bytes,
       rows / greatest(sum(rows) OVER (), 1) AS rows_share
FROM (
    SELECT name, instance, argMax(value, ts) AS v
    FROM {db}.service_stats FINAL
    WHERE $WINDOW(ts) AND component = 'trainer' AND (name LIKE 'fiited_rows_d%' OR name LIKE 'fiited_pool_bytes_d%')
    GROUP BY name, instance)
GROUP BY dim
ORDER BY dim"""
