"""Attribution join of one input partition: impressions + clicks + conversions -> labelled examples.

Pure logic, no broker: :func:`step` is ``(state, batch, now_ms) -> (state, outputs)`` in the shape of
Bytewax's ``stateful_map``; the labels dataflow (``streams/flows/labels.py``) runs one :class:`JoinState` per
Kafka partition number (impressions, clicks and conversions of a user share that number).

Outputs are already encoded, shape ``list[(kind, key, value)]``: ``(EXAMPLE, user-id key, Example JSON)`` or
``(DEAD, None, DeadLetter JSON)``. The hot path moves bytes, not objects: an impression is decoded once to
validate it, its state keeps the raw bytes (GC-untracked, cheap to snapshot), and the example's JSON splices
those bytes in (:func:`example_bytes`), so the impression is never re-encoded.

Policies (each objective has its own window; ``max window`` = the larger):

- ``window``: one example per impression when the partition's time passes ``ts + max window``;
  ``decided`` = ``window_closed`` (or ``end_of_stream`` when only a watermark / end of input closed it).
- ``elapsed`` (ES-DFM): the example leaves at ``ts + elapsed`` with the labels seen so far
  (``decided="elapsed"``); feedback arriving later inside its window emits a duplicate positive with id
  ``<impression id>#late-click`` / ``#late-conversion`` (``decided="late_positive"``); the state is kept
  until the max window closes.

Cold tier (``JoinConfig.store_dir``, set by the labels service to ``<labels.recovery_dir>/join-state``): an
impression stays whole in ``pending`` only for its hot time (the click window; under ``elapsed`` also until its
example left), then its tuple is compacted into a block of the partition's SQLite store
(``streams/flows/join_store.py``) and leaves memory; the snapshot keeps one entry per block, not per
impression. Feedback of a compacted impression joins it through the store's index and waits in ``Cold.fb``
(ES-DFM late positives read the block back); when the max window closes the block is read once, in ts order,
and its examples leave. The outputs are the same as without the cold tier (tests/test_join_state.py); recovery
rolls the store back to the restored snapshot (join_store's docstring). docs/joinstate.md has the numbers.

Every input record is accounted for: it is used (impressions and joined feedback) or becomes a dead letter
with a reason (too large, undecodable/invalid, timestamp in the future, impression older than its window,
duplicate event id, feedback outside its window, late feedback, orphan). ``state.counts`` counts them, dead
letters also per reason category (``dead.<category>``). Watermark records only move time.

Event time of the partition: max ``ts`` per input topic; the partition's time is the minimum over the topics
that are not caught up (at EOF), so windows never close before a slower topic was read, and never later than
the wall clock (:meth:`JoinState.clock`). An end-of-log mark closes the windows of a finite log without
moving that time (:func:`_flush_log`).

>>> cfg = JoinConfig(("imp", "clk", "cnv"), click_window_ms=60_000, conversion_window_ms=60_000)
>>> st = JoinState(cfg)
>>> t0 = 1_700_000_000_000
>>> imp = schema.Impression(event_id="i1", ts=t0, user_id=1, ad_id=1, campaign_id=1, advertiser_id=1,
...                         domain="feed")
>>> clk = schema.Click(event_id="c1", impression_id="i1", ts=t0 + 5_000, user_id=1)
>>> wm = schema.encode(schema.Watermark(ts=t0 + 3_600_000))
>>> batch = SourceBatch(0, (("imp", 0, 0, schema.encode(imp)), ("clk", 0, 0, schema.encode(clk)),
...                      ("imp", 0, 1, wm), ("clk", 0, 1, wm), ("cnv", 0, 0, wm)), frozenset())
>>> st, out = step(st, batch, now_ms=t0 + 10**7)
>>> ex = schema.decode(out[0][2], schema.Example)
>>> (out[0][1], ex.example_id, ex.click, ex.conversion, ex.click_ts - t0, ex.decided, ex.impression == imp)
(b'1', 'i1', 1, 0, 5000, 'end_of_stream', True)
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec

from streams import schema
from config import LabelsConfig
from streams.flows import join_store
from streams.names import Stat, Step

RawMsg = tuple[str, int, int, bytes]  # (topic, partition, offset, value bytes) as read from Kafka
Output = tuple[int, bytes | None, bytes]  # (EXAMPLE | DEAD, key, encoded record)
EXAMPLE, DEAD = 0, 1
POLICIES = ("window", "elapsed")
IMP, CLICK, CONV = 0, 1, 2
_KIND_NAME = ("impression", "click", "conversion")
_LATE_SUFFIX = ("", "#late-click", "#late-conversion")
# every dead letter of the flow carries the full id of its Bytewax step; the reason's category says why
STEP = Step.LABELS_JOIN
# reason categories of records that are no valid event (the rest: valid events the join refuses)
MALFORMED = ("too large", "unexpected topic", "wrong topic", "schema", "unparseable", "invalid", "future timestamp")
MAX_MSG_BYTES = 64 * 1024  # larger input records are dead letters before any parsing
FUTURE_TOLERANCE_MS = 24 * 3600 * 1000  # event ts this far past the wall clock: a broken clock, dead letter
FLUSH_MS = 60_000  # spilled impressions wait at most this long (event time) to be written as a block

def _TS(rec: tuple) -> int:
    return rec[1][1]



_decode = msgspec.json.Decoder(schema.Record).decode
_enc = msgspec.json.Encoder().encode


class OutBatch(NamedTuple):
    """What the join step emits per batch: encoded records and the partition's gauges."""

    records: list[Output]  # (EXAMPLE | DEAD, key, encoded record)
    counts: dict
    pending: int
    state: tuple[int, int, int] = (0, 0, 0)  # JoinState.gauges(): bytes in memory, bytes on disk, compacted


