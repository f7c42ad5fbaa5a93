"""The ``distill`` Bytewax dataflow: the teacher join of ExFM's data augmentation system.

examples + the FM's teacher predictions -> examples with ``Example.teacher`` (topics.examples_distilled),
which the vertical models (``trainer.role == "vm"``) train on. Batch-per-partition like the labels flow
(README "Decisions", DESIGN.md's Bytewax traps)::

    source: DistillBatch(p, raw messages of (examples, p) and (teacher_predictions, p), wall ms)
      -> key_on "key": part_key(p) (streams/flows/routing.py)
      -> stateful_batch "join": step() per partition (decode after the exchange: raw bytes only)
      -> DistillOut(encoded records, counters, gauges, age samples)
      -> sink: examples_distilled partition p (key user id), dead letters, ServiceStats(component="distill")

Routing. The FM trainer publishes one :class:`~streams.schema.TeacherBatch` per examples-topic partition it
read in a micro-batch, to the SAME partition number of ``topics.teacher_predictions`` (trainer/loop.py,
``Trainer._publish_teachers``): an example and its teacher share a partition number, so one join state per
partition sees both, and the distilled example goes to that partition number of ``examples_distilled`` (the
user-id partitioning of ``examples`` carries over).

The join (pure, :func:`step` / :func:`expire` / :func:`flush`, ``now_ms`` passed in):

- an example waits for its teacher at most ``teacher_wait_s`` of wall clock from its arrival at the join;
  it leaves as soon as the teacher is there (in either order of arrival), or without one at the deadline
  (``examples_without_teacher``). ``max_pending`` bounds the waiting examples of each partition number (and,
  apart, its orphan teachers): past it the oldest leave without teacher at once (``pending_evicted``).
- a teacher that arrives first waits (as an orphan) for its example, as long and as bounded; one whose
  example already left is dropped (``teachers_late``) and never applied: each example leaves exactly once
  per join state. Ids of examples that left are remembered (:data:`LEFT_CAPACITY` of them, oldest forgotten
  first) to tell a late teacher and a duplicate example (``duplicates``, dropped) from new ones; a teacher whose id
  was forgotten waits as an orphan and expires (``teachers_expired``), still never applied.
- bad teacher records go to dead letters with step ``distill.join`` (:data:`streams.names.Step.DISTILL_JOIN`)
  and a reason: too large, unparseable / schema (a NaN probability is JSON ``null``: schema), ``teacher:``
  columns of different lengths, a probability outside [0, 1] or not finite, a negative model version, a
  ``scored_ts`` in the future (an FM clock or version from the future), an id that is no token. The whole
  record is refused (one bad row means the batch cannot be trusted). Undecodable examples are dead letters
  too (``example: ...``); the VM never sees them.

Recovery: at-least-once like every flow here. The state (waiting examples as raw bytes, orphan teachers, the
ids that left) is snapshotted with the source offsets; after a crash the messages since the snapshot are
read again, so an example may leave again, possibly with a different teacher decision. The VM trainer drops
example ids it already trained (its dedup, checkpointed with its offsets): each example is trained once, with
the teacher of whichever copy reached it first, and a teacher is never applied twice.

Bounded mode: at the end of both inputs every waiting example leaves without teacher (``end_of_stream``).

>>> st = DistillState(DistillConfig("ex", "tp", wait_ms=1000, max_pending=10))
>>> imp = schema.Impression(event_id="i1", ts=1_700_000_000_000, user_id=7, ad_id=1, campaign_id=1, advertiser_id=1,
...                         domain="feed")
>>> ex = schema.encode(schema.Example(example_id="i1", impression=imp, click=1, conversion=0))
>>> tb = schema.encode(schema.TeacherBatch(model_version=5, scored_ts=100, example_ids=["i1"], p_click=[0.25],
...                                        p_conversion=[0.01]))
>>> step(st, (("ex", 0, 0, ex),), now_ms=1000)
[]
>>> (kind, key, part, raw), = step(st, (("tp", 0, 0, tb),), now_ms=1500)
>>> key, schema.decode(raw, schema.Example).teacher
(b'7', Teacher(p_click=0.25, p_conversion=0.01, model_version=5, scored_ts=100))
>>> step(st, (("tp", 0, 1, tb),), now_ms=1600), st.counts["teachers_late"]  # a replayed teacher: dropped
([], 1)
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, NamedTuple

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from streams import schema
from streams.flows.routing import part_key
from streams.names import Stat, Step

FLOW_ID = "distill"
STEP = Step.DISTILL_JOIN
RawMsg = tuple[str, int, int, bytes]  # (topic, partition, offset, value bytes) as read from Kafka
Output = tuple[int, bytes | None, int, bytes]  # (EXAMPLE | DEAD, key, partition number, encoded record)
EXAMPLE, DEAD = 0, 1
MAX_MSG_BYTES = 4 * 1024 * 1024  # a TeacherBatch of a large FM batch is big; anything larger is refused
FUTURE_TOLERANCE_MS = 5 * 60 * 1000  # a teacher scored this far past the join's wall clock: dead letter
LEFT_CAPACITY = 100_000  # ids of examples that left, remembered per partition (a snapshot copies them each epoch)
AGE_SAMPLES = 256  # teacher ages / waits kept per output batch for the p50s of the service stats
_TEACHER_FIELD = b'"teacher"'


class DistillBatch(NamedTuple):
    """One item of the distill flow: raw messages of partition number ``partition`` of both input topics, in
    arrival order, read at wall-clock ``now_ms``."""

    partition: int
    msgs: tuple[RawMsg, ...]
    now_ms: int


class DistillOut(NamedTuple):
    """What the join emits per activation: encoded records, the partition's counters and gauges, samples."""

    records: list[Output]
    counts: dict
    pending: int  # examples waiting for their teacher
    orphans: int  # teachers waiting for their example
    ages_ms: list[int]  # teacher age (now - scored_ts) of examples that left with a teacher, sampled
    waits_ms: list[int]  # how long examples waited at the join, sampled


