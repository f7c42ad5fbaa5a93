"""Block planning of native log lines (streams.sources.lineplan): its verdicts are schema.decode's, line by line,
whether the fast path or the reference path decided; blocks (streams.sources.logfile.iter_blocks) restart anywhere."""

from __future__ import annotations

import random
from array import array

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import schema
from streams.bus import kafka_io
from streams.sources import lineplan, logfile
from streams.sources.generate import GeneratorConfig, simulate
from streams.sources.hostile import make_bad_records
from streams.sources.logfile import encode_line

IMP = schema.Impression(event_id="i1", ts=1_767_225_600_000, user_id=77, ad_id=3, campaign_id=1, advertiser_id=1,
                        domain="feed", cat=[1, 2], dense=[0.5, -1.25], history=[9])
GOOD = schema.encode(IMP)


def _expected(lines: list[bytes], first: int, partitions: int) -> dict:
    """What schema.decode says about each line, in the shape of a Plan."""
    tidx, keys, parts, good, marks, failed, blank, max_ts = [], [], [], [], [], [], 0, 0
    for i, raw in enumerate(lines):
        ev = schema.decode(raw)  # never raises (invalid UTF-8 in a field name included)
        if isinstance(ev, schema.Invalid):
            good.append(0)
            if raw.strip():
                failed.append((first + i, ev.reason))
            else:
                blank += 1
        elif isinstance(ev, schema.Watermark):
            good.append(0)
            marks.append((len(tidx), i))
        else:
            good.append(1)
            tidx.append(lineplan.TOPIC_INDEX[type(ev).__name__.lower()])
            keys.append(schema.user_key(ev))
            parts.append(kafka_io.partition_for(schema.user_key(ev), partitions))
            max_ts = max(max_ts, ev.ts)
    return {"tidx": bytes(tidx), "keys": b" ".join(keys),
            "parts": array("I", parts).tobytes() if partitions > 256 else bytes(parts),
            "good": b"" if all(good) else bytes(good), "marks": marks, "failed": failed, "blank": blank,
            "max_ts": max_ts}


def _check(lines: list[bytes], first: int = 1, partitions: int = 4) -> lineplan.Plan:
    plan = lineplan.plan_block(lines, first, lineplan.Router(partitions))
    got = {k: getattr(plan, k) for k in ("tidx", "keys", "parts", "good", "marks", "failed", "blank", "max_ts")}
    assert got == _expected(lines, first, partitions)
    assert plan.n_lines == len(lines) and plan.nbytes == len(b"\n".join(lines))
    return plan


def _sim_lines(n: int, seed: int, bad_rate: float = 0.0) -> list[bytes]:
    return [encode_line(r) for r in simulate(GeneratorConfig(n_impressions=n, seed=seed, bad_rate=bad_rate)).records]


def test_clean_block_takes_the_fast_path_and_routes_like_kafka_io():
    lines = _sim_lines(400, seed=3)
    wm = schema.encode(schema.Watermark(ts=1_767_225_700_000))
    lines = lines[:100] + [wm] + lines[100:] + [wm]
    assert lineplan._fast_block(b"\n".join(lines), lines) is not None
    plan = _check(lines, first=7)
    assert plan.marks[0] == (100, 100) and not plan.failed
    wide = _check(lines, partitions=300)  # more than 256 partitions: uint32 each
    assert list(memoryview(wide.parts).cast("I")) == [
        kafka_io.partition_for(k, 300) for k in wide.keys.split(b" ")]