class SourceBatch(NamedTuple):
    """One item of the labels dataflow: raw messages of one partition number, in arrival order.

    ``caught_up`` names the input topics whose partition reached its end (EOF) after these messages.
    """

    partition: int
    msgs: tuple[RawMsg, ...]
    caught_up: frozenset[str]


@dataclass(frozen=True)
class JoinConfig:
    """``topics``: (impressions, clicks, conversions) topic names; windows and ``elapsed_ms`` in ms."""

    topics: tuple[str, str, str]
    click_window_ms: int
    conversion_window_ms: int
    policy: str = "window"
    elapsed_ms: int = LabelsConfig().elapsed_s * 1000
    future_tolerance_ms: int | None = FUTURE_TOLERANCE_MS  # None: no wall-clock check (replays of fake time)
    # Directory of the cold tier (streams/flows/join_store.py; one SQLite file per partition); None: every
    # impression stays in memory until its window closes.
    store_dir: str | None = None
    max_window_ms: int = field(init=False)
    elapsed: bool = field(init=False)  # the elapsed policy emits before the windows close
    # How long an impression stays whole in memory: the max window, or with a cold tier the click window (and
    # the elapsed wait under the elapsed policy); after that it is compacted to the cold tier
    hot_ms: int = field(init=False)
    spills: bool = field(init=False)  # hot_ms < max window: impressions move to the cold tier

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"labels.policy: expected one of {POLICIES}, got {self.policy!r}")
        if min(self.click_window_ms, self.conversion_window_ms, self.elapsed_ms) < 0:
            raise ValueError(f"labels windows must be >= 0 ms, got click={self.click_window_ms} "
                             f"conversion={self.conversion_window_ms} elapsed={self.elapsed_ms}")
        if len(set(self.topics)) != 3:
            raise ValueError(f"labels: impressions, clicks and conversions need 3 distinct topics, got {self.topics}")
        object.__setattr__(self, "max_window_ms", max(self.click_window_ms, self.conversion_window_ms))
        object.__setattr__(self, "elapsed", self.policy == "elapsed" and self.elapsed_ms < self.max_window_ms)
        hot = max(self.click_window_ms, self.elapsed_ms if self.elapsed else 0)
        spills = self.store_dir is not None and hot < self.max_window_ms
        object.__setattr__(self, "hot_ms", hot if spills else self.max_window_ms)
        object.__setattr__(self, "spills", spills)

    @classmethod
    def from_config(cls, cfg) -> JoinConfig:
        """From a :class:`config.Config`."""
        lab = cfg.labels
        return cls(cfg.topics.input_topics(), lab.click_window_s * 1000, lab.conversion_window_s * 1000,
                   lab.policy, int(lab.elapsed_s * 1000))

    def window_ms(self, kind: int) -> int:
        return self.click_window_ms if kind == CLICK else self.conversion_window_ms


# A pending impression: (raw bytes, ts, user key, first click ts | None, first conversion ts | None, emitted).
# Atomic values only: GC-untracked and a snapshot is a shallow dict copy.
Pending = tuple[bytes, int, bytes, int | None, int | None, bool]
# Buffered feedback waiting for its impression: (kind, feedback id, feedback ts, raw message).
Orphan = tuple[int, str, int, RawMsg]


