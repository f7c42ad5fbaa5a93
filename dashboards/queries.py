"""Every SQL statement the dashboards and alert rules run, in one place, written once for three targets.

A template uses these macros, expanded by :func:`render`:

* ``$WINDOW(col)``     - the time filter: the live page binds ``{window_s:UInt32}``, Grafana uses ``$__timeFilter``;
* ``$DRIFT_WINDOW(col[, split_col], table)`` / ``$REF_WINDOW(...)`` - the current and the reference part of a
  drift comparison (:func:`drift_windows`): with a reference shift of 0 (the default) the older half (by
  ``split_col``, default ``col``) of the data ``table`` holds inside the window is the reference and the newer
  half is current; with a shift > 0 the reference is the whole window that much earlier;
* ``$BUCKET(col)``     - the time bucket ``t``: unix seconds for the page, a DateTime for Grafana;
* ``$BUCKET_S`` / ``$WINDOW_S`` - the bucket / window width in seconds (for rates);
* ``$DOMAIN``          - the domain filter: ``{domain:String}`` (``''`` = all) or the Grafana variable ``${domain}``.

Targets: ``live`` (the page; parameters from :func:`live_parameters`), ``grafana`` (dashboard panels, with the
dashboard variables ``domain`` and ``ref_shift``) and ``alert`` (Grafana alert rules: no dashboard variables,
every domain, the reference shift written in). ``{db}`` stays for :meth:`dashboards.store.Store.query` to fill
in. Windows are on wall-clock time (training time of predictions, emission time of feature statistics), so
replays of old logs show live. Only functions of ClickHouse 23.x are used (sumMap, arrayCumSum, window
functions, lambdas, scalar subqueries).

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

from streams import schema
from streams.names import Component as C
from streams.names import Feature as F
from streams.names import Stat as S

BUCKETS_S = (10, 30, 60, 300, 600, 1800, 3600)  # bucket widths the page picks from
MAX_POINTS = 120  # buckets per series on the page
MAX_WINDOW_MIN = 7 * 24 * 60

TARGETS = ("live", "grafana", "alert")
_MACROS = {
    "live": {
        "WINDOW": r"\1 >= now64(3) - toIntervalSecond({window_s:UInt32})",
        "SHIFT": "{ref_shift_s:UInt32}",
        "SHIFTED": (r"\1 >= now64(3) - toIntervalSecond({window_s:UInt32} + {ref_shift_s:UInt32}) AND "
                    r"\1 < now64(3) - toIntervalSecond({ref_shift_s:UInt32})"),
        "WINDOW_S": "{window_s:UInt32}",
        "BUCKET": r"toUnixTimestamp(toStartOfInterval(\1, toIntervalSecond({bucket_s:UInt32})))",
        "BUCKET_S": "{bucket_s:UInt32}",
        "DOMAIN": "({domain:String} = '' OR domain = {domain:String})",
    },
    "grafana": {
        "WINDOW": r"$__timeFilter(\1)",
        "SHIFT": "${ref_shift}",
        "SHIFTED": (r"\1 >= $__fromTime - toIntervalSecond(${ref_shift}) AND "
                    r"\1 < $__toTime - toIntervalSecond(${ref_shift})"),
        "WINDOW_S": "greatest(dateDiff('second', $__fromTime, $__toTime), 1)",
        "BUCKET": r"toStartOfInterval(\1, toIntervalSecond(greatest($__interval_s, 10)))",
        "BUCKET_S": "greatest($__interval_s, 10)",
        "DOMAIN": "('${domain}' IN ('', 'all') OR domain = '${domain}')",
    },
}
_MACROS["alert"] = {**_MACROS["grafana"], "DOMAIN": "1 = 1", "SHIFT": "%(ref)d",
                    "SHIFTED": (r"\1 >= $__fromTime - toIntervalSecond(%(ref)d) AND "
                                r"\1 < $__toTime - toIntervalSecond(%(ref)d)")}
_MS = "toUnixTimestamp64Milli(toDateTime64({}, 3))"


def drift_windows(col: str, table: str, target: str, ref_shift_s: int = 0, split_col: str = "") -> tuple[str, str]:
    """The conditions selecting the current and the reference rows of a drift query on ``table``, whose rows are
    in the range by ``col`` (wall clock) and ordered in time by ``split_col`` (default ``col``).

    Reference shift 0: the reference is the older half of the time span ``split_col`` covers among the range's
    rows (first to last, split at the midpoint), the current part the newer half. It exists as soon as the
    range's data spans two distinct times, in a one-minute run as in a month-long one (there: the first half of
    the range against the second; a 20 min alert window compares the last 10 min with the 10 before). Shift > 0
    (seasonality, a known-good day): the whole range against the same range that much earlier. The ``alert``
    target writes the shift in and keeps only its branch.
    """
    m = _MACROS[target]
    window = m["WINDOW"].replace(r"\1", col)
    ms = _MS.format(split_col or col)
    split = f"(SELECT intDiv(min({ms}) + max({ms}), 2) FROM {table} WHERE {window})"
    shifted = m["SHIFTED"].replace(r"\1", col)
    if target == "alert":
        shifted = shifted % {"ref": int(ref_shift_s)}
        if ref_shift_s > 0:
            return window, shifted
        return f"{window} AND {ms} >= {split}", f"{window} AND {ms} < {split}"
    shift = m["SHIFT"]
    return (f"{window} AND ({shift} > 0 OR {ms} >= {split})",
            f"(({shift} > 0 AND {shifted}) OR ({shift} = 0 AND {window} AND {ms} < {split}))")


_DRIFT_ARGS = r"\((\w+), (?:(\w+), )?([\w.{}]+)\)"  # (range column[, split column], table)


def render(template: str, target: str, *, ref_shift_s: int = 0) -> str:
    """Expand the macros of ``template`` for ``target`` ("live", "grafana" or "alert"); ``ref_shift_s`` is
    written into the drift windows of the ``alert`` target (the others take it as a parameter/variable)."""
    if target not in _MACROS:
        raise ValueError(f"render: target must be one of {TARGETS}, got {target!r}")
    m = _MACROS[target]

    def drift(which: int):
        return lambda mt: drift_windows(mt.group(1), mt.group(3), target, ref_shift_s, mt.group(2) or "")[which]

    sql = re.sub(r"\$DRIFT_WINDOW" + _DRIFT_ARGS, drift(0), template)
    sql = re.sub(r"\$REF_WINDOW" + _DRIFT_ARGS, drift(1), sql)
    sql = re.sub(r"\$WINDOW\((\w+)\)", lambda mt: m["WINDOW"].replace(r"\1", mt.group(1)), sql)
    sql = re.sub(r"\$BUCKET\((\w+)\)", lambda mt: m["BUCKET"].replace(r"\1", mt.group(1)), sql)
    sql = sql.replace("$BUCKET_S", m["BUCKET_S"]).replace("$WINDOW_S", m["WINDOW_S"]).replace("$DOMAIN", m["DOMAIN"])
    if re.search(r"\$(WINDOW|BUCKET|REF_WINDOW|DRIFT_WINDOW)\b", sql):
        raise ValueError(f"render: unexpanded macro in {template!r}")
    return sql


def live_parameters(minutes: float, domain: str = "", ref_minutes: float = 0) -> dict[str, object]:
    """Query parameters of the live page: a bounded window, a bucket giving <= ``MAX_POINTS`` points, and the
    drift reference shift (``ref_minutes`` earlier; 0 = the older half of the window's data, see
    :func:`drift_windows`).

    >>> live_parameters(60)
    {'window_s': 3600, 'bucket_s': 30, 'domain': '', 'ref_shift_s': 0}
    """
    window_s = int(min(max(minutes, 1), MAX_WINDOW_MIN) * 60)
    bucket_s = next((b for b in BUCKETS_S if window_s / b <= MAX_POINTS), BUCKETS_S[-1])
    ref_shift_s = int(min(ref_minutes, MAX_WINDOW_MIN) * 60) if ref_minutes and ref_minutes > 0 else 0
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

# ---- arms side by side (serving.arms, docs/arms.md) ----------------------------------------------------------
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
LOGGED_ARM = "(logged)"  # the comparison's row for traffic streamrec did not serve (served_arm '')


def wilson(k: str, n: str, side: int, scale: float = 1.0) -> str:
    """The Wilson score interval's lower (``side`` -1) or upper (+1) end for ``k`` successes of ``n`` trials (SQL
    expressions), times ``scale``; NULL when ``n`` is 0. Unlike the normal approximation it stays inside [0, 1]
    and is not zero-width at 0 or n successes (a new arm's first hundred impressions)."""
    p, z2 = f"({k}) / ({n})", f"{Z95 * Z95!r}"
    return (f"if(({n}) = 0, NULL, {scale!r} * ({p} + {z2} / (2 * ({n})) {'+' if side > 0 else '-'} {Z95!r} * "
            f"sqrt({p} * (1 - {p}) / ({n}) + {z2} / (4 * ({n}) * ({n})))) / (1 + {z2} / ({n})))")


def ne_delta_se(n: str, mean_ll: str, base: str, var_ll: str, var_y: str, cov: str) -> str:
    """Standard error of NE = mean log loss / H(base rate) by the delta method on the per-example pairs
    (log loss, label): with H(p) = -p ln p - (1-p) ln(1-p), H'(p) = ln((1-p)/p),
    Var(NE) ~ [Var(ll) / H^2 + (L H' / H^2)^2 Var(y) - 2 (L H' / H^3) Cov(ll, y)] / n (sample moments)."""
    h = f"(-(({base}) * log({base}) + (1 - ({base})) * log(1 - ({base}))))"
    d = f"log((1 - ({base})) / ({base}))"
    return (f"sqrt(greatest(({var_ll}) / ({h} * {h}) + pow(({mean_ll}) * {d} / ({h} * {h}), 2) * ({var_y}) "
            f"- 2 * ({mean_ll}) * {d} / pow({h}, 3) * ({cov}), 0) / ({n}))")


# Per arm: online, the traffic it served (served_arm = arm: distinct examples, however many arms scored them;
# an example counts as clicked when a row of it says so): impressions, CTR and conversions per impression in
# percent with Wilson intervals; offline, its model's click predictions (arm = arm, progressive validation,
# every example it scored): AUC with a DeLong interval and NE with a delta-method interval. Intervals are 95%.
# Missing halves (an arm that serves nothing, a shadow arm; logged traffic, scored by no model of that name)
# are NULL.
#
# The offline half works from (arm, score) -> positives, negatives, which hold everything it needs: DeLong's
# placement values (a positive's share of negatives scored below it, ties half; a negative's share of
# positives above it) from one running sum over the scores, AUC = their mean, Var = S10 / n1 + S01 / n0 (their
# sample variances, expanded so the totals apply after the sums: one ordered window, not three); and the
# per-example log loss, its moments and its covariance with the label for NE. 1M rows (two arms, 250k
# examples) take ~0.5 s in chDB on 2 busy cores (QUALITY: ~0.15 s).
# (DeLong, not Hanley-McNeil: Hanley-McNeil's exponential approximation overstated the AUC's standard error
# by 11-39% against a bootstrap on binormal scores with AUC 0.76-0.96; DeLong was within 6%: docs/arms.md.)
# Inner aliases differ from the columns (ClickHouse resolves an alias before a column of the same name).
_ARM_SCORES = f"""
        SELECT toString(arm) AS a, score, toFloat64(countIf(label = 1)) AS np, toFloat64(countIf(label = 0)) AS nn,
               -log({_P}) AS lp, -log(1 - {_P}) AS ln
        FROM {_PRED}
        WHERE objective = 'click' AND {_WHERE}
        GROUP BY a, score"""
# cn: negatives scored below (ties half), cp: positives scored below (ties half), one running sum over the scores;
# a positive's placement is cn / neg, a negative's (pos - cp) / pos: the totals apply after the sums
_ARM_PLACEMENTS = f"""
    SELECT a, np, nn, lp, ln, sum(nn) OVER upto - 0.5 * nn AS cn, sum(np) OVER upto - 0.5 * np AS cp
    FROM ({_ARM_SCORES})
    WINDOW upto AS (PARTITION BY a ORDER BY score ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"""
ARM_COMPARISON = f"""
SELECT if(a = '', '{LOGGED_ARM}', a) AS arm, served,
       if(served = 0, NULL, 100 * clicks / served) AS ctr_pct,
       {wilson("clicks", "served", -1, 100.0)} AS ctr_pct_lo, {wilson("clicks", "served", 1, 100.0)} AS ctr_pct_hi,
       if(served = 0, NULL, 100 * conversions / served) AS cvr_pct,
       {wilson("conversions", "served", -1, 100.0)} AS cvr_pct_lo,
       {wilson("conversions", "served", 1, 100.0)} AS cvr_pct_hi,
       toUInt64(scored) AS scored,
       if(pos = 0 OR neg = 0, NULL, auc_) AS auc,
       if(pos = 0 OR neg = 0, NULL, greatest(auc_ - {Z95!r} * auc_se, 0)) AS auc_lo,
       if(pos = 0 OR neg = 0, NULL, least(auc_ + {Z95!r} * auc_se, 1)) AS auc_hi,
       if(pos = 0 OR neg = 0, NULL, ne_) AS ne,
       if(pos = 0 OR neg = 0, NULL, ne_ - {Z95!r} * ne_se) AS ne_lo,
       if(pos = 0 OR neg = 0, NULL, ne_ + {Z95!r} * ne_se) AS ne_hi
FROM (
    SELECT toString(served_arm) AS a, uniqExactIf(example_id, objective = 'click') AS served,
           uniqExactIf(example_id, objective = 'click' AND label = 1) AS clicks,
           uniqExactIf(example_id, objective = 'conversion' AND label = 1) AS conversions
    FROM {_PRED}
    WHERE {_WHERE}
    GROUP BY a) AS online
FULL OUTER JOIN (
    SELECT a, sum(np) AS pos, sum(nn) AS neg, pos + neg AS scored,
           sum(np * cn) / (pos * neg) AS auc_,
           sqrt(greatest((sum(np * cn * cn) / (neg * neg) - pos * auc_ * auc_) / (pos - 1) / pos
                         + ((pos * pos * neg - 2 * pos * sum(nn * cp) + sum(nn * cp * cp)) / (pos * pos)
                            - neg * auc_ * auc_) / (neg - 1) / neg, 0)) AS auc_se,
           sum(np * lp + nn * ln) / scored AS mean_ll, pos / scored AS base,
           mean_ll / -(base * log(base) + (1 - base) * log(1 - base)) AS ne_,
           {ne_delta_se("scored", "mean_ll", "base",
                        "(sum(np * lp * lp + nn * ln * ln) - scored * mean_ll * mean_ll) / (scored - 1)",
                        "(pos - scored * base * base) / (scored - 1)",
                        "(sum(np * lp) - scored * mean_ll * base) / (scored - 1)")} AS ne_se
    FROM ({_ARM_PLACEMENTS})
    GROUP BY a) AS offline
USING (a)
ORDER BY a = '', a"""

DEAD_LETTERS_BY_REASON = """
SELECT reason, step, topic, count() AS n, max(ts) AS last_seen
FROM {db}.dead_letters FINAL
WHERE $WINDOW(ts)
GROUP BY reason, step, topic
ORDER BY n DESC, reason
LIMIT 50"""


# ---- time series: (t, series, value) --------------------------------------------------------------------
def _seconds(start: str, end: str) -> str:
    return f"(toUnixTimestamp64Milli({end}) - toUnixTimestamp64Milli({start})) / 1000.0"


_LABELLED = "toUnixTimestamp64Milli(emitted_ts) > 0"  # examples from an older labels flow carry no emission time
# Freshness has two parts that mean different things. Pipeline latency: the labels flow emitted the example
# (labelled), the trainer scored and trained it, the sink made its row queryable here (inserted_ts, stored):
# the system's own delay, which the thresholds and the training-lag alert judge. Log age: event time to
# training: the attribution window's wait (under the `window` policy the whole click window) plus, for a
# replayed or generated log, how old the log is; a property of the input, shown without thresholds.
PIPELINE_LATENCY = f"""
SELECT t, kv.1 AS series, kv.2 AS value
FROM (
    SELECT $BUCKET(trained_ts) AS t,
           quantiles(0.5, 0.99)({_seconds("emitted_ts", "trained_ts")}) AS lt,
           quantiles(0.5, 0.99)({_seconds("emitted_ts", "inserted_ts")}) AS ls
    FROM {_PRED}
    WHERE objective = 'click' AND {_WHERE} AND {_LABELLED}
    GROUP BY t)
ARRAY JOIN [('labelled to trained p50', lt[1]), ('labelled to trained p99', lt[2]),
            ('labelled to stored p50', ls[1]), ('labelled to stored p99', ls[2])] AS kv
ORDER BY t, series"""

LOG_AGE = f"""
SELECT t, kv.1 AS series, kv.2 AS value
FROM (
    SELECT $BUCKET(trained_ts) AS t, quantiles(0.5, 0.99)({_seconds("event_ts", "trained_ts")}) AS age
    FROM {_PRED}
    WHERE objective = 'click' AND {_WHERE}
    GROUP BY t)
ARRAY JOIN [('event to trained p50', age[1]), ('event to trained p99', age[2])] AS kv
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
               multiIf(component = '{C.REPLAY}', 'events produced/s', component = '{C.LABELS}', 'labels events in/s',
                       component = '{C.TRAINER}', 'trainer examples/s', component = '{C.STATS}', 'stats examples in/s',
                       concat(component, ' ', name)) AS series,
               instance, avg(value) AS v
        FROM {{db}}.service_stats FINAL
        WHERE $WINDOW(ts) AND name IN ('{S.EVENTS_PER_S}', '{S.EXAMPLES_PER_S}')
        GROUP BY t, series, instance)
    GROUP BY t, series)
ORDER BY t, series"""

# per process: seconds since it last reported, and the supervisor's view (up, restarts, crash looping)
STACK_HEALTH = f"""
SELECT process, max(silent_s) AS last_report_s, max(up) AS up, max(restarts) AS restarts, max(looping) AS crash_looping
FROM (
    SELECT toString(component) AS process, toNullable(dateDiff('second', max(ts), now64(3))) AS silent_s,
           CAST(NULL, 'Nullable(Float64)') AS up, CAST(NULL, 'Nullable(Float64)') AS restarts,
           CAST(NULL, 'Nullable(Float64)') AS looping
    FROM {{db}}.service_stats FINAL
    WHERE $WINDOW(ts)
    GROUP BY process
    UNION ALL
    SELECT splitByChar('.', toString(name))[2] AS process, CAST(NULL, 'Nullable(Int64)') AS silent_s,
           toNullable(argMaxIf(value, ts, startsWith(toString(name), '{S.UP}.'))) AS up,
           toNullable(argMaxIf(value, ts, startsWith(toString(name), '{S.RESTARTS}.'))) AS restarts,
           toNullable(argMaxIf(value, ts, startsWith(toString(name), '{S.CRASH_LOOPING}.'))) AS looping
    FROM {{db}}.service_stats FINAL
    WHERE $WINDOW(ts) AND component = '{C.SUPERVISOR}'
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
PIPELINE_LATENCY_P50 = (f"SELECT quantile(0.5)({_seconds('emitted_ts', 'inserted_ts')}) AS value FROM {_PRED} "
                        f"WHERE objective = 'click' AND {_WHERE} AND {_LABELLED}")
# the newest event trained in the window, against the wall clock: how old the model's data is
LOG_AGE_NOW = stat("dateDiff('millisecond', max(event_ts), now64(3)) / 1000.0")
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


# ---- drift: PSI of the current part of the window against the reference ($DRIFT_WINDOW / $REF_WINDOW) -----
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


# Prediction drift reads the raw predictions, not the 10 s rollup: a short run trains all its examples within
# one or two slots (20k examples in ~4 s), where a split of the rollup's slots finds no reference; trained_ts
# has millisecond resolution. Bins are the rollup's score buckets merged DRIFT_BINS_PER_LOGIT per logit.
_SCORE_BIN = f"intDiv({SCORE_BUCKET}, {BUCKETS_PER_LOGIT // DRIFT_BINS_PER_LOGIT})"
_SCORE_HIST = f"sumMap([{_SCORE_BIN}], [toUInt64(1)])"
_PRED_T = "{db}.predictions"


def _score_hist(window: str, keys: str) -> str:
    return f"""
    SELECT {keys}, {_SCORE_HIST} AS h, count() AS cnt, min(trained_ts) AS t_from, max(trained_ts) AS t_to
    FROM {_PRED}
    WHERE {window}(trained_ts, {_PRED_T}) AND $DOMAIN
    GROUP BY {keys}"""


# per domain and objective: the current part of the window against the reference (where the reference starts
# and how many seconds of training it spans)
PREDICTION_DRIFT = f"""
SELECT c.domain AS domain, c.objective AS objective, {psi_expr("c.h", "r.h")} AS psi, c.cnt AS n, r.cnt AS ref_n,
       r.t_from AS ref_from, {_seconds("r.t_from", "r.t_to")} AS ref_s
FROM ({_score_hist("$DRIFT_WINDOW", "domain, objective")}) AS c
INNER JOIN ({_score_hist("$REF_WINDOW", "domain, objective")}) AS r
    ON c.domain = r.domain AND c.objective = r.objective
ORDER BY psi DESC, domain, objective"""


def prediction_drift_series(objective: str = "click") -> str:
    """Each time bucket of the current part's score distribution against the whole reference, per domain."""
    return f"""
SELECT c.t AS t, c.series AS series, {psi_expr("c.h", "r.h")} AS value
FROM (
    SELECT $BUCKET(trained_ts) AS t, toString(domain) AS series, {_SCORE_HIST} AS h
    FROM {_PRED} WHERE objective = '{objective}' AND $DRIFT_WINDOW(trained_ts, {_PRED_T}) AND $DOMAIN
    GROUP BY t, series) AS c
INNER JOIN (
    SELECT toString(domain) AS series, {_SCORE_HIST} AS h
    FROM {_PRED} WHERE objective = '{objective}' AND $REF_WINDOW(trained_ts, {_PRED_T}) AND $DOMAIN
    GROUP BY series) AS r
    ON c.series = r.series
ORDER BY t, series"""


_FS, _FS_T = "{db}.feature_stats FINAL", "{db}.feature_stats"
# the features whose distributions drift is judged on: the dense features' fixed-edge histograms
_DRIFTING = f"kind = 'histogram' AND startsWith(feature, '{F.DENSE_PREFIX}')"
# PSI of dense features compares shares in bins FEATURE_PSI_BIN wide (the flow's 0.25-wide buckets, whose
# edges are multiples of it, merged): PSI of two samples from one distribution is about
# (bins - 1) * (1/n + 1/n_ref), so the flow's 42 buckets made ~0.15 of pure noise for a few hundred values a
# side (a stationary 10k-event run read "moderate drift"); 12 bins keep it near 0.05
FEATURE_PSI_BIN = 1.0
_FEATURE_BINS = f"arrayMap(b -> toString(floor(toFloat64OrZero(b) / {FEATURE_PSI_BIN}) * {FEATURE_PSI_BIN}), bins)"
# moments of partial aggregates (per partition and window) combined exactly: std is the population std
_MEAN = "if(sum(n) = 0, NULL, sum(mean * n) / sum(n))"
_STD = f"if(sum(n) = 0, NULL, sqrt(greatest(sum(n * (std * std + mean * mean)) / sum(n) - pow({_MEAN}, 2), 0)))"


# Feature statistics are in the range by emission time (wall clock) and split into reference and current by
# event time (window_start): a replayed log's windows close in a burst within seconds, whose emission order
# is the partitions' order, not the data's; in live traffic the two differ by the window and its lateness.
def _feature_hist(window: str, keys: str) -> str:
    return f"""
    SELECT {keys}, sumMap({_FEATURE_BINS}, counts) AS h, sum(n) AS cnt, {_MEAN} AS avg_value, {_STD} AS std_value
    FROM {_FS}
    WHERE {window}(emitted_ts, window_start, {_FS_T}) AND $DOMAIN AND {_DRIFTING}
    GROUP BY {keys}"""


FEATURE_DRIFT = f"""
SELECT toString(c.domain) AS domain, toString(c.feature) AS feature, {psi_expr("c.h", "r.h")} AS psi,
       c.cnt AS n, r.cnt AS ref_n, c.avg_value AS mean, r.avg_value AS ref_mean, c.std_value AS std,
       r.std_value AS ref_std
FROM ({_feature_hist("$DRIFT_WINDOW", "domain, feature")}) AS c
INNER JOIN ({_feature_hist("$REF_WINDOW", "domain, feature")}) AS r
    ON c.domain = r.domain AND c.feature = r.feature
ORDER BY psi DESC, domain, feature
LIMIT 50"""

# the most drifted feature per domain and time bucket (each bucket of the current part against the reference)
FEATURE_DRIFT_SERIES = f"""
SELECT t, series, max(psi) AS value FROM (
    SELECT c.t AS t, toString(c.domain) AS series, {psi_expr("c.h", "r.h")} AS psi
    FROM (
        SELECT $BUCKET(emitted_ts) AS t, domain, feature, sumMap({_FEATURE_BINS}, counts) AS h
        FROM {_FS} WHERE $DRIFT_WINDOW(emitted_ts, window_start, {_FS_T}) AND $DOMAIN AND {_DRIFTING}
        GROUP BY t, domain, feature) AS c
    INNER JOIN ({_feature_hist("$REF_WINDOW", "domain, feature")}) AS r
        ON c.domain = r.domain AND c.feature = r.feature)
GROUP BY t, series
ORDER BY t, series"""


# ---- label delay: click / conversion time minus impression time (the stats flow's delay histograms) -------
def _duration(s: float) -> str:
    for unit, width in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= width:
            return f"{s / width:g} {unit}"
    return f"{s:g} s"


DELAY_BINS = tuple(schema.bin_labels(schema.DELAY_EDGES_S))  # as the stats flow labels its buckets
DELAY_LABELS = (f"< {_duration(schema.DELAY_EDGES_S[0])}",
                *(f"{_duration(a)} - {_duration(b)}" for a, b in zip(schema.DELAY_EDGES_S, schema.DELAY_EDGES_S[1:])),
                f">= {_duration(schema.DELAY_EDGES_S[-1])}")
_DELAY_BINS_SQL = "[" + ", ".join(f"'{b}'" for b in DELAY_BINS) + "]"


def _cum_share(col: str) -> str:
    return (f"sum({col}) OVER (ORDER BY idx ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) "
            f"/ greatest(sum({col}) OVER (), 1)")


# every click and conversion of the examples whose windows closed in the range, by its delay bucket
LABEL_DELAY = f"""
SELECT transform(delay_bin, {_DELAY_BINS_SQL}, [{", ".join(f"'{x}'" for x in DELAY_LABELS)}], delay_bin) AS delay,
       clicks, {_cum_share("clicks")} AS clicks_cum_share,
       conversions, {_cum_share("conversions")} AS conversions_cum_share
FROM (
    SELECT delay_bin, indexOf({_DELAY_BINS_SQL}, delay_bin) AS idx,
           sumIf(delay_n, feature = '{F.DELAY_CLICK}') AS clicks,
           sumIf(delay_n, feature = '{F.DELAY_CONVERSION}') AS conversions
    FROM {_FS}
    ARRAY JOIN bins AS delay_bin, counts AS delay_n
    WHERE $WINDOW(emitted_ts) AND $DOMAIN AND feature IN ('{F.DELAY_CLICK}', '{F.DELAY_CONVERSION}')
    GROUP BY delay_bin)
WHERE clicks + conversions > 0
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


# examples the slowest trainer took (trained + scored for another arm), per instance (= arm; sumMap adds up a
# trainer's two counters per instance; it drops a key whose sum is 0, a trainer that has taken nothing yet)
_SLOWEST_TRAINER = (f"arrayMin(tupleElement(sumMapIf([instance], [v], component = '{C.TRAINER}' AND "
                    f"name IN ('{S.EXAMPLES_TRAINED}', '{S.EXAMPLES_OTHER_ARM}')), 2))")

# messages produced but not yet consumed, from the counters each component publishes (no broker offsets)
LAG = f"""
SELECT t, tupleElement(kv, 1) AS series, tupleElement(kv, 2) AS value
FROM (
    SELECT t,
        arrayFilter(x -> tupleElement(x, 3), [
            ('labels behind replay', greatest({_counter(C.REPLAY, S.EVENTS_PRODUCED)} - {_counter(C.LABELS, S.EVENTS_IN)}, 0),
             {_has(C.REPLAY, S.EVENTS_PRODUCED)} AND {_has(C.LABELS, S.EVENTS_IN)}),
            ('trainer behind labels', greatest({_counter(C.LABELS, S.EXAMPLES_OUT)} - {_SLOWEST_TRAINER}, 0),
             {_has(C.LABELS, S.EXAMPLES_OUT)} AND {_has(C.TRAINER, S.EXAMPLES_TRAINED)})]) AS lags
    FROM ({_latest(f"name IN ('{S.EVENTS_PRODUCED}', '{S.EVENTS_IN}', '{S.EXAMPLES_OUT}', '{S.EXAMPLES_TRAINED}', "
                   f"'{S.EXAMPLES_OTHER_ARM}')")})
    GROUP BY t)
ARRAY JOIN lags AS kv
ORDER BY t, series"""



def backlog(bucket: str) -> str:
    """Rows ``(b, backlog)``: the trainer's backlog in examples per time bucket ``bucket`` (an expression of
    ``ts``), the smallest it can have been in the bucket: labels ``examples_out`` (its first count in the bucket,
    summed over instances) minus the examples the trainer took (its last count of ``examples_trained`` plus
    ``examples_other_arm``: a ``learn_from own`` arm scores the others without training on them), of the
    slowest trainer instance (instance = arm: the arm furthest behind); only buckets where both reported.
    Counters only grow, so a bucket above a threshold was above it all through."""
    return f"""
    SELECT b, greatest(sumIf(v, component = 'labels') - minIf(v, component = 'trainer'), 0) AS backlog
    FROM (
        SELECT b, component, instance, sum(nv) AS v
        FROM (
            SELECT {bucket} AS b, component, instance, name, if(component = 'labels', min(value), max(value)) AS nv
            FROM {{db}}.service_stats FINAL
            WHERE $WINDOW(ts) AND ((component = 'labels' AND name = 'examples_out')
                                   OR (component = 'trainer' AND name IN ('examples_trained', 'examples_other_arm')))
            GROUP BY b, component, instance, name)
        GROUP BY b, component, instance)
    GROUP BY b
    HAVING countIf(component = 'labels') > 0 AND countIf(component = 'trainer') > 0"""


TRAINING_BACKLOG = f"""
SELECT b AS t, 'examples labelled, not yet trained' AS series, backlog AS value
FROM ({backlog("$BUCKET(ts)")})
ORDER BY t"""

# embedding memory reported by the trainer, every backend (SparseEmbeddings.memory_report): bytes and rows per row
# width, embedding_bytes_d<width> and embedding_rows_d<width> (fixed tables: one width; FIITED: one per pool)
EMBEDDING_BYTES = f"""
SELECT t, concat('rows of width ', replaceOne(name, '{S.EMBEDDING_BYTES_PREFIX}', '')) AS series, sum(v) AS value
FROM ({_latest(f"component = '{C.TRAINER}' AND name LIKE '{S.EMBEDDING_BYTES_PREFIX}%'")})
GROUP BY t, series
ORDER BY t, series"""

# the labels join's state (streams/flows/join.py, docs/joinstate.md): bytes in memory and bytes of the cold tier
# on disk (JOIN_STATE), impressions compacted there (JOIN_COMPACTED); the latest report of each labels process in
# the bucket, summed
JOIN_STATE = f"""
SELECT t, if(name = '{S.JOIN_STATE_MEMORY_BYTES}', 'in memory', 'on disk (cold tier)') AS series, sum(v) AS value
FROM ({_latest(f"component = '{C.LABELS}' AND name IN ('{S.JOIN_STATE_MEMORY_BYTES}', '{S.JOIN_STATE_DISK_BYTES}')")})
GROUP BY t, series
ORDER BY t, series"""

JOIN_COMPACTED = f"""
SELECT t, 'impressions in the cold tier' AS series, sum(v) AS value
FROM ({_latest(f"component = '{C.LABELS}' AND name = '{S.JOIN_COMPACTED}'")})
GROUP BY t, series
ORDER BY t, series"""

# FIITED's bookkeeping (embedding_store/fiited.py memory_report): slot map, per-row arrays and admission sketch,
# bytes; it grows with the admitted rows, not with the hashed space
FIITED_META = f"""
SELECT t, replaceOne(replaceOne(name, 'fiited_', ''), '_bytes', '') AS series, sum(v) AS value
FROM ({_latest(f"component = '{C.TRAINER}' AND name IN ('fiited_map_bytes', 'fiited_row_meta_bytes', "
               "'fiited_sketch_bytes')")})
