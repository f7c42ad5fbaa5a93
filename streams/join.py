"""Attribution join of one input partition: impressions + clicks + conversions -> labelled examples.

Pure logic, no broker: :func:`step` is ``(state, batch, now_ms) -> (state, outputs)`` in the shape of
Bytewax's ``stateful_map``; the labels dataflow (``streams/labels.py``) runs one :class:`JoinState` per
Kafka partition number (impressions, clicks and conversions of a user share that number).

Policy ``window``: an impression is emitted once, as an :class:`schema.Example`, when the partition's event
time passes ``impression.ts + max(click window, conversion window)``. ``click`` is 1 iff a click with
``0 <= click.ts - imp.ts <= click window`` joined (``conversion`` likewise with its own window).

Every input record is accounted for: it is used in an example (impressions and joined feedback), or it
becomes a :class:`schema.DeadLetter` with a reason (undecodable, duplicate event id, feedback outside its
window, feedback for an impression already emitted, orphan feedback whose impression never came).
Watermark records only move time.

Event time of the partition: the max ``ts`` seen per input topic; the partition's time is the minimum over
the topics that are not caught up (a topic-partition at its end does not hold time back), so windows do
not close before a slower topic has been read. A :class:`schema.Watermark` sets its topic's time.

Memory is bounded by the window: an impression's state is dropped when it is emitted; the ids of emitted
impressions and of seen feedback are kept only for one more window (for duplicate / late detection).

>>> cfg = JoinConfig(("imp", "clk", "cnv"), click_window_ms=60_000, conversion_window_ms=60_000)
>>> st = JoinState(cfg)
>>> t0 = 1_700_000_000_000
>>> imp = schema.Impression(event_id="i1", ts=t0, user_id=1, ad_id=1, campaign_id=1, advertiser_id=1,
...                         domain="feed")
>>> clk = schema.Click(event_id="c1", impression_id="i1", ts=t0 + 5_000, user_id=1)
>>> wm = schema.Watermark(ts=t0 + 3_600_000)
>>> batch = SourceBatch(0, (("imp", 0, 0, schema.encode(imp)), ("clk", 0, 0, schema.encode(clk)),
...                      ("imp", 0, 1, schema.encode(wm)), ("clk", 0, 1, schema.encode(wm)),
...                      ("cnv", 0, 0, schema.encode(wm))), frozenset())
>>> st, out = step(st, batch, now_ms=0)
>>> [(o.example_id, o.click, o.conversion, o.click_ts - t0, o.decided) for o in out]
[('i1', 1, 0, 5000, 'end_of_stream')]
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import NamedTuple, Union


from streams import schema

RawMsg = tuple[str, int, int, bytes]  # (topic, partition, offset, value bytes) as read from Kafka
Output = Union[schema.Example, schema.DeadLetter]
POLICIES = ("window", "elapsed")
IMP, CLICK, CONV = 0, 1, 2
_KIND_NAME = ("impression", "click", "conversion")
STEP_DECODE = "labels.decode"
STEP_JOIN = "labels.join"


class SourceBatch(NamedTuple):
    """One item of the labels dataflow: raw messages of one partition number, in arrival order.

    ``caught_up`` names the input topics whose partition reached its end (EOF) after these messages.
    """

    partition: int
    msgs: tuple[RawMsg, ...]
    caught_up: frozenset[str]


@dataclass(frozen=True)
class JoinConfig:
    """``topics``: (impressions, clicks, conversions) topic names; windows in milliseconds."""

    topics: tuple[str, str, str]
    click_window_ms: int
    conversion_window_ms: int
    policy: str = "window"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"labels.policy: expected one of {POLICIES}, got {self.policy!r}")
        if self.policy != "window":
            raise ValueError(f"labels.policy {self.policy!r} is not implemented yet; use 'window'")
        if min(self.click_window_ms, self.conversion_window_ms) < 0:
            raise ValueError(f"labels windows must be >= 0 ms, got click={self.click_window_ms} "
                             f"conversion={self.conversion_window_ms}")
        if len(set(self.topics)) != 3:
            raise ValueError(f"labels: impressions, clicks and conversions need 3 distinct topics, got {self.topics}")

    @classmethod
    def from_config(cls, cfg) -> JoinConfig:
        """From a :class:`streams.config.Config`."""
        return cls(cfg.topics.input_topics(), cfg.labels.click_window_s * 1000,
                   cfg.labels.conversion_window_s * 1000, cfg.labels.policy)

    @property
    def max_window_ms(self) -> int:
        return max(self.click_window_ms, self.conversion_window_ms)

    def window_ms(self, kind: int) -> int:
        return self.click_window_ms if kind == CLICK else self.conversion_window_ms


# A pending impression: (impression, first click ts | None, first conversion ts | None). Immutable, so a
# snapshot is a shallow copy of the dict.
Pending = tuple[schema.Impression, Union[int, None], Union[int, None]]
# Buffered feedback waiting for its impression: (kind, event, raw message).
Orphan = tuple[int, Union[schema.Click, schema.Conversion], RawMsg]


class JoinState:
    """Join state of one partition. Mutated in place by :func:`step`; :meth:`snapshot` is cheap.

    Sizes: ``pending`` <= impressions of one window; ``orphans`` <= feedback of one window;
    ``done``/``seen_fb`` <= ids of about two windows.
    """

    __slots__ = ("cfg", "data_ts", "wm_ts", "caught_up", "pending", "deadlines", "orphans", "orphan_heap",
                 "done", "seen_fb", "expiry", "counts")

    def __init__(self, cfg: JoinConfig):
        self.cfg = cfg
        self.data_ts: list[int | None] = [None, None, None]  # max event ts per input topic (data only)
        self.wm_ts: list[int | None] = [None, None, None]  # max watermark per input topic
        self.caught_up = [False, False, False]
        self.pending: dict[str, Pending] = {}
        self.deadlines: list[tuple[int, str]] = []  # heap of (close time, impression id)
        self.orphans: dict[str, tuple[Orphan, ...]] = {}  # impression id -> feedback waiting for it
        self.orphan_heap: list[tuple[int, str, str]] = []  # (expiry, impression id, feedback id)
        self.done: dict[str, int] = {}  # emitted impression id -> forget after this event time
        self.seen_fb: dict[str, int] = {}  # feedback event id -> forget after this event time
        self.expiry: list[tuple[int, int, str]] = []  # heap of (time, 0=done/1=seen_fb, id)
        self.counts = {"events_in": 0, "examples_out": 0, "dead_letters": 0, "feedback_joined": 0}

    def snapshot(self) -> tuple:
        """An immutable-enough copy for Bytewax recovery: shallow copies over immutable values."""
        return (self.cfg, tuple(self.data_ts), tuple(self.wm_ts), tuple(self.caught_up), dict(self.pending),
                list(self.deadlines), dict(self.orphans), list(self.orphan_heap), dict(self.done),
                dict(self.seen_fb), list(self.expiry), dict(self.counts))

    @classmethod
    def restore(cls, snap: tuple) -> JoinState:
        st = cls(snap[0])
        (_, data_ts, wm_ts, caught_up, st.pending, st.deadlines, st.orphans, st.orphan_heap, st.done, st.seen_fb,
         st.expiry, st.counts) = snap
        st.data_ts, st.wm_ts, st.caught_up = list(data_ts), list(wm_ts), list(caught_up)
        st.pending, st.orphans, st.done, st.seen_fb = dict(st.pending), dict(st.orphans), dict(st.done), dict(st.seen_fb)
        st.deadlines, st.orphan_heap, st.expiry, st.counts = (list(st.deadlines), list(st.orphan_heap),
                                                              list(st.expiry), dict(st.counts))
        return st

    def n_pending(self) -> int:
        """Impressions waiting for their window plus buffered feedback."""
        return len(self.pending) + sum(len(v) for v in self.orphans.values())

    def time(self) -> int | None:
        """The partition's event time (None until every not-caught-up topic has a time)."""
        return _min_time([_max(d, w) for d, w in zip(self.data_ts, self.wm_ts)], self.caught_up)

    def data_time(self) -> int | None:
        """Like :meth:`time` but from event timestamps only, ignoring watermarks."""
        return _min_time(self.data_ts, self.caught_up)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _min_time(ts: list[int | None], caught_up: list[bool]) -> int | None:
    live = [t for t, c in zip(ts, caught_up) if not c]
    if not live:  # everything read: nothing holds time back
        known = [t for t in ts if t is not None]
        return max(known) if known else None
    return None if None in live else min(live)