@dataclass(frozen=True)
class DistillConfig:
    """Topic names (to tell the inputs apart) and the bounds, in ms and counts."""

    examples_topic: str
    teacher_topic: str
    wait_ms: int
    max_pending: int

    def __post_init__(self) -> None:
        if self.wait_ms < 0:
            raise ValueError(f"distill.teacher_wait_s must be >= 0, got {self.wait_ms / 1000}")
        if self.max_pending < 1:
            raise ValueError(f"distill.max_pending must be >= 1, got {self.max_pending}")
        if self.examples_topic == self.teacher_topic:
            raise ValueError(f"distill: examples and teacher predictions need distinct topics, got "
                             f"{self.examples_topic!r} twice")

    @classmethod
    def from_config(cls, cfg) -> DistillConfig:
        """From a :class:`config.Config`: ``topics.examples``, ``topics.teacher_predictions``, ``distill``."""
        return cls(cfg.topics.examples, cfg.topics.teacher_predictions, int(cfg.distill.teacher_wait_s * 1000),
                   int(cfg.distill.max_pending))


# A waiting example: (arrival ms, partition, user key, raw bytes); an orphan teacher: (arrival ms, Teacher).
# Atomic values only: GC-untracked, and a snapshot is a shallow copy.
Waiting = tuple[int, int, bytes, bytes]