GROUP BY t, series
ORDER BY t, series"""

USER_VECTORS = f"""
SELECT t, concat('event to user vector ', extract(name, 'p\\d+')) AS series, max(v) AS value
FROM ({_latest(f"component = '{C.TRAINER}' AND name IN ('{S.USER_FRESHNESS_P50_MS}', '{S.USER_FRESHNESS_P99_MS}')")})
GROUP BY t, series
ORDER BY t, series"""

# the ranking service (serving/emit.py ServingStats, once a second): requests/s and latency percentiles
SERVING = f"""
SELECT t, multiIf(name = '{S.QPS}', 'requests/s', name = '{S.LATENCY_P50_MS}', 'latency p50 ms',
                  'latency p99 ms') AS series, max(v) AS value
FROM ({_latest(f"component = '{C.SERVING}' AND name IN ('{S.QPS}', '{S.LATENCY_P50_MS}', '{S.LATENCY_P99_MS}')")})
GROUP BY t, series
ORDER BY t, series"""

# continuous publishing seen from both ends: per arm, the age of the version the service serves (now - the
# newest training step it includes) and the trainer's newest delta as a fraction of a full snapshot (x 100)
PUBLISHING = f"""
SELECT t, series, max(v) AS value FROM (
    SELECT t, concat('model age s, arm ', replaceOne(name, '{S.ARM_MODEL_AGE_PREFIX}', '')) AS series, v
    FROM ({_latest(f"component = '{C.SERVING}' AND startsWith(name, '{S.ARM_MODEL_AGE_PREFIX}')")})
    UNION ALL
    SELECT t, concat('delta % of full, arm ', instance) AS series, 100 * v AS v
    FROM ({_latest(f"component = '{C.TRAINER}' AND name = '{S.DELTA_FRACTION}'")}))
