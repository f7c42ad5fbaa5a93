"""Every SQL statement the dashboards run, in one place, written once for two targets.

A template uses four macros, expanded by :func:`render`:

* ``$WINDOW(col)``  - the time filter: the live page binds ``{window_s:UInt32}``, Grafana uses ``$__timeFilter``;
* ``$BUCKET(col)``  - the time bucket ``t``: unix seconds for the page, a DateTime for Grafana;
* ``$BUCKET_S``     - the bucket width in seconds (for rates);
* ``$DOMAIN``       - the domain filter: ``{domain:String}`` (``''`` = all) or the Grafana variable ``${domain}``.

``{db}`` stays for :meth:`dashboards.store.Store.query` to fill in. The window is on ``trained_ts`` (wall
clock when the example was scored), not on event time, so replays of old logs show up live.

Result shapes (what the page and Grafana expect):
timeseries -> rows ``(t, series, value)`` (long format); stat -> one row ``(value)``; table -> any columns.

>>> print(render("SELECT 1 WHERE $WINDOW(ts) AND $DOMAIN", "live"))
SELECT 1 WHERE ts >= now64(3) - toIntervalSecond({window_s:UInt32}) AND ({domain:String} = '' OR domain = {domain:String})
>>> "$__timeFilter(ts)" in render("SELECT 1 WHERE $WINDOW(ts)", "grafana")
True
"""

from __future__ import annotations

import re

TARGETS = ("live", "grafana")
BUCKETS_S = (10, 30, 60, 300, 600, 1800, 3600)  # bucket widths the page picks from
MAX_POINTS = 120  # buckets per series on the page
MAX_WINDOW_MIN = 7 * 24 * 60

_MACROS = {
    "live": {
        "WINDOW": r"\1 >= now64(3) - toIntervalSecond({window_s:UInt32})",
        "BUCKET": r"toUnixTimestamp(toStartOfInterval(\1, toIntervalSecond({bucket_s:UInt32})))",
        "BUCKET_S": "{bucket_s:UInt32}",
        "DOMAIN": "({domain:String} = '' OR domain = {domain:String})",
    },
    "grafana": {
        "WINDOW": r"$__timeFilter(\1)",
        "BUCKET": r"toStartOfInterval(\1, toIntervalSecond(greatest($__interval_s, 10)))",
        "BUCKET_S": "greatest($__interval_s, 10)",
        "DOMAIN": "('${domain}' IN ('', 'all') OR domain = '${domain}')",
    },
}


def render(template: str, target: str) -> str:
    """Expand the macros of ``template`` for ``target`` ("live" or "grafana")."""
    if target not in _MACROS:
        raise ValueError(f"render: target must be one of {TARGETS}, got {target!r}")
    m = _MACROS[target]
    sql = re.sub(r"\$WINDOW\((\w+)\)", m["WINDOW"], template)
    sql = re.sub(r"\$BUCKET\((\w+)\)", m["BUCKET"], sql)
    sql = sql.replace("$BUCKET_S", m["BUCKET_S"]).replace("$DOMAIN", m["DOMAIN"])
    if "$WINDOW" in sql or "$BUCKET" in sql:
        raise ValueError(f"render: unexpanded macro in {template!r}")
    return sql


def live_parameters(minutes: float, domain: str = "") -> dict[str, object]:
    """Query parameters of the live page: a bounded window and a bucket giving <= ``MAX_POINTS`` points.

    >>> live_parameters(60)
    {'window_s': 3600, 'bucket_s': 30, 'domain': ''}
    """
    window_s = int(min(max(minutes, 1), MAX_WINDOW_MIN) * 60)
    bucket_s = next((b for b in BUCKETS_S if window_s / b <= MAX_POINTS), BUCKETS_S[-1])
    return {"window_s": window_s, "bucket_s": bucket_s, "domain": domain or ""}


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
def metric_by_domain(metric: str, objective: str) -> str:
    """``metric`` (an aggregate fragment such as :data:`AUC`) per time bucket and domain."""
    if objective not in ("click", "conversion"):
        raise ValueError(f"metric_by_domain: objective must be click or conversion, got {objective!r}")
    return f"""
SELECT $BUCKET(trained_ts) AS t, toString(domain) AS series, {metric} AS value
FROM {_PRED}
WHERE objective = '{objective}' AND {_WHERE}
GROUP BY t, series
ORDER BY t, series"""


_LAT = "(toUnixTimestamp64Milli(trained_ts) - toUnixTimestamp64Milli({col})) / 1000.0"
FRESHNESS = f"""
SELECT t, kv.1 AS series, kv.2 AS value
FROM (
    SELECT $BUCKET(trained_ts) AS t,
           quantiles(0.5, 0.99)({_LAT.format(col="event_ts")}) AS ev,
           quantilesIf(0.5, 0.99)({_LAT.format(col="emitted_ts")}, toUnixTimestamp64Milli(emitted_ts) > 0) AS em
    FROM {_PRED}
    WHERE objective = 'click' AND {_WHERE}
    GROUP BY t)
ARRAY JOIN [('event to trained p50', ev[1]), ('event to trained p99', ev[2]),
            ('labelled to trained p50', em[1]), ('labelled to trained p99', em[2])] AS kv
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
DEAD_LETTERS_TOTAL = "SELECT count() AS value FROM {db}.dead_letters FINAL WHERE $WINDOW(ts)"