class JoinState:
    """Join state of one partition. Mutated in place by :func:`step`; :meth:`snapshot` is cheap.

    Sizes: ``pending`` <= impressions of one window; ``orphans`` <= feedback of one window;
    ``done``/``seen_fb`` <= ids of about two windows.
    """

    __slots__ = (
        "caught_up",
        "cfg",
        "cold",
        "counts",
        "data_ts",
        "done",
        "eol_done",
        "eol_ts",
        "fifo",
        "gen_start",
        "late",
        "orphan_heap",
        "orphans",
        "pending",
        "seen_fb",
        "wm_ts",
    )

    def __init__(self, cfg: JoinConfig):
        self.cfg = cfg
        self.data_ts: list[int | None] = [None, None, None]  # max event ts per input topic (data only)
        self.wm_ts: list[int | None] = [None, None, None]  # max watermark per input topic
        # End-of-log marks per input topic, and the mark the state was last flushed to (see flush_log)
        self.eol_ts: list[int | None] = [None, None, None]
        self.eol_done: int | None = None
        self.caught_up = [False, False, False]
        self.pending: dict[str, Pending] = {}
        # Deadlines (time, impression id) per stage (0 = elapsed emission, 1 = window close): impressions mostly
        # arrive in time order, so a FIFO takes them at O(1); an out-of-order one goes to the stage's heap.
        self.fifo: tuple[deque, deque] = (deque(), deque())
        self.late: tuple[list, list] = ([], [])
        self.orphans: dict[str, tuple[Orphan, ...]] = {}  # impression id -> feedback waiting for it
        self.orphan_heap: list[tuple[int, str, str]] = []  # (expiry, impression id, feedback id)
        # Ids of closed impressions and of seen feedback, in two generations (current, previous): the previous
        # one is dropped when the partition time passed gen_start + max window, so an id is remembered for one
        # to two windows at O(1) cost (no per-id expiry heap).
        self.done: tuple[set[str], set[str]] = (set(), set())
        self.seen_fb: tuple[set[str], set[str]] = (set(), set())
        self.gen_start: int | None = None
        self.counts: dict[str, int] = {k.value: 0 for k in (Stat.EVENTS_IN, Stat.EXAMPLES_OUT, Stat.DEAD_LETTERS,
                                                            Stat.FEEDBACK_JOINED, Stat.LATE_POSITIVES)}
        self.cold = Cold() if cfg.spills else None  # the cold tier (None: everything stays in memory)

    def snapshot(self) -> tuple:
        """An immutable-enough copy for Bytewax recovery: shallow copies over immutable values. With a cold
        tier, the copy also closes a generation of the on-disk store (:meth:`Cold.snapshot`)."""
        return (self.cfg, tuple(self.data_ts), tuple(self.wm_ts), tuple(self.caught_up), dict(self.pending),
                (deque(self.fifo[0]), deque(self.fifo[1])), (list(self.late[0]), list(self.late[1])),
                dict(self.orphans), list(self.orphan_heap),
                (set(self.done[0]), self.done[1]), (set(self.seen_fb[0]), self.seen_fb[1]), self.gen_start,
                dict(self.counts), tuple(self.eol_ts), self.eol_done,
                None if self.cold is None else self.cold.snapshot())

    @classmethod
    def restore(cls, snap: tuple, store_dir: str | None = None) -> JoinState:
        """The state of ``snap``; ``store_dir``: where the cold tier's files are now (default: where the
        snapshot's config says), made consistent with the snapshot."""
        old = snap[0]  # rebuilt: a config pickled before a field existed lacks it
        cfg = JoinConfig(old.topics, old.click_window_ms, old.conversion_window_ms, old.policy, old.elapsed_ms,
                         old.future_tolerance_ms, store_dir if store_dir is not None else getattr(old, "store_dir", None))
        st = cls(cfg)
        (_, data_ts, wm_ts, caught_up, pending, fifo, late, orphans, orphan_heap, done, seen_fb, st.gen_start,
         counts) = snap[:13]
        if len(snap) > 13:  # snapshots written before end-of-log marks existed have 13 fields
            st.eol_ts, st.eol_done = list(snap[13]), snap[14]
        st.data_ts, st.wm_ts, st.caught_up = list(data_ts), list(wm_ts), list(caught_up)
        st.pending, st.orphans = dict(pending), dict(orphans)
        # the previous generation is never mutated, only replaced: sharing it with the snapshot is safe
        st.done, st.seen_fb = (set(done[0]), done[1]), (set(seen_fb[0]), seen_fb[1])
        st.fifo, st.late = (deque(fifo[0]), deque(fifo[1])), (list(late[0]), list(late[1]))
        st.orphan_heap = list(orphan_heap)
        st.counts = {**st.counts, **counts}
        if st.cold is not None:
            st.cold = Cold.restore(snap[15] if len(snap) > 15 else None, cfg.store_dir)
        return st

    def n_pending(self) -> int:
        """Impressions waiting for their window (in memory and compacted) plus buffered feedback."""
        return len(self.pending) + sum(len(v) for v in self.orphans.values()) + (self.cold.n if self.cold else 0)

    def gauges(self) -> tuple[int, int, int]:
        """(state bytes in memory (estimate), bytes on disk, impressions compacted to the cold tier now)."""
        c = self.cold
        return self.memory_bytes(), (c.disk_bytes() if c else 0), (c.n if c else 0)

    def memory_bytes(self, sample: int = 64) -> int:
        """Estimated bytes of this state in memory: container sizes plus the mean size of up to ``sample``
        entries of each collection times its length (``sys.getsizeof``; shared objects counted once)."""
        n = sys.getsizeof(self.pending) + _sampled(self.pending.items(), len(self.pending), sample)
        for q in (*self.fifo, *self.late):
            n += sys.getsizeof(q) + _sampled(q, len(q), sample)
        for ids in (*self.done, *self.seen_fb):
            n += sys.getsizeof(ids) + _sampled(ids, len(ids), sample)
        n += sys.getsizeof(self.orphans) + _sampled(self.orphans.items(), len(self.orphans), sample)
        n += sys.getsizeof(self.orphan_heap) + _sampled(self.orphan_heap, len(self.orphan_heap), sample)
        if self.cold is not None:
            n += self.cold.memory_bytes(sample)
        return n

    def time(self) -> int | None:
        """The partition's event time (None until every not-caught-up topic has a time)."""
        return _min_time([_max(d, w) for d, w in zip(self.data_ts, self.wm_ts)], self.caught_up)

    def data_time(self) -> int | None:
        """Like :meth:`time` but from event timestamps only, ignoring watermarks."""
        return _min_time(self.data_ts, self.caught_up)

    def clock(self, now_ms: int) -> int | None:
        """The time windows close by: :meth:`time`, never past the wall clock ``now_ms`` while the wall-clock
        check is on. Event time must not run ahead of reality: one event or watermark from the future would
        otherwise close the windows of live traffic early and turn its feedback into orphans."""
        t = self.time()
        return t if t is None or self.cfg.future_tolerance_ms is None else min(t, now_ms)