def step(state: JoinState, batch: SourceBatch, now_ms: int) -> tuple[JoinState, list[Output]]:
    """Process one batch of raw messages, then close every window the partition's time has passed.

    ``now_ms`` (wall clock) stamps ``emitted_ts`` of examples and ``ts`` of dead letters. Returns the same
    (mutated) state object and the outputs: examples and dead letters, shape ``list[Example | DeadLetter]``.
    """
    cfg, out = state.cfg, []
    kinds = {cfg.topics[0]: IMP, cfg.topics[1]: CLICK, cfg.topics[2]: CONV}
    for msg in batch.msgs:
        topic_kind = kinds.get(msg[0])
        ev = schema.decode(msg[3])
        if topic_kind is None:
            out.append(_dead(f"message from unexpected topic {msg[0]!r} (expected one of {cfg.topics})", msg,
                             now_ms, STEP_DECODE))
            continue
        if isinstance(ev, schema.Watermark):
            state.wm_ts[topic_kind] = _max(state.wm_ts[topic_kind], ev.ts)
            continue
        state.counts["events_in"] += 1
        if isinstance(ev, schema.Invalid):
            out.append(_dead(ev.reason, msg, now_ms, STEP_DECODE))
            continue
        kind = IMP if isinstance(ev, schema.Impression) else CLICK if isinstance(ev, schema.Click) else CONV
        if kind != topic_kind:
            out.append(_dead(f"{_KIND_NAME[kind]} record on the {_KIND_NAME[topic_kind]} topic {msg[0]!r}", msg,
                             now_ms, STEP_DECODE))
            continue
        state.data_ts[kind] = _max(state.data_ts[kind], ev.ts)
        if kind == IMP:
            _on_impression(state, ev, msg, now_ms, out)
        else:
            _on_feedback(state, kind, ev, msg, now_ms, out)
    for topic, kind in kinds.items():
        state.caught_up[kind] = topic in batch.caught_up
    t = state.time()
    if t is not None:
        _advance(state, t, now_ms, out)
    state.counts["examples_out"] += sum(1 for o in out if isinstance(o, schema.Example))
    state.counts["dead_letters"] += sum(1 for o in out if isinstance(o, schema.DeadLetter))
    return state, out


