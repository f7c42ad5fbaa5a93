"""Hostile input: the project's own corpus of bad records, for the generator, the tests and the fault benchmarks.

Two families:

* **Malformed** (:data:`DEFECTS`, :func:`make_bad_records`): bytes that are no valid event. Each is made by
  damaging a good record and decodes to :class:`streams.schema.Invalid` (checked as it is made): broken or
  empty JSON, binary, invalid UTF-8 inside a string, deep nesting, wrong types, out-of-range ids and
  timestamps, NaN and infinity, SQL and HTML where a token belongs, oversized fields.
* **Unjoinable** (:func:`unjoinable`): valid events the labels dataflow must refuse: duplicate ids, feedback
  for an impression that never comes, feedback outside its window, feedback before its impression, far-future
  events. They reference good traffic without changing any good example.

``where`` says where a defect can travel: ``log`` (one line of a JSONL log and a raw Kafka message),
``bus`` (a raw message only: an empty or blank line is no record in a log) or ``heavy`` (megabytes: the
corpus, not the generator's everyday bad rate). The heavy record (3 MB) passes the embedded broker: Tansu
takes messages of 3 and 8 MB from a producer whose ``message.max.bytes`` allows them (tried on memory and S3
storage), and librdkafka's consumers read them back with their default fetch sizes; a producer left at
librdkafka's default (1,000,000 bytes) refuses it itself, with ``KafkaException(MSG_SIZE_TOO_LARGE)`` raised by
``produce``, so whoever sends the corpus raw raises that setting.

Each defect names the dead letter it must become in the labels dataflow (:attr:`Defect.reason`, see
:func:`expected_reason`): ``unparseable`` (no JSON record), ``schema`` (wrong shape, type or range),
``invalid`` (well-typed, refused by :func:`streams.schema.check`: tokens, domains, NaN) or ``too large``
(over the join's 64 KiB, before any parsing). Unjoinable events carry theirs (:attr:`Unjoinable.reason`).

>>> import numpy as np
>>> imp = schema.Impression(event_id="i1", ts=1_767_225_600_000, user_id=7, ad_id=3, campaign_id=1,
...                         advertiser_id=1, domain="feed")
>>> bad = make_bad_records([imp], 3, np.random.default_rng(0))
>>> all(isinstance(schema.decode(b.raw), schema.Invalid) for b in bad)
True
>>> len(DEFECTS) >= 40
True
>>> sorted({d.reason for d in DEFECTS}), expected_reason(bad[0]) in (UNPARSEABLE, SCHEMA, INVALID, TOO_LARGE)
(['invalid', 'schema', 'too large', 'unparseable'], True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Sequence

import msgspec

from streams import schema
from streams.sources.logfile import BadRecord, TopicKind

if TYPE_CHECKING:
    import numpy as np

Where = Literal["log", "bus", "heavy"]


# What the labels dataflow's dead letter says first (the reason's category, before its first ':')
UNPARSEABLE, SCHEMA, INVALID, TOO_LARGE = "unparseable", "schema", "invalid", "too large"


class Defect(NamedTuple):
    """``damage(good bytes, good dict, rng) -> bad bytes``; ``reason``: the category of the labels dataflow's
    dead letter for it (the join's, which dead-letters anything over 64 KiB as too large before parsing)."""

    topic_kind: TopicKind
    name: str
    reason: str
    damage: Callable[[bytes, dict, Any], bytes]
    where: Where = "log"


_INF, _NINF = "__streamrec_inf__", "__streamrec_ninf__"
_NAN = "__streamrec_nan__"
_BAD_UTF8 = "__streamrec_bad_utf8__"  # a string value replaced by invalid UTF-8 bytes in well-formed JSON
# raw-byte spellings of what JSON cannot carry: infinities, NaN, and a string holding the bytes ff fe
_RAW_BYTES = {f'"{_INF}"'.encode(): b"1e999", f'"{_NINF}"'.encode(): b"-1e999", f'"{_NAN}"'.encode(): b"NaN",
              f'"{_BAD_UTF8}"'.encode(): b'"a\xff\xfe"'}


def _mut(**changes: Any) -> Callable[[bytes, dict, Any], bytes]:
    return lambda good, d, rng: _encode({**d, **changes})


def _drop(name: str) -> Callable[[bytes, dict, Any], bytes]:
    return lambda good, d, rng: _encode({k: v for k, v in d.items() if k != name})


def _encode(d: dict) -> bytes:
    raw = msgspec.json.encode(d)
    for placeholder, spelling in _RAW_BYTES.items():
        raw = raw.replace(placeholder, spelling)
    return raw


def _raw(fn: Callable[[bytes], bytes]) -> Callable[[bytes, dict, Any], bytes]:
    return lambda good, d, rng: fn(good)


def _garbage(good: bytes, d: dict, rng) -> bytes:
    import numpy as np

    return b"\xff\xfe" + rng.integers(14, 256, 64, dtype=np.uint8).tobytes()  # no \n (10) or \r (13)


_SQL = "1'; DROP TABLE predictions; --"
_HTML = "<script>alert(1)</script>"

DEFECTS: list[Defect] = [
    # -- not JSON, or not one JSON object
    Defect("impression", "truncated_json", UNPARSEABLE, _raw(lambda g: g[: max(1, len(g) // 2)])),
    Defect("impression", "binary_garbage", UNPARSEABLE, _garbage),
    Defect("impression", "not_json", UNPARSEABLE,
           lambda g, d, rng: b"user=%d,ts=%d,domain=feed" % (d["user_id"], d["ts"])),
    Defect("impression", "empty", UNPARSEABLE, _raw(lambda g: b""), "bus"),
    Defect("click", "blank", UNPARSEABLE, _raw(lambda g: b"   "), "bus"),
    Defect("impression", "json_null", SCHEMA, _raw(lambda g: b"null")),
    Defect("impression", "json_array", SCHEMA, _raw(lambda g: b"[" + g + b"]")),
    Defect("conversion", "json_string", SCHEMA, _raw(lambda g: b'"conversion"')),
    Defect("click", "json_number", SCHEMA, _raw(lambda g: b"42")),
    Defect("impression", "byte_order_mark", UNPARSEABLE, _raw(lambda g: b"\xef\xbb\xbf" + g)),
    Defect("impression", "trailing_garbage", UNPARSEABLE, _raw(lambda g: g + b"}}")),
    Defect("click", "two_records_in_one", UNPARSEABLE, _raw(lambda g: g + g)),
    # an unknown field 5,000 deep: msgspec raises RecursionError skipping it
    Defect("impression", "deep_nesting", UNPARSEABLE,
           _raw(lambda g: g[:-1] + b',"junk":' + b"[" * 5_000 + b"]" * 5_000 + b"}")),
    Defect("impression", "invalid_utf8_event_id", UNPARSEABLE, _mut(event_id=_BAD_UTF8)),
    Defect("impression", "invalid_utf8_country", UNPARSEABLE, _mut(country=_BAD_UTF8)),
    Defect("click", "invalid_utf8_impression_id", UNPARSEABLE, _mut(impression_id=_BAD_UTF8)),
    # -- wrong shape or type
    Defect("impression", "unknown_type", SCHEMA, _mut(type="impresion")),
    Defect("impression", "missing_type", SCHEMA, _drop("type")),
    Defect("impression", "missing_id", SCHEMA, _drop("event_id")),
    Defect("click", "missing_impression_id", SCHEMA, _drop("impression_id")),
    Defect("impression", "wrong_type", SCHEMA, _mut(user_id="seven")),
    Defect("click", "wrong_type", SCHEMA, _mut(ts="yesterday")),
    Defect("impression", "float_id", SCHEMA, _mut(ad_id=1.5)),
    Defect("impression", "bool_id", SCHEMA, _mut(user_id=True)),
    Defect("impression", "null_field", SCHEMA, _mut(domain=None)),
    Defect("impression", "unknown_domain", INVALID, _mut(domain="fed")),
    Defect("conversion", "string_value", SCHEMA, _mut(value="ten dollars")),
    Defect("impression", "duplicate_key_hides_bad_value", SCHEMA,
           _raw(lambda g: g.replace(b'"user_id":', b'"user_id":-5,"user_id":', 1))),
    # -- out of range
    Defect("impression", "negative_id", SCHEMA, _mut(ad_id=-5)),
    Defect("conversion", "negative_id", SCHEMA, _mut(user_id=-1)),
    Defect("impression", "huge_id", SCHEMA, _mut(user_id=2**64 + 1)),
    Defect("conversion", "huge_id", SCHEMA, _mut(user_id=2**63)),
    Defect("impression", "future_ts", SCHEMA, _mut(ts=schema.MAX_TS_MS + 10**12)),
    Defect("conversion", "future_ts", SCHEMA, _mut(ts=schema.MAX_TS_MS + 1)),
    Defect("impression", "ancient_ts", SCHEMA, _mut(ts=915_148_800_000)),  # 1999-01-01
    Defect("click", "negative_ts", SCHEMA, _mut(ts=-1)),
    Defect("impression", "huge_position", SCHEMA, _mut(position=10**6)),
    Defect("impression", "infinite_dense", SCHEMA, _mut(dense=[0.5, _INF])),
    Defect("impression", "negative_infinite_dense", SCHEMA, _mut(dense=[_NINF])),
    Defect("impression", "nan_dense", UNPARSEABLE, _mut(dense=[_NAN, 1.0])),
    Defect("impression", "huge_history", SCHEMA, _mut(history=list(range(300)))),
    Defect("impression", "empty_event_id", SCHEMA, _mut(event_id="")),
    Defect("impression", "long_event_id", SCHEMA, _mut(event_id="i" * 1_000)),
    Defect("impression", "huge_string", TOO_LARGE, _mut(country="x" * 100_000)),
    Defect("impression", "multi_megabyte_field", TOO_LARGE, _mut(country="x" * 3_000_000), "heavy"),
    # -- strings that are no tokens
    Defect("impression", "sql_in_event_id", INVALID, _mut(event_id=_SQL)),
    Defect("click", "sql_in_impression_id", INVALID, _mut(impression_id=_SQL)),
    Defect("impression", "html_in_country", INVALID, _mut(country=_HTML)),
    Defect("conversion", "html_in_kind", INVALID, _mut(kind="<b>buy</b>")),
    Defect("impression", "control_character_in_id", INVALID, _mut(event_id="imp\u0000-1")),
    Defect("impression", "non_ascii_id", INVALID, _mut(event_id="imp-\u00e9-1")),
    Defect("click", "self_reference", INVALID, lambda g, d, rng: _encode({**d, "impression_id": d["event_id"]})),
]


def make_bad_records(records: Sequence[Any], n: int, rng: np.random.Generator,
                     where: tuple[Where, ...] = ("log",)) -> list[BadRecord]:
    """``n`` malformed records made by damaging random good ones of ``records``, cycling through every defect
    of :data:`DEFECTS` that travels ``where`` in random order. Each one decodes to ``schema.Invalid``."""
    by_kind: dict[str, list[Any]] = {"impression": [], "click": [], "conversion": []}
    for r in records:
        if isinstance(r, (schema.Impression, schema.Click, schema.Conversion)):
            by_kind[type(r).__name__.lower()].append(r)
    defects = [d for d in DEFECTS if by_kind[d.topic_kind] and d.where in where]
    if n and not defects:
        raise ValueError("make_bad_records: no good records to damage")
    out: list[BadRecord] = []
    order = rng.permutation(len(defects)) if defects else []
    for j in range(n):
        if j and j % len(defects) == 0:
            order = rng.permutation(len(defects))
        d = defects[order[j % len(defects)]]
        pool = by_kind[d.topic_kind]
        good = schema.encode(pool[int(rng.integers(len(pool)))])
        raw = d.damage(good, msgspec.json.decode(good), rng)
        if not isinstance(schema.decode(raw), schema.Invalid):
            raise RuntimeError(f"make_bad_records: defect {d.name!r} produced a valid record: {raw[:200]!r}")
        out.append(BadRecord(d.topic_kind, raw, d.name))
    return out


_REASONS = {(d.topic_kind, d.name): d.reason for d in DEFECTS}


def expected_reason(bad: BadRecord) -> str:
    """The category of the dead letter the labels dataflow makes of ``bad`` (a record of this corpus)."""
    return _REASONS[bad.topic_kind, bad.kind]


def corpus(records: Sequence[Any], rng: np.random.Generator, copies: int = 1) -> list[BadRecord]:
    """Every defect of :data:`DEFECTS`, heavy and bus-only ones included, ``copies`` times each."""
    return make_bad_records(records, copies * len(DEFECTS), rng, where=("log", "bus", "heavy"))


class Unjoinable(NamedTuple):
    """A valid event the labels dataflow refuses, and the start of the dead letter's reason it must get."""

    event: schema.Impression | schema.Click | schema.Conversion
    kind: str
    reason: str


def unjoinable(records: Sequence[Any], click_window_ms: int, now_ms: int, n: int,
               rng: np.random.Generator) -> list[Unjoinable]:
    """``n`` events that reference good ``records`` (cycling through the kinds below) without changing any
    good example: duplicates repeat a good event exactly; other feedback has ids of its own.

    Feedback for an impression that never comes is only refused when its window has passed (or at the end
    of a log), so a run that checks it must run that long or end with an end-of-log mark.
    """
    imps = [r for r in records if isinstance(r, schema.Impression)]
    clicks = [r for r in records if isinstance(r, schema.Click)]
    if not imps:
        raise ValueError("unjoinable: no good impressions to refer to")
    out: list[Unjoinable] = []
    for j in range(n):
        imp = imps[int(rng.integers(len(imps)))]
        k = j % 6
        tag = f"hostile-{j}"
        if k == 0:
            out.append(Unjoinable(imp, "duplicate_impression", "duplicate event_id"))
        elif k == 1 and clicks:
            out.append(Unjoinable(clicks[int(rng.integers(len(clicks)))], "duplicate_click", "duplicate event_id"))
        elif k == 2:
            out.append(Unjoinable(schema.Click(event_id=tag, impression_id=f"{tag}-missing", ts=imp.ts,
                                               user_id=imp.user_id), "click_for_unknown_impression", "orphan click"))
        elif k == 3:
            out.append(Unjoinable(schema.Click(event_id=tag, impression_id=imp.event_id,
                                               ts=imp.ts + click_window_ms + 1, user_id=imp.user_id),
                                  "click_outside_window", "click outside attribution window"))
        elif k == 4:
            out.append(Unjoinable(schema.Conversion(event_id=tag, impression_id=imp.event_id, ts=imp.ts - 1_000,
                                                    user_id=imp.user_id),
                                  "conversion_before_impression", "conversion outside attribution window"))
        else:
            out.append(Unjoinable(schema.Impression(event_id=tag, ts=now_ms + 2 * 86_400_000, user_id=imp.user_id,
                                                    ad_id=imp.ad_id, campaign_id=imp.campaign_id,
                                                    advertiser_id=imp.advertiser_id, domain=imp.domain),
                                  "far_future_impression", "future timestamp"))
    return out


def interleave(good: Sequence[Any], malformed: Sequence[BadRecord], refused: Sequence[Unjoinable],
               rng: np.random.Generator) -> list[Any]:
    """``good`` records (in their order) with ``malformed`` ones at random places and each unjoinable event
    somewhere after the good event it refers to (a duplicate after its original, feedback after its
    impression), so that, produced in this order, each is refused for the reason it names.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> imps = [schema.Impression(event_id=f"i{k}", ts=1_767_225_600_000 + k, user_id=k, ad_id=1, campaign_id=1,
    ...                           advertiser_id=1, domain="feed") for k in range(3)]
    >>> mixed = interleave(imps, make_bad_records(imps, 2, rng), unjoinable(imps, 60_000, 0, 1, rng), rng)
    >>> len(mixed), [r for r in mixed if isinstance(r, schema.Impression)] == imps
    (6, True)
    >>> dup = next(r for r in mixed if isinstance(r, Unjoinable))  # a duplicate impression: after its original
    >>> mixed.index(dup) > mixed.index(dup.event)
    True
    """
    at = {(type(r), r.event_id): i for i, r in enumerate(good) if hasattr(r, "event_id")}
    after: dict[int, list[Any]] = {}  # good index -> what comes right after it
    for b in malformed:
        after.setdefault(int(rng.integers(len(good))), []).append(b)
    for u in refused:
        ev = u.event
        ref = at.get((type(ev), ev.event_id), at.get((schema.Impression, getattr(ev, "impression_id", None)), 0))
        after.setdefault(int(rng.integers(ref, len(good))), []).append(u)
    out: list[Any] = []
    for i, rec in enumerate(good):
        out.append(rec)
        out += after.get(i, ())
    return out