def _deep(o) -> int:
    """Bytes of ``o`` and what it holds (tuples, strings, bytes, ints: the state's entries)."""
    n = sys.getsizeof(o)
    if type(o) is tuple:
        n += sum(_deep(x) for x in o)
    return n


def _sampled(items, length: int, sample: int) -> int:
    if not length:
        return 0
    got = [_deep(x) for x in itertools.islice(items, sample)]
    return int(sum(got) / len(got) * length)


class Cold:
    """The cold tier of one partition's state: the part Bytewax snapshots (small: per block, not per
    impression) and the store it names (``streams/flows/join_store.py``; opened at the first compaction, when
    the partition number is known).

    ``spill``: ids in ``pending`` whose hot time passed, written as one block when BLOCK_ROWS are there or
    the first of them would close soon; ``blocks``: heap of (next close deadline, block id, position of
    the next record to close) of blocks with records still open; ``fb``: feedback joined to compacted
    impressions, id -> (click ts, conversion ts); ``expire``: (time to forget, block id) of blocks whose
    records all left (their ids are remembered one more window); ``trash``: (generation, block id) of
    forgotten blocks not yet deleted for good; ``close_t``: the time of the last close pass (a compacted
    impression with ts + max window < close_t has left); ``spill_t``: the time of the last pass that compacted.
    """

    __slots__ = ("blocks", "close_t", "expire", "fb", "gen", "n", "next_block", "partition", "spill",
                 "spill_min_ts", "spill_since", "spill_t", "store", "trash", "trashed")

    def __init__(self):
        self.partition: int | None = None
        self.store: join_store.ColdStore | None = None
        self.gen = 1  # the generation being written; a snapshot closes it
        self.next_block = 0
        self.spill: list[str] = []
        self.spill_min_ts: int | None = None
        self.spill_since: int | None = None
        self.blocks: list[tuple[int, int, int]] = []
        self.fb: dict[str, tuple[int | None, int | None]] = {}
        self.expire: deque[tuple[int, int]] = deque()
        self.trash: list[tuple[int, int]] = []
        self.trashed: set[int] = set()
        self.close_t: int | None = None
        self.spill_t: int | None = None
        self.n = 0  # compacted impressions whose window is open

    def open_store(self, cfg: JoinConfig, partition: int, hw: int) -> None:
        self.partition = partition
        self.store = join_store.ColdStore(Path(cfg.store_dir) / f"join-{partition}.sqlite3")
        self.store.open(hw)

    def snapshot(self) -> tuple:
        hw = self.gen
        if self.store is not None:
            old = [(g, b) for g, b in self.trash if g <= hw - join_store.KEEP_GENS]
            if old:
                self.store.purge([b for _, b in old], hw - join_store.KEEP_GENS)
                self.trash = [(g, b) for g, b in self.trash if g > hw - join_store.KEEP_GENS]
                self.trashed.difference_update(b for _, b in old)
        self.gen += 1
        return (self.partition, hw, self.next_block, list(self.spill), (self.spill_min_ts, self.spill_since),
                list(self.blocks),
                dict(self.fb), deque(self.expire), list(self.trash), self.close_t, self.spill_t, self.n)

    @classmethod
    def restore(cls, snap: tuple | None, store_dir: str) -> Cold:
        c = cls()
        if snap is None:
            return c
        (partition, hw, c.next_block, spill, (c.spill_min_ts, c.spill_since), blocks, fb, expire, trash, c.close_t,
         c.spill_t, c.n) = snap
        c.spill, c.blocks, c.fb, c.expire, c.trash = list(spill), list(blocks), dict(fb), deque(expire), list(trash)
        c.trashed = {b for _, b in c.trash}
        c.gen = hw + 1
        if partition is not None:
            c.partition = partition
            c.store = join_store.ColdStore(Path(store_dir) / f"join-{partition}.sqlite3")
            c.store.open(hw)
        return c

    def lookup(self, iid: str) -> tuple[int, int, int] | None:
        """(ts, block, bits) of a compacted impression still remembered, or None."""
        if self.store is None:
            return None
        return self.store.lookup(iid, self.trashed)

    def disk_bytes(self) -> int:
        return 0 if self.store is None else self.store.disk_bytes()

    def memory_bytes(self, sample: int) -> int:
        n = sum(sys.getsizeof(x) for x in (self.spill, self.blocks, self.fb, self.expire, self.trash, self.trashed))
        n += _sampled(self.blocks, len(self.blocks), sample) + _sampled(self.fb.items(), len(self.fb), sample)
        n += _sampled(self.expire, len(self.expire), sample) + _sampled(self.trash, len(self.trash), sample)
        n += 8 * len(self.spill) + 40 * len(self.trashed)  # the spilled ids are counted in pending
        return n + (0 if self.store is None else self.store.memory_bytes())


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _min_time(ts: list[int | None], caught_up: list[bool]) -> int | None:
    live = [t for t, c in zip(ts, caught_up) if not c]
    if not live:  # everything read: nothing holds time back
        known = [t for t in ts if t is not None]
        return max(known) if known else None
    return None if None in live else min(live)