def flush(state: JoinState, now_ms: int) -> tuple[JoinState, list[Output]]:
    """End of a finite input: emit every pending impression (``end_of_stream``), dead-letter orphans."""
    out: list[Output] = []
    _advance(state, schema.MAX_TS_MS + 1, now_ms, out, final=True)
    state.counts["examples_out"] += sum(1 for o in out if isinstance(o, schema.Example))
    state.counts["dead_letters"] += sum(1 for o in out if isinstance(o, schema.DeadLetter))
    return state, out




def _dead(reason: str, msg: RawMsg, now_ms: int, step_id: str = STEP_JOIN) -> schema.DeadLetter:
    return schema.dead_letter(reason, msg[3], topic=msg[0], partition=msg[1], offset=msg[2], ts=now_ms, step=step_id)


def _forget_later(state: JoinState, table: int, key: str, at: int) -> None:
    (state.done if table == 0 else state.seen_fb)[key] = at
    heapq.heappush(state.expiry, (at, table, key))


def _on_impression(state: JoinState, imp: schema.Impression, msg: RawMsg, now_ms: int, out: list) -> None:
    iid = imp.event_id
    if iid in state.pending or iid in state.done:
        out.append(_dead(f"duplicate event_id: impression {iid!r} seen before", msg, now_ms))
        return
    click_ts = conv_ts = None
    for kind, fb, raw in state.orphans.pop(iid, ()):
        if not 0 <= fb.ts - imp.ts <= state.cfg.window_ms(kind):
            out.append(_dead(_outside(kind, fb, imp, state.cfg), raw, now_ms))
            continue
        state.counts["feedback_joined"] += 1
        if kind == CLICK:
            click_ts = fb.ts if click_ts is None else min(click_ts, fb.ts)
        else:
            conv_ts = fb.ts if conv_ts is None else min(conv_ts, fb.ts)
    state.pending[iid] = (imp, click_ts, conv_ts)
    heapq.heappush(state.deadlines, (imp.ts + state.cfg.max_window_ms, iid))