GROUP BY t, series
ORDER BY t, series"""

_FM_OR_VM = "(instance = 'fm' OR startsWith(instance, 'vm'))"  # the trainers of streamrec up --with-fm (arms)
# foundation-model transfer: the teacher join's coverage and teacher age (component distill), and per VM the
# median age of the FM vectors its LoopFM store served and the share of its lookups that missed (absent or stale);
# how far each model trails the stream (newest event trained, against now)
TRANSFER = f"""
SELECT t, series, max(v) AS value FROM (
    SELECT t, 'teacher coverage %' AS series, 100 * v AS v
    FROM ({_latest(f"component = '{C.DISTILL}' AND name = '{S.TEACHER_COVERAGE}'")})
    UNION ALL
    SELECT t, 'teacher age p50 s' AS series, v / 1000 AS v
    FROM ({_latest(f"component = '{C.DISTILL}' AND name = '{S.TEACHER_AGE_P50_MS}'")})
    UNION ALL
    SELECT t, concat('FM embedding age p50 s, ', instance) AS series, v
    FROM ({_latest(f"component = '{C.TRAINER}' AND name = '{S.LOOPFM_AGE_P50_S}'")})
    UNION ALL
    SELECT t, concat('behind the stream s, ', instance) AS series, v / 1000 AS v
    FROM ({_latest(f"component = '{C.TRAINER}' AND name = '{S.FRESHNESS_MS}' AND {_FM_OR_VM}")})
    UNION ALL
    SELECT t, series, miss_pct AS v FROM (
        SELECT t, concat('LoopFM misses %, ', instance) AS series,
               100 * (sumIf(v, name = 'loopfm_misses') + sumIf(v, name = 'loopfm_stale'))
                   / sumIf(v, name = 'loopfm_lookups') AS miss_pct
        FROM ({_latest(f"component = '{C.TRAINER}' AND name IN ('loopfm_lookups', 'loopfm_misses', 'loopfm_stale')")})
        GROUP BY t, instance
        HAVING sumIf(v, name = 'loopfm_lookups') > 0))