def example_bytes(example_id: str, raw_imp: bytes, click_ts: int | None, conv_ts: int | None, decided: str,
                  now_ms: int) -> bytes:
    """JSON of a :class:`schema.Example` with the impression's validated raw bytes spliced in (no re-encode)."""
    return b'{"type":"example","example_id":%b,"impression":%b,"click":%d,"conversion":%d,"click_ts":%b,' \
           b'"conversion_ts":%b,"decided":"%b","weight":1.0,"emitted_ts":%d}' % (
               _enc(example_id), raw_imp, click_ts is not None, conv_ts is not None,
               b"null" if click_ts is None else b"%d" % click_ts, b"null" if conv_ts is None else b"%d" % conv_ts,
               decided.encode(), now_ms)


def _dead(state: JoinState, reason: str, msg: RawMsg, now_ms: int) -> Output:
    cat = reason.split(":", 1)[0][:40]
    key = Stat.DEAD_PREFIX.value + cat
    state.counts[key] = state.counts.get(key, 0) + 1
    dl = schema.dead_letter(reason, msg[3], topic=msg[0], partition=msg[1], offset=msg[2], ts=now_ms, step=STEP)
    return (DEAD, None, schema.encode(dl))


def step(state: JoinState, batch: SourceBatch, now_ms: int) -> tuple[JoinState, list[Output]]:
    """Process one batch of raw messages, then close every window the partition's time has passed.

    ``now_ms`` (wall clock) stamps ``emitted_ts`` of examples and ``ts`` of dead letters and bounds future
    timestamps. Returns the same (mutated) state object and the encoded outputs.
    """
    cfg, out, counts = state.cfg, [], state.counts
    topics = cfg.topics
    kinds = {topics[0]: IMP, topics[1]: CLICK, topics[2]: CONV}
    future = schema.MAX_TS_MS if cfg.future_tolerance_ms is None else now_ms + cfg.future_tolerance_ms
    t_start = state.clock(now_ms)
    too_old = None if t_start is None else t_start - cfg.max_window_ms
    n_in = 0
    pending, orphans, done, fifo1 = state.pending, state.orphans, state.done, state.fifo[1]
    hot, elapsed, cold = cfg.hot_ms, cfg.elapsed, state.cold
    # an impression older than this may have a twin in the cold tier: the general path looks it up
    cold_before = -1 if cold is None or cold.spill_t is None else cold.spill_t - hot
    if cold is not None and cold.partition is None:
        cold.open_store(cfg, batch.partition, cold.gen - 1)
    for msg in batch.msgs:
        topic_kind = kinds.get(msg[0])
        if topic_kind is None:
            out.append(_dead(state, f"unexpected topic: {msg[0]!r} (expected one of {topics})", msg, now_ms))
            continue
        raw = msg[3]
        if len(raw) > MAX_MSG_BYTES:
            n_in += 1
            out.append(_dead(state, f"too large: {len(raw)} bytes > {MAX_MSG_BYTES}", msg, now_ms))
            continue
        try:
            ev = _decode(raw)
        except msgspec.ValidationError as e:
            n_in += 1
            out.append(_dead(state, f"schema: {e}", msg, now_ms))
            continue
        except schema.DECODE_ERRORS as e:
            n_in += 1
            out.append(_dead(state, schema.unparseable(e), msg, now_ms))
            continue
        except Exception as e:  # noqa: BLE001 - bytes no one foresaw must not stop the flow either
            n_in += 1
            out.append(_dead(state, f"unparseable: {type(e).__name__}: {e}", msg, now_ms))
            continue
        cls = type(ev)
        if cls is schema.Watermark:
            marks = state.eol_ts if ev.source == schema.END_OF_LOG else state.wm_ts
            w = marks[topic_kind]
            if w is None or ev.ts > w:
                marks[topic_kind] = ev.ts
            continue
        n_in += 1
        kind = IMP if cls is schema.Impression else CLICK if cls is schema.Click else CONV
        reason = schema.check(ev)
        if reason is not None:
            out.append(_dead(state, f"invalid: {reason}", msg, now_ms))
            continue
        if kind != topic_kind:
            out.append(_dead(state, f"wrong topic: {_KIND_NAME[kind]} record on the {_KIND_NAME[topic_kind]} "
                                    f"topic {msg[0]!r}", msg, now_ms))
            continue
        ts = ev.ts
        if ts > future:
            out.append(_dead(state, f"future timestamp: ts {ts} is more than {cfg.future_tolerance_ms} ms after the "
                                    f"wall clock {now_ms}", msg, now_ms))
            continue
        d = state.data_ts[kind]
        if d is None or ts > d:
            state.data_ts[kind] = ts
        if kind == IMP:
            if too_old is not None and ts < too_old:
                out.append(_dead(state, f"stale impression: ts {ts} is before the partition time {t_start} minus "
                                        f"the window {cfg.max_window_ms} ms", msg, now_ms))
                continue
            iid = ev.event_id
            if elapsed or iid in pending or iid in orphans or iid in done[0] or iid in done[1] or ts < cold_before:
                _on_impression(state, ev, msg, now_ms, out, cold_before)  # the general path
                continue
            # the common case, inlined: a new impression, no feedback waiting, window policy
            pending[iid] = (raw, ts, b"%d" % ev.user_id, None, None, False)
            at = ts + hot
            if not fifo1 or fifo1[-1][0] <= at:
                fifo1.append((at, iid))
            else:
                heapq.heappush(state.late[1], (at, iid))
        else:
            _on_feedback(state, kind, ev, msg, now_ms, out)
    counts[Stat.EVENTS_IN] += n_in
    for topic, kind in kinds.items():
        state.caught_up[kind] = topic in batch.caught_up
    t = state.clock(now_ms)
    if t is not None:
        _advance(state, t, now_ms, out)
    _flush_log(state, now_ms, out)
    _count(state, out)
    return state, out


