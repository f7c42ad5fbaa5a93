"""Labelled example streams straight from a simulation's truth table, without broker or dataflow.

For benchmarks and quality studies that run in one process: each impression of
:func:`streams.sources.generate.simulate` becomes the :class:`~streams.schema.Example` (or examples) that the
labels dataflow would emit under a label policy, at the event time it would emit them, sorted by that time.

Policies:

* ``oracle``: at ``ts + elapsed`` with the *final* labels (an impossible upper bound: no label delay);
* ``elapsed`` (ES-DFM): at ``ts + elapsed`` with the labels observed by then (``decided="elapsed"``), plus a
  duplicate positive at ``ts + delay`` for each click / conversion later than ``elapsed``
  (``<id>#late-click`` / ``<id>#late-conversion``, ``decided="late_positive"``), as ``streams/flows/join.py``
  emits them;
* ``naive``: the ``elapsed`` examples only: fake negatives are never corrected;
* ``window``: at ``ts + window`` with the final labels (``decided="window_closed"``): accurate but stale.

``emitted_ts`` is the emission *event* time.

:func:`progressive` feeds such a stream to a learner batch by batch in emission order, as the trainer loop does,
and records its *progressive* scores (each example scored by the training step that then learns from it) by
impression index: the stream loop of the in-process benchmarks (cascade, cohorts, transfer).

>>> from streams.sources.generate import GeneratorConfig, simulate
>>> sim = simulate(GeneratorConfig(n_impressions=200, seed=1))
>>> exs = example_stream(sim, "elapsed", elapsed_s=60)
>>> len([e for e in exs if e.decided == "elapsed"]), all(a.emitted_ts <= b.emitted_ts for a, b in zip(exs, exs[1:]))
(200, True)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from streams import schema
from streams.sources.generate import TruthParams

POLICIES = ("oracle", "elapsed", "naive", "window")
DOMAINS = ("feed", "stories", "video", "search", "display")
# the in-process benchmarks' world (cascade, cohorts, transfer): frequent clicks, as in bench quality, so that the
# stream teaches something within a minute
FREQUENT_CLICKS = TruthParams(
    base_ctr={"feed": 0.2, "stories": 0.15, "video": 0.12, "search": 0.25, "display": 0.1},
    base_cvr={"feed": 0.2, "stories": 0.15, "video": 0.15, "search": 0.25, "display": 0.1},
    domain_share={"feed": 0.4, "stories": 0.2, "video": 0.2, "search": 0.15, "display": 0.05})


def impressions(sim) -> list[schema.Impression]:
    """The simulation's impressions in truth-table order."""
    by_id = {r.event_id: r for r in sim.records if isinstance(r, schema.Impression)}
    return [by_id[i] for i in sim.truth.column("impression_id").to_pylist()]


def example_stream(sim, policy: str, *, elapsed_s: float = 3600.0, window_s: float = 24 * 3600.0
                   ) -> list[schema.Example]:
    """Examples of ``sim`` under ``policy`` in emission order (stable for equal times: impression order)."""
    if policy not in POLICIES:
        raise ValueError(f"example_stream: policy must be one of {POLICIES}, got {policy!r}")
    imps = impressions(sim)
    t = sim.truth
    ts = t.column("ts").to_numpy()
    cd, vd = t.column("click_delay_ms").to_numpy(), t.column("conversion_delay_ms").to_numpy()
    click, conv = t.column("click").to_numpy() > 0, t.column("conversion").to_numpy() > 0
    e = int(elapsed_s * 1000)
    at = ts + (int(window_s * 1000) if policy == "window" else e)
    rows: list[tuple[int, int, schema.Example]] = []
    for i, imp in enumerate(imps):
        c_ts = int(ts[i] + cd[i]) if click[i] else None
        v_ts = int(ts[i] + vd[i]) if conv[i] else None
        if policy in ("oracle", "window"):
            ex = schema.Example(example_id=imp.event_id, impression=imp, click=int(click[i]), conversion=int(conv[i]),
                                click_ts=c_ts, conversion_ts=v_ts, decided="window_closed", emitted_ts=int(at[i]))
            rows.append((int(at[i]), i, ex))
            continue
        c_seen = c_ts if click[i] and cd[i] <= e else None
        v_seen = v_ts if conv[i] and vd[i] <= e else None
        rows.append((int(at[i]), i, schema.Example(
            example_id=imp.event_id, impression=imp, click=int(c_seen is not None), conversion=int(v_seen is not None),
            click_ts=c_seen, conversion_ts=v_seen, decided="elapsed", emitted_ts=int(at[i]))))
        if policy == "naive":
            continue
        if click[i] and c_seen is None:
            rows.append((c_ts, i, schema.Example(
                example_id=imp.event_id + "#late-click", impression=imp, click=1,
                conversion=int(v_ts is not None and v_ts <= c_ts), click_ts=c_ts,
                conversion_ts=v_ts if v_ts is not None and v_ts <= c_ts else None, decided="late_positive",
                emitted_ts=c_ts)))
        if conv[i] and v_seen is None:
            rows.append((v_ts, i, schema.Example(
                example_id=imp.event_id + "#late-conversion", impression=imp, click=1, conversion=1,
                click_ts=c_ts, conversion_ts=v_ts, decided="late_positive", emitted_ts=v_ts)))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def truth_arrays(sim) -> dict[str, np.ndarray]:
    """Truth columns as numpy (index = impression order of :func:`impressions`)."""
    t = sim.truth
    return {"domain": np.asarray(t.column("domain").to_pylist(), dtype=object), "ts": t.column("ts").to_numpy(),
            "click": t.column("click").to_numpy().astype(np.float64),
            "conversion": t.column("conversion").to_numpy().astype(np.float64),
            "p_click": t.column("p_click").to_numpy(), "p_ctcvr": t.column("p_click").to_numpy()
            * t.column("p_cvr").to_numpy()}


def impression_index(example_id: str) -> int:
    """The impression index (truth-table order) of an example of the ``oracle`` or ``window`` policy: its id is
    the impression's, ``imp-<seed>-<i>``."""
    return int(example_id.rsplit("-", 1)[1])


def progressive(learner, exs: list[schema.Example], n: int, *, batch: int,
                before: Callable[[int, list[schema.Example]], None] | None = None,
                features: Callable[[list[schema.Example]], object] | None = None,
                beside: Callable[[list[schema.Example], object, object], None] | None = None) -> np.ndarray:
    """Train ``learner`` (:class:`trainer.model.Learner`) on ``exs`` in batches of ``batch``, in order; returns
    its progressive p_click by :func:`impression_index`, ``(n,)``, NaN where no example was scored. Per batch
    ``j`` (``chunk``): ``before(j, chunk)`` (what the batch's features read must stand by then: a store fed, a
    teacher scored), ``fb = features(chunk)`` (default ``featurize(chunk, learner.tcfg)``),
    ``r = learner.train_step(fb)``, then ``beside(chunk, fb, r)`` (what else learns from the batch or is
    recorded with it: early stages, cohort keys, what the model publishes)."""
    from trainer.features import featurize

    out = np.full(n, np.nan)
    for j, i in enumerate(range(0, len(exs), batch)):
        chunk = exs[i:i + batch]
        if before is not None:
            before(j, chunk)
        fb = featurize(chunk, learner.tcfg) if features is None else features(chunk)
        r = learner.train_step(fb)
        out[[impression_index(e.example_id) for e in chunk]] = r.p_click
        if beside is not None:
            beside(chunk, fb, r)
    return out