GROUP BY t, series
ORDER BY t, series"""

# per model (the arm that scored: the FM, each VM, each serving arm) and domain: click AUC, NE and calibration,
# conversion AUC and NE; inner aliases differ from the outer ones (see QUALITY)
MODEL_QUALITY = f"""
SELECT m AS model, domain,
       anyIf(o_n, objective = 'click') AS n,
       anyIf(o_auc, objective = 'click') AS auc,
       anyIf(o_ne, objective = 'click') AS ne,
       anyIf(o_cal, objective = 'click') AS calibration,
       anyIf(o_auc, objective = 'conversion') AS cvr_auc,
       anyIf(o_ne, objective = 'conversion') AS cvr_ne
FROM (
    SELECT toString(arm) AS m, domain, objective, count() AS o_n, {AUC} AS o_auc, {NE} AS o_ne,
           {CALIBRATION} AS o_cal
    FROM {_PRED}
    WHERE {_WHERE}
    GROUP BY m, domain, objective)
GROUP BY m, domain
ORDER BY m, domain"""

# the early-stage ranker (trainer/early_stage.py, trainer.early_stage): per arm, its mean losses since the trainer's
# previous report: on the labels (ESMM) and on the final ranker's scores (the cascade's consistency)
EARLY_STAGE = f"""
SELECT t, concat(if(name = '{S.EARLY_STAGE_DISTILL_LOSS}', 'loss on the final ranker scores',
                    'label loss'), ', arm ', instance) AS series, max(v) AS value