def flush(state: JoinState, now_ms: int) -> tuple[JoinState, list[Output]]:
    """End of a finite input: emit every pending impression (``end_of_stream``), dead-letter orphans."""
    out: list[Output] = []
    _advance(state, schema.MAX_TS_MS + 1, now_ms, out, final=True)
    _count(state, out)
    return state, out


def _flush_log(state: JoinState, now_ms: int, out: list[Output]) -> None:
    """Once all three topics brought an end-of-log mark (``Watermark(source="end_of_log")``, sent by replay
    and generate at the end of a finite log) past the last one flushed: close every window the mark covers,
    as the end of a bounded input does (``end_of_stream``), without moving the partition's time. A stack
    that keeps running after the log then judges live traffic by its own time, not by the log's end + 24 h."""
    if None in state.eol_ts:
        return
    mark = min(state.eol_ts)
    if state.eol_done is None or mark > state.eol_done:
        _advance(state, mark, now_ms, out, final=True)
        state.eol_done = mark


def _count(state: JoinState, out: list[Output]) -> None:
    n_dead = sum(o[0] for o in out)  # DEAD == 1
    state.counts[Stat.DEAD_LETTERS] += n_dead
    state.counts[Stat.EXAMPLES_OUT] += len(out) - n_dead


def _on_impression(state: JoinState, imp: schema.Impression, msg: RawMsg, now_ms: int, out: list,
                   cold_before: int = -1) -> None:
    iid, ts, cfg = imp.event_id, imp.ts, state.cfg
    if (iid in state.pending or iid in state.done[0] or iid in state.done[1]
            or (ts < cold_before and state.cold.lookup(iid) is not None)):
        out.append(_dead(state, f"duplicate event_id: impression {iid!r} seen before", msg, now_ms))
        return
    click_ts = conv_ts = None
    waiting = state.orphans.pop(iid, None)
    if waiting:
        for kind, fid, fts, raw in waiting:
            if not 0 <= fts - ts <= cfg.window_ms(kind):
                out.append(_dead(state, _outside(kind, fts, iid, ts, cfg), raw, now_ms))
                continue
            state.counts[Stat.FEEDBACK_JOINED] += 1
            if kind == CLICK:
                click_ts = fts if click_ts is None else min(click_ts, fts)
            else:
                conv_ts = fts if conv_ts is None else min(conv_ts, fts)
    state.pending[iid] = (msg[3], ts, b"%d" % imp.user_id, click_ts, conv_ts, False)
    _schedule(state, 1, ts + cfg.hot_ms, iid)
    if cfg.elapsed:
        _schedule(state, 0, ts + cfg.elapsed_ms, iid)


def _schedule(state: JoinState, stage: int, at: int, iid: str) -> None:
    q = state.fifo[stage]
    if not q or q[-1][0] <= at:
        q.append((at, iid))
    else:
        heapq.heappush(state.late[stage], (at, iid))


def _due(state: JoinState, stage: int, t: int) -> list[tuple[int, str]]:
    """Deadlines of ``stage`` before ``t``, removed from the state."""
    q, h, out = state.fifo[stage], state.late[stage], []
    while q and q[0][0] < t:
        out.append(q.popleft())
    while h and h[0][0] < t:
        out.append(heapq.heappop(h))
    return out