def test_every_generator_defect_and_odd_line_gets_schemas_verdict():
    sim = simulate(GeneratorConfig(n_impressions=300, seed=5))
    bad = [encode_line(b) for b in make_bad_records(sim.records, 60, np.random.default_rng(1))]
    tricky = [
        GOOD[:-1] + b',"cat":[-1]}',                         # duplicate key, the hidden first one invalid
        GOOD.replace(b'"cat":[1,2]', b'"cat":[-1],"cat":[1,2]'),
        GOOD.replace(b'"cat"', b'"\\u0063at"'),               # escaped key
        GOOD.replace(b'"cat":[1,2]', b'"cat":[[1],2]'),      # nested list
        GOOD.replace(b'"cat":[1,2]', b'"cat":[1.0,2]'),
        GOOD.replace(b'"cat":[1,2]', b'"cat":[9223372036854775808]'),  # MAX_ID + 1
        GOOD.replace(b'"cat":[1,2]', b'"cat":[922337203685477580]'),   # 18 digits: fine
        GOOD.replace(b'"cat":[1,2]', b'"cat":[' + b",".join([b"1"] * 257) + b"]"),
        GOOD.replace(b'"cat":[1,2]', b'"cat":[' + b",".join([b"1"] * 256) + b"]"),
        GOOD.replace(b'"dense":[0.5,-1.25]', b'"dense":[1e999]'),
        GOOD.replace(b'"dense":[0.5,-1.25]', b'"dense":[1e-5,2E+3]'),
        GOOD.replace(b'"dense":[0.5,-1.25]', b'"dense":null'),
        GOOD.replace(b'"dense":[0.5,-1.25]', b'"dense":7'),
        GOOD.replace(b',"history":[9]', b''),                 # missing list: default []
        GOOD.replace(b'"domain":"feed"', b'"domain":"fed"'),
        GOOD.replace(b'{', b'{"extra":{"cat":[-1]},', 1),     # unknown field
        GOOD + b"," + GOOD,                                   # two objects on one line
        GOOD.replace(b":", b": "),                            # whitespace
        GOOD.replace(b'"i1"', b'"\\"i1\\""'),
        schema.encode(schema.Click(event_id="c1", impression_id="c1", ts=IMP.ts, user_id=1)),  # self reference
        b"", b"   ", b"\t", b"[]", b"{}", b"null", GOOD[:40],
    ]
    lines = _sim_lines(200, seed=6) + bad + tricky
    random.Random(2).shuffle(lines)
    plan = _check(lines)
    assert len(plan.failed) > 60
    for line in tricky:  # and each one alone next to good lines (a block where only it can fail)
        _check([GOOD, line, GOOD])


def test_blocks_of_bad_lines_and_blank_lines_only():
    assert _check([b"", b" "]).blank == 2
    assert len(_check([b"{", b"x"], first=41).failed) == 2
    assert _check([]).n_lines == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.binary(min_size=0, max_size=4), st.integers(0, 3))
def test_mutated_lines_get_schemas_verdict(pos, insert, cut):
    line = GOOD[:pos] + insert + GOOD[pos + cut:]
    _check([GOOD, line, GOOD])


def test_router_places_users_as_kafka_io_does():
    rng = random.Random(4)
    users = [rng.randrange(10 ** rng.randint(1, 19)) for _ in range(2000)]
    for n in (7, 300):
        parts = lineplan.Router(n).parts(users)
        got = list(parts) if n <= 256 else list(array("I", parts))
        assert got == [kafka_io.partition_for(str(u).encode(), n) for u in users]
        assert [lineplan.Router(n).part(u) for u in users] == got


def test_plans_round_trip_msgpack():
    plan = _check(_sim_lines(50, seed=8, bad_rate=0.1))
    enc = msgspec.msgpack.encode(plan)
    assert msgspec.msgpack.decode(enc, type=lineplan.Plan) == plan


def test_blocks_hold_the_lines_of_iter_jsonl_and_restart_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(logfile, "MAX_LINE_BYTES", 50)
    rng = random.Random(1)
    path = tmp_path / "f.jsonl"
    for _ in range(150):
        parts = [bytes(rng.choice(b"ab{} \r") for _ in range(rng.choice([0, 1, 3, 30, 49, 50, 51, 60, 200])))
                 for _ in range(rng.randint(0, 30))]
        path.write_bytes(b"\n".join(parts) + rng.choice([b"", b"\n", b"\r\n", b"\n\n"]))
        size = rng.choice([1, 7, 16, 40])
        blocks = list(logfile.iter_blocks(path, size=size))
        got = [(b.first + i, x) for b in blocks for i, x in enumerate(lineplan.split_lines(b.data)) if x.strip()]
        assert got == list(logfile.iter_jsonl(path))
        if blocks:
            k = rng.randrange(len(blocks))
            assert list(logfile.iter_blocks(path, blocks[k].offset, blocks[k].first, size)) == blocks[k:]