FROM ({_latest(f"component = '{C.TRAINER}' AND name IN ('{S.EARLY_STAGE_LABEL_LOSS}', '{S.EARLY_STAGE_DISTILL_LOSS}')")})
GROUP BY t, series
ORDER BY t, series"""

# semantic IDs (trainer.ad_id_features; trainer/creatives.py): per trainer (instance = arm) the ads its codebook
# codes, the impressions of ads without a code yet (hashed raw id, cold) as a share of the lookups, and refreshes
SEMANTIC_IDS = f"""
SELECT t, series, max(v) AS value FROM (
    SELECT t, concat(multiIf(name = 'semantic_ids_ads', 'ads coded', name = 'semantic_ids_coded_at_birth',
                             'coded at birth', 'codebook refreshes'), ', ', instance) AS series, v
    FROM ({_latest(f"component = '{C.TRAINER}' AND name IN ('semantic_ids_ads', 'semantic_ids_coded_at_birth', "
                   "'semantic_ids_refreshes')")})
    UNION ALL
    SELECT t, concat('uncoded lookups %, ', instance) AS series,
           100 * sumIf(v, name = 'semantic_ids_unknown_lookups') / greatest(sumIf(v, name = 'semantic_ids_lookups'), 1)
    FROM ({_latest(f"component = '{C.TRAINER}' AND name IN ('semantic_ids_unknown_lookups', "
                   "'semantic_ids_lookups')")})
    GROUP BY t, instance)