def _outside(kind: int, fts: int, iid: str, its: int, cfg: JoinConfig) -> str:
    return (f"{_KIND_NAME[kind]} outside attribution window: {fts - its} ms after impression "
            f"{iid!r}, window [0, {cfg.window_ms(kind)}] ms")


def _on_feedback(state: JoinState, kind: int, fb, msg: RawMsg, now_ms: int, out: list) -> None:
    name, window, fid, fts = _KIND_NAME[kind], state.cfg.window_ms(kind), fb.event_id, fb.ts
    if fid in state.seen_fb[0] or fid in state.seen_fb[1]:
        out.append(_dead(state, f"duplicate event_id: {name} {fid!r} seen before", msg, now_ms))
        return
    state.seen_fb[0].add(fid)
    iid = fb.impression_id
    pending = state.pending.get(iid)
    if pending is not None:
        raw, its, key, click_ts, conv_ts, emitted = pending
        if not 0 <= fts - its <= window:
            out.append(_dead(state, _outside(kind, fts, iid, its, state.cfg), msg, now_ms))
            return
        state.counts[Stat.FEEDBACK_JOINED] += 1
        before = click_ts if kind == CLICK else conv_ts
        if kind == CLICK:
            click_ts = fts if click_ts is None else min(click_ts, fts)
        else:
            conv_ts = fts if conv_ts is None else min(conv_ts, fts)
        state.pending[iid] = (raw, its, key, click_ts, conv_ts, emitted)
        if emitted and before is None:  # ES-DFM: the elapsed example went out negative for this objective
            state.counts[Stat.LATE_POSITIVES] += 1
            out.append((EXAMPLE, key, example_bytes(iid + _LATE_SUFFIX[kind], raw, click_ts, conv_ts,
                                                    "late_positive", now_ms)))
    elif iid in state.done[0] or iid in state.done[1]:
        out.append(_dead(state, f"late {name}: impression {iid!r} already emitted", msg, now_ms))
    elif state.cold is not None and (row := state.cold.lookup(iid)) is not None:
        _on_cold_feedback(state, kind, fts, iid, row, msg, now_ms, out)
    else:
        t = state.clock(now_ms)
        if t is not None and t > fts + window:
            out.append(_dead(state, f"orphan {name}: no impression {iid} within window", msg, now_ms))
            return
        state.orphans[iid] = state.orphans.get(iid, ()) + ((kind, fid, fts, msg),)
        heapq.heappush(state.orphan_heap, (fts + window, iid, fid))


def _on_cold_feedback(state: JoinState, kind: int, fts: int, iid: str, row: tuple[int, int, int], msg: RawMsg,
                      now_ms: int, out: list) -> None:
    """Feedback of a compacted impression (``row``: its ts, block, bits as compacted)."""
    its, bid, bits = row
    cold, cfg = state.cold, state.cfg
    if cold.close_t is not None and its + cfg.max_window_ms < cold.close_t:
        out.append(_dead(state, f"late {_KIND_NAME[kind]}: impression {iid!r} already emitted", msg, now_ms))
        return
    if not 0 <= fts - its <= cfg.window_ms(kind):
        out.append(_dead(state, _outside(kind, fts, iid, its, cfg), msg, now_ms))
        return
    state.counts[Stat.FEEDBACK_JOINED] += 1
    click_ts, conv_ts = cold.fb.get(iid, (None, None))
    seen = bits & (join_store.CLICKED if kind == CLICK else join_store.CONVERTED)
    before = click_ts if kind == CLICK else conv_ts
    if kind == CLICK:
        click_ts = fts if click_ts is None else min(click_ts, fts)
    else:
        conv_ts = fts if conv_ts is None else min(conv_ts, fts)
    cold.fb[iid] = (click_ts, conv_ts)
    if bits & join_store.EMITTED and before is None and not seen:  # ES-DFM late positive: the rare read back
        rec = cold.store.find(bid, iid)
        if rec is None:
            raise KeyError(f"join state: compacted impression {iid!r} missing from block {bid}")
        raw, _, key, c0, v0, _ = rec[1]
        c, v = _merge(c0, v0, click_ts, conv_ts)
        state.counts[Stat.LATE_POSITIVES] += 1
        out.append((EXAMPLE, key, example_bytes(iid + _LATE_SUFFIX[kind], raw, c, v, "late_positive",
                                                   now_ms)))


def _merge(c0: int | None, v0: int | None, c1: int | None, v1: int | None) -> tuple[int | None, int | None]:
    return (c1 if c0 is None else c0 if c1 is None else min(c0, c1),
            v1 if v0 is None else v0 if v1 is None else min(v0, v1))