class DistillState:
    """The join state of one partition number (see the module docstring)."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.pending: OrderedDict[str, Waiting] = OrderedDict()  # arrival order (OrderedDict: O(1) popleft)
        self.orphans: OrderedDict[str, tuple[int, schema.Teacher]] = OrderedDict()
        self.left: OrderedDict[str, None] = OrderedDict()  # ids that left, newest last (bounded)
        self.counts: dict[str, int] = {}
        self.clock = 0  # the largest now_ms seen: arrival times never go backwards
        self.ages: list[int] = []
        self.waits: list[int] = []

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def snapshot(self) -> tuple:
        return (list(self.pending.items()), [(k, a, msgspec.structs.astuple(t)) for k, (a, t) in self.orphans.items()],
                list(self.left), dict(self.counts), self.clock)

    @classmethod
    def restore(cls, cfg: DistillConfig, snap: tuple) -> DistillState:
        st = cls(cfg)
        pending, orphans, left, counts, clock = snap
        st.pending = OrderedDict(pending)
        st.orphans = OrderedDict((k, (a, schema.Teacher(*t))) for k, a, t in orphans)
        st.left = OrderedDict.fromkeys(left)
        st.counts, st.clock = dict(counts), clock
        return st

    def next_deadline_ms(self) -> int | None:
        """Wall ms when the oldest waiting example or orphan teacher expires (None: nothing waits)."""
        heads = [v[0] for d in (self.pending, self.orphans) if d for v in (next(iter(d.values())),)]
        return min(heads) + self.cfg.wait_ms if heads else None


_decode_example = msgspec.json.Decoder(schema.Example).decode
_decode_teacher = msgspec.json.Decoder(schema.TeacherBatch).decode


def _dead(st: DistillState, reason: str, msg: RawMsg, now_ms: int) -> Output:
    st.count(Stat.DEAD_LETTERS)
    st.count(Stat.DEAD_PREFIX + reason.split(":", 1)[0][:40])
    dl = schema.dead_letter(reason, msg[3], topic=msg[0], partition=msg[1], offset=msg[2], ts=now_ms, step=STEP)
    return (DEAD, None, msg[1], schema.encode(dl))


def check_teacher(tb: schema.TeacherBatch, now_ms: int) -> str | None:
    """Why a decoded TeacherBatch cannot be used (a dead letter's reason), or None."""
    n = len(tb.example_ids)
    if len(tb.p_click) != n or len(tb.p_conversion) != n:
        return (f"teacher: columns of different lengths (example_ids {n}, p_click {len(tb.p_click)}, "
                f"p_conversion {len(tb.p_conversion)})")
    for name, col in (("p_click", tb.p_click), ("p_conversion", tb.p_conversion)):
        for i, p in enumerate(col):
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                return f"teacher: {name}[{i}] = {p!r} is not a probability in [0, 1]"
    if tb.model_version < 0:
        return f"teacher: negative model_version {tb.model_version}"
    if tb.scored_ts > now_ms + FUTURE_TOLERANCE_MS:
        return (f"teacher: scored_ts {tb.scored_ts} is {(tb.scored_ts - now_ms) / 1000:.0f}s in the future "
                "(the FM's clock or a version from the future)")
    if not schema.tokens_ok("".join(tb.example_ids)):
        return f"teacher: example_ids: only letters, digits and {schema.TOKEN_PUNCT} are allowed"
    return None


def _with_teacher(raw: bytes, t: schema.Teacher) -> bytes:
    """The example's JSON with ``teacher`` added: spliced before the closing brace (the raw bytes decoded as an
    Example without a ``teacher`` key, so this is one valid object); re-encoded when the key is there."""
    if _TEACHER_FIELD in raw:  # a "teacher": null or a nested string: take the safe road
        return schema.encode(msgspec.structs.replace(_decode_example(raw), teacher=t))
    body = raw.rstrip()
    return body[:-1] + b',"teacher":' + schema.encode(t) + b"}"


def _leave(st: DistillState, eid: str, w: Waiting, t: schema.Teacher | None, now_ms: int, out: list) -> None:
    arrived, p, key, raw = w
    st.left[eid] = None
    if len(st.left) > min(st.cfg.max_pending, LEFT_CAPACITY):
        st.left.popitem(last=False)
    st.count(Stat.EXAMPLES_OUT)
    if len(st.waits) < AGE_SAMPLES:
        st.waits.append(now_ms - arrived)
    if t is None:
        st.count(Stat.EXAMPLES_WITHOUT_TEACHER)
        out.append((EXAMPLE, key, p, raw))
    else:
        st.count(Stat.EXAMPLES_WITH_TEACHER)
        if len(st.ages) < AGE_SAMPLES:
            st.ages.append(now_ms - t.scored_ts)
        out.append((EXAMPLE, key, p, _with_teacher(raw, t)))


def _on_example(st: DistillState, msg: RawMsg, now_ms: int, out: list) -> None:
    raw = msg[3]
    st.count(Stat.EXAMPLES_IN)
    if len(raw) > MAX_MSG_BYTES:
        out.append(_dead(st, f"example: too large ({len(raw)} bytes)", msg, now_ms))
        return
    ex = schema.decode(raw, schema.Example)
    if isinstance(ex, schema.Invalid):
        out.append(_dead(st, f"example: {ex.reason}", msg, now_ms))
        return
    eid = ex.example_id
    if eid in st.left or eid in st.pending:
        st.count(Stat.DUPLICATES)
        return
    w = (now_ms, msg[1], schema.user_key(ex.impression), raw)
    if ex.teacher is not None:  # already distilled upstream (a replay of examples_distilled): pass it on
        _leave(st, eid, w, ex.teacher, now_ms, out)
        return
    orphan = st.orphans.pop(eid, None)
    if orphan is not None:
        _leave(st, eid, w, orphan[1], now_ms, out)
        return
    st.pending[eid] = w
    while len(st.pending) > st.cfg.max_pending:  # the bound: the oldest leave without teacher now
        old, ow = st.pending.popitem(last=False)
        st.count(Stat.PENDING_EVICTED)
        _leave(st, old, ow, None, now_ms, out)


def _on_teacher(st: DistillState, msg: RawMsg, now_ms: int, out: list) -> None:
    raw = msg[3]
    if len(raw) > MAX_MSG_BYTES:
        out.append(_dead(st, f"too large: {len(raw)} bytes", msg, now_ms))
        return
    try:
        tb = _decode_teacher(raw)
    except msgspec.ValidationError as e:
        out.append(_dead(st, f"schema: {e}", msg, now_ms))
        return
    except schema.DECODE_ERRORS as e:
        out.append(_dead(st, schema.unparseable(e), msg, now_ms))
        return
    reason = check_teacher(tb, now_ms)
    if reason:
        out.append(_dead(st, reason, msg, now_ms))
        return
    st.count(Stat.TEACHERS_IN, len(tb.example_ids))
    for eid, pc, pv in zip(tb.example_ids, tb.p_click, tb.p_conversion):
        t = schema.Teacher(p_click=pc, p_conversion=pv, model_version=tb.model_version, scored_ts=tb.scored_ts)
        w = st.pending.pop(eid, None)
        if w is not None:
            _leave(st, eid, w, t, now_ms, out)
        elif eid in st.left:
            st.count(Stat.TEACHERS_LATE)  # its example left (with or without a teacher): never applied twice
        elif eid in st.orphans:
            st.count(Stat.TEACHERS_DUPLICATE)  # the first copy waits already
        else:
            st.orphans[eid] = (now_ms, t)
            while len(st.orphans) > st.cfg.max_pending:
                st.orphans.popitem(last=False)
                st.count(Stat.TEACHERS_EXPIRED)


def expire(st: DistillState, now_ms: int) -> list[Output]:
    """Examples past their wait leave without teacher; orphan teachers past it are dropped."""
    out: list[Output] = []
    cutoff = now_ms - st.cfg.wait_ms
    while st.pending:
        eid, w = next(iter(st.pending.items()))
        if w[0] > cutoff:
            break
        st.pending.popitem(last=False)
        _leave(st, eid, w, None, now_ms, out)
    while st.orphans and next(iter(st.orphans.values()))[0] <= cutoff:
        st.orphans.popitem(last=False)
        st.count(Stat.TEACHERS_EXPIRED)
    return out


def step(st: DistillState, msgs: tuple[RawMsg, ...], now_ms: int) -> list[Output]:
    """Take one batch of raw messages of both topics at wall clock ``now_ms``, then expire what waited too
    long. Mutates ``st``; returns the encoded outputs."""
    now_ms = st.clock = max(st.clock, now_ms)
    out: list[Output] = []
    teachers, examples = st.cfg.teacher_topic, st.cfg.examples_topic
    for msg in msgs:
        if msg[0] == teachers:
            _on_teacher(st, msg, now_ms, out)
        elif msg[0] == examples:
            _on_example(st, msg, now_ms, out)
        else:
            out.append(_dead(st, f"unexpected topic: {msg[0]!r}", msg, now_ms))
    out.extend(expire(st, now_ms))
    return out


def flush(st: DistillState, now_ms: int) -> list[Output]:
    """End of a bounded input: every waiting example leaves without teacher, orphans are dropped."""
    now_ms = st.clock = max(st.clock, now_ms)
    out: list[Output] = []
    while st.pending:
        eid, w = st.pending.popitem(last=False)
        _leave(st, eid, w, None, now_ms, out)
    st.count(Stat.TEACHERS_EXPIRED, len(st.orphans))
    st.orphans.clear()
    return out


class _DistillLogic(StatefulBatchLogic[DistillBatch, DistillOut, tuple]):
    """``clock``: wall ms (None: time only from the batches, for deterministic tests; no timer then)."""

    def __init__(self, st: DistillState, bounded: bool, clock: Callable[[], int] | None):
        self.st, self.bounded, self.clock = st, bounded, clock

    def _emit(self, out: list[Output]) -> tuple[list[DistillOut], bool]:
        st = self.st
        ages, waits, st.ages, st.waits = st.ages, st.waits, [], []
        return [DistillOut(out, dict(st.counts), len(st.pending), len(st.orphans), ages, waits)], self.RETAIN

    def on_batch(self, values: list[DistillBatch]) -> tuple[list[DistillOut], bool]:
        out: list[Output] = []
        for b in values:
            now = b.now_ms if self.clock is None else max(b.now_ms, self.clock())
            out.extend(step(self.st, b.msgs, now))
        return self._emit(out)

    def on_notify(self) -> tuple[list[DistillOut], bool]:
        now = self.st.clock if self.clock is None else max(self.st.clock, self.clock())
        self.st.clock = now
        return self._emit(expire(self.st, now))

    def notify_at(self) -> datetime | None:
        if self.clock is None:
            return None
        due = self.st.next_deadline_ms()
        return None if due is None else datetime.fromtimestamp(due / 1000, tz=timezone.utc)

    def on_eof(self) -> tuple[list[DistillOut], bool]:
        if not self.bounded:
            return [], self.RETAIN
        return self._emit(flush(self.st, self.st.clock))

    def snapshot(self) -> tuple:
        return self.st.snapshot()


def wall_ms() -> int:
    return int(time.time() * 1000)


def build_flow(dcfg: DistillConfig, source, sink, *, partitions: int, bounded: bool,
               clock: Callable[[], int] | None = wall_ms) -> Dataflow:
    """The distill dataflow: ``source`` yields :class:`DistillBatch` items of partition numbers
    ``0..partitions-1``; ``sink`` receives ``(part_key, DistillOut)``. ``clock=None``: the join's time comes
    from the batches only (tests on Bytewax's TestingSource)."""
    flow = Dataflow(FLOW_ID)
    batches = op.input("input", flow, source)
    keys = [part_key(p, partitions) for p in range(partitions)]
    keyed = op.key_on("key", batches, lambda b: keys[b.partition])

    def builder(snap):
        st = DistillState.restore(dcfg, snap) if snap is not None else DistillState(dcfg)
        return _DistillLogic(st, bounded, clock)

    op.output("output", op.stateful_batch("join", keyed, builder), sink)
    return flow