GROUP BY t, series
ORDER BY t, series"""

# per-cohort click quality (trainer/cohorts.py: "domain/activity/country"), per arm: where the model is worst;
# rows from predictions of trainers that named cohorts (cohort != '')
COHORTS = f"""
SELECT arm, cohort, count() AS n, sum(label) AS clicks, avg(label) AS ctr, {AUC} AS auc, {NE} AS ne,
       {CALIBRATION} AS calibration
FROM {_PRED}
WHERE {_WHERE} AND objective = 'click' AND cohort != ''
GROUP BY arm, cohort
ORDER BY ne DESC NULLS LAST, n DESC
LIMIT 60"""

# SOLARIS: the precompute service's hit rate (requests whose pair it had published before them), the median age of
# those hits and its budget used (pairs computed per request); per VM the hit rate of its own pair cache
SOLARIS = f"""
SELECT t, series, max(v) AS value FROM (
    SELECT t, 'hit rate %' AS series, 100 * v AS v
    FROM ({_latest(f"component = '{C.SOLARIS}' AND name = '{S.SOLARIS_HIT_RATE}'")})
    UNION ALL
    SELECT t, 'age of hits p50 s' AS series, v
    FROM ({_latest(f"component = '{C.SOLARIS}' AND name = '{S.SOLARIS_AGE_P50_S}'")})
    UNION ALL
    SELECT t, 'budget used (pairs per request)' AS series, v
    FROM ({_latest(f"component = '{C.SOLARIS}' AND name = '{S.SOLARIS_BUDGET_USED}'")})
    UNION ALL
    SELECT t, concat('VM cache hit rate %, ', instance) AS series, 100 * v AS v
    FROM ({_latest(f"component = '{C.TRAINER}' AND name = '{S.SOLARIS_HIT_RATE}'")}))