def _compact(state: JoinState, t: int, final: bool) -> None:
    """Write the spilled impressions as one block when BLOCK_ROWS wait, the first waited FLUSH_MS, the first
    would close within FLUSH_MS of ``t``, or at a final pass."""
    cold, cfg = state.cold, state.cfg
    if not cold.spill or not (final or len(cold.spill) >= join_store.BLOCK_ROWS or t - cold.spill_since >= FLUSH_MS
                              or cold.spill_min_ts + cfg.max_window_ms < t + FLUSH_MS):
        return
    pending, recs = state.pending, []
    for iid in cold.spill:
        p = pending.pop(iid, None)
        if p is not None:
            recs.append((iid, p))
    cold.spill, cold.spill_min_ts, cold.spill_since = [], None, None
    if not recs:
        return
    recs.sort(key=_TS)  # stable: nearly sorted already (hot deadlines leave in ts order)
    for i in range(0, len(recs), join_store.BLOCK_ROWS):
        block, bid = recs[i:i + join_store.BLOCK_ROWS], cold.next_block
        cold.store.write_block(bid, cold.gen, block)
        cold.next_block += 1
        heapq.heappush(cold.blocks, (block[0][1][1] + cfg.max_window_ms, bid, 0))
    cold.n += len(recs)


def _close_cold(state: JoinState, t: int, now_ms: int, out: list, final: bool, data_t: int | None) -> None:
    """Emit the compacted impressions whose window ``t`` passed (block by block, in ts order)."""
    cold, maxw = state.cold, state.cfg.max_window_ms
    heap, fb = cold.blocks, cold.fb
    while heap and heap[0][0] < t:
        _, bid, pos = heapq.heappop(heap)
        recs = cold.store.block(bid)
        start = pos
        while pos < len(recs) and recs[pos][1][1] + maxw < t:
            iid, (raw, its, key, click_ts, conv_ts, emitted) = recs[pos]
            pos += 1
            joined = fb.pop(iid, None)
            if joined is not None:
                click_ts, conv_ts = _merge(click_ts, conv_ts, *joined)
            if not emitted:
                at = its + maxw
                decided = "window_closed" if not final and data_t is not None and data_t > at else "end_of_stream"
                out.append((EXAMPLE, key, example_bytes(iid, raw, click_ts, conv_ts, decided, now_ms)))
        cold.n -= pos - start
        if pos < len(recs):
            heapq.heappush(heap, (recs[pos][1][1] + maxw, bid, pos))
        else:
            cold.expire.append((t + maxw, bid))  # ids remembered one more window (duplicates, late feedback)
    if cold.close_t is None or t > cold.close_t:
        cold.close_t = t
    if final:
        return
    while cold.expire and cold.expire[0][0] < t:
        bid = cold.expire.popleft()[1]
        cold.trash.append((cold.gen, bid))
        cold.trashed.add(bid)


def _advance(state: JoinState, t: int, now_ms: int, out: list, final: bool = False) -> None:
    """Emit impressions whose elapsed time / window ``t`` passed; expire orphans and remembered ids. With a
    cold tier, impressions whose hot time passed are compacted, and compacted ones whose window passed leave."""
    data_t, maxw = state.data_time(), state.cfg.max_window_ms
    pending, done, cold = state.pending, state.done[0], state.cold
    for iid_at in _due(state, 0, t) if state.cfg.elapsed else ():  # elapsed policy: out with the labels so far
        p = pending.get(iid_at[1])
        if p is not None and not p[5] and not final:
            raw, its, key, click_ts, conv_ts, _ = p
            out.append((EXAMPLE, key, example_bytes(iid_at[1], raw, click_ts, conv_ts, "elapsed", now_ms)))
            pending[iid_at[1]] = (raw, its, key, click_ts, conv_ts, True)
    for at, iid in _due(state, 1, t):
        if cold is not None:
            p = pending.get(iid)
            if p is None:
                continue
            if p[1] + maxw >= t:  # its hot time passed, its window is open: to the cold tier
                if not cold.spill:
                    cold.spill_since = t
                cold.spill.append(iid)
                if cold.spill_min_ts is None or p[1] < cold.spill_min_ts:
                    cold.spill_min_ts = p[1]
                if cold.spill_t is None or t > cold.spill_t:
                    cold.spill_t = t
                continue
            del pending[iid]
        else:
            p = pending.pop(iid, None)
            if p is None:
                continue
        raw, its, key, click_ts, conv_ts, emitted = p
        if not emitted:
            decided = "window_closed" if not final and data_t is not None and data_t > at else "end_of_stream"
            out.append((EXAMPLE, key, example_bytes(iid, raw, click_ts, conv_ts, decided, now_ms)))
        done.add(iid)
    if cold is not None:
        _compact(state, t, final)
        _close_cold(state, t, now_ms, out, final, data_t)
    oh = state.orphan_heap
    while oh and oh[0][0] < t:
        _, iid, fid = heapq.heappop(oh)
        waiting = state.orphans.get(iid)
        if not waiting:
            continue
        keep = tuple(o for o in waiting if o[1] != fid)
        for kind, ofid, _, raw in waiting:
            if ofid == fid:
                out.append(_dead(state, f"orphan {_KIND_NAME[kind]}: no impression {iid} within window", raw,
                                 now_ms))
        if keep:
            state.orphans[iid] = keep
        else:
            del state.orphans[iid]
    if final:
        return
    if state.gen_start is None:
        state.gen_start = t
    elif t > state.gen_start + maxw:  # rotate: forget ids older than one to two windows
        state.done, state.seen_fb, state.gen_start = (set(), state.done[0]), (set(), state.seen_fb[0]), t