def _outside(kind: int, fb, imp: schema.Impression, cfg: JoinConfig) -> str:
    return (f"{_KIND_NAME[kind]} outside attribution window: {fb.ts - imp.ts} ms after impression "
            f"{imp.event_id!r}, window [0, {cfg.window_ms(kind)}] ms")


def _on_feedback(state: JoinState, kind: int, fb, msg: RawMsg, now_ms: int, out: list) -> None:
    name, window = _KIND_NAME[kind], state.cfg.window_ms(kind)
    if fb.event_id in state.seen_fb:
        out.append(_dead(f"duplicate event_id: {name} {fb.event_id!r} seen before", msg, now_ms))
        return
    _forget_later(state, 1, fb.event_id, fb.ts + window + state.cfg.max_window_ms)
    iid = fb.impression_id
    pending = state.pending.get(iid)
    if pending is not None:
        imp, click_ts, conv_ts = pending
        if not 0 <= fb.ts - imp.ts <= window:
            out.append(_dead(_outside(kind, fb, imp, state.cfg), msg, now_ms))
            return
        state.counts["feedback_joined"] += 1
        if kind == CLICK:
            state.pending[iid] = (imp, fb.ts if click_ts is None else min(click_ts, fb.ts), conv_ts)
        else:
            state.pending[iid] = (imp, click_ts, fb.ts if conv_ts is None else min(conv_ts, fb.ts))
    elif iid in state.done:
        out.append(_dead(f"late {name}: impression {iid!r} already emitted", msg, now_ms))
    else:
        t = state.time()
        if t is not None and t > fb.ts + window:
            out.append(_dead(f"orphan {name}: no impression {iid} within window", msg, now_ms))
            return
        state.orphans[iid] = state.orphans.get(iid, ()) + ((kind, fb, msg),)
        heapq.heappush(state.orphan_heap, (fb.ts + window, iid, fb.event_id))


def _advance(state: JoinState, t: int, now_ms: int, out: list, final: bool = False) -> None:
    """Close impressions whose deadline ``t`` passed; expire orphans and remembered ids."""
    data_t = state.data_time()
    heap = state.deadlines
    while heap and heap[0][0] < t:
        deadline, iid = heapq.heappop(heap)
        pending = state.pending.pop(iid, None)
        if pending is None:
            continue
        imp, click_ts, conv_ts = pending
        decided = "window_closed" if not final and data_t is not None and data_t > deadline else "end_of_stream"
        out.append(schema.Example(example_id=iid, impression=imp, click=int(click_ts is not None),
                                  conversion=int(conv_ts is not None), click_ts=click_ts, conversion_ts=conv_ts,
                                  decided=decided, emitted_ts=now_ms))
        _forget_later(state, 0, iid, deadline + state.cfg.max_window_ms)
    oh = state.orphan_heap
    while oh and oh[0][0] < t:
        _, iid, fid = heapq.heappop(oh)
        waiting = state.orphans.get(iid)
        if not waiting:
            continue
        keep = tuple(o for o in waiting if o[1].event_id != fid)
        for kind, fb, raw in waiting:
            if fb.event_id == fid:
                out.append(_dead(f"orphan {_KIND_NAME[kind]}: no impression {iid} within window", raw, now_ms))
        if keep:
            state.orphans[iid] = keep
        else:
            del state.orphans[iid]
    ex = state.expiry
    while ex and ex[0][0] < t and not final:
        at, table, key = heapq.heappop(ex)
        d = state.done if table == 0 else state.seen_fb
        if d.get(key) == at:
            del d[key]