GROUP BY t, series
ORDER BY t, series"""

EMBEDDING_DIMS = f"""
SELECT toUInt32OrZero(extract(name, '(\\d+)$')) AS dim,
       sumIf(v, name LIKE '{S.EMBEDDING_ROWS_PREFIX}%') AS rows,
       sumIf(v, name LIKE '{S.EMBEDDING_BYTES_PREFIX}%') AS bytes,
       rows / greatest(sum(rows) OVER (), 1) AS rows_share
FROM (
    SELECT name, instance, argMax(value, ts) AS v
    FROM {{db}}.service_stats FINAL
    WHERE $WINDOW(ts) AND component = '{C.TRAINER}'
          AND (name LIKE '{S.EMBEDDING_ROWS_PREFIX}%' OR name LIKE '{S.EMBEDDING_BYTES_PREFIX}%')
    GROUP BY name, instance)
GROUP BY dim
ORDER BY dim"""

# LoKA FP8 (trainer/precision.py, trainer.precision): per trainer (instance = arm) and dense layer, the kernel its
# dispatch runs (precision_kernel/<layer>: 0 fp8_tensor, 1 fp8_row, 2 bf16, 3 fp32), the probe's running mean
# relative GEMM error per kernel (precision_err/<layer>/<kernel>) and the input's crest factor and the share of
# gradient entries an e4m3 cast would flush (precision_stat/<layer>/...); latest report in the window
PRECISION = f"""
SELECT instance AS arm, splitByChar('/', name)[2] AS layer,
       multiIf(anyIf(v, name LIKE 'precision_kernel/%') = 0, 'fp8_tensor',
               anyIf(v, name LIKE 'precision_kernel/%') = 1, 'fp8_row',
               anyIf(v, name LIKE 'precision_kernel/%') = 2, 'bf16', 'fp32') AS kernel,
       anyIf(v, name LIKE 'precision_err/%/fp8_tensor') AS err_fp8_tensor,
       anyIf(v, name LIKE 'precision_err/%/fp8_row') AS err_fp8_row,
       anyIf(v, name LIKE 'precision_err/%/bf16') AS err_bf16,
       anyIf(v, name LIKE 'precision_stat/%/x_crest') AS x_crest,
       anyIf(v, name LIKE 'precision_stat/%/g_underflow') AS grad_flushed
FROM (
    SELECT name, instance, argMax(value, ts) AS v
    FROM {{db}}.service_stats FINAL
    WHERE $WINDOW(ts) AND component = '{C.TRAINER}'
          AND (name LIKE 'precision_kernel/%' OR name LIKE 'precision_err/%' OR name LIKE 'precision_stat/%')
    GROUP BY name, instance)
GROUP BY arm, layer
HAVING countIf(name LIKE 'precision_kernel/%') > 0
ORDER BY arm, layer"""
