"""Replay formats: native JSONL / Parquet and the public-dataset adapters, on the samples in
shared/data, into the embedded broker (and once through the labels dataflow into examples)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import msgspec
import pytest
import yaml

from conftest import read_topics
from deploy.cli import main
from streams import schema
from streams.bus import kafka_io
from streams.sources import formats
from streams.sources.formats import BadLine, FormatError, Row, native
from streams.sources.generate import GeneratorConfig, simulate
from streams.sources.logfile import BadRecord, write_jsonl
from streams.sources.replay import TimeRange, replay_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"public samples not found at {DATA} "
                                                           "(the shared/data folder beside the repository)")

# file -> (format, data rows, clicks, conversions): counts from each sample's SOURCE.md
SAMPLES = {
    "criteo_kaggle_sample/criteo_sample.txt": ("criteo", 200, 49, 0),
    "ali_ccp_sample/ali_ccp_train_sample.csv": ("ali-ccp", 100, 7, 1),
    "aliexpress_sample/aliexpress_train_sample.csv": ("aliexpress", 100, 60, 2),
    "avazu_sample/avazu_sample.txt": ("avazu", 100, 20, 0),
    "taobao_display_ad_sample/train_sample.csv": ("taobao", 100, 4, 0),
    "taobao_dmr_behavior_seq_sample/alimama_sample.txt": ("taobao-dmr", 99, 2, 0),
}


def _records(path, fmt="auto"):
    items = list(formats.read(path, fmt))
    return [r for i in items if isinstance(i, Row) for r in i.records], [i for i in items if isinstance(i, BadLine)]


@needs_data
@pytest.mark.parametrize("rel", SAMPLES)
def test_adapter_reads_sample(rel):
    fmt, rows, clicks, convs = SAMPLES[rel]
    path = DATA / rel
    assert formats.detect(path) == fmt
    recs, bad = _records(path)
    assert not bad
    kinds = Counter(type(r).__name__ for r in recs)
    assert kinds == {"Impression": rows, "Click": clicks, **({"Conversion": convs} if convs else {})}
    imps = {r.event_id: r for r in recs if isinstance(r, schema.Impression)}
    assert len(imps) == rows and all(i.startswith(f"{fmt}-{path.stem}-") for i in imps)
    for r in recs:
        assert schema.check(r) is None and schema.decode(schema.encode(r)) == r
        if not isinstance(r, schema.Impression):  # feedback: same user, not before its impression
            imp = imps[r.impression_id]
            assert r.user_id == imp.user_id and r.ts >= imp.ts
    ts = [r.ts for r in recs]
    assert ts == sorted(ts)
    assert _records(path)[0] == recs  # deterministic: same ids, same values


@needs_data
def test_adapter_mappings_keep_the_meaning():
    recs, _ = _records(DATA / "taobao_display_ad_sample/train_sample.csv")
    first = recs[0]  # 0,2017-05-06 00:00:00,874257,172298,430548_1007,5443,160194,864,...,170301^573514
    assert (first.user_id, first.ad_id, first.campaign_id, first.advertiser_id) == (874257, 172298, 160194, 864)
    assert first.ts == formats.parse_time("2017-05-06T00:00:00") and first.history == [170301, 573514]
    avazu, _ = _records(DATA / "avazu_sample/avazu_sample.txt")
    hour = formats.parse_time("2014-10-21T00:00")
    assert all(hour <= r.ts < hour + 3_600_000 for r in avazu)
    criteo, _ = _records(DATA / "criteo_kaggle_sample/criteo_sample.txt")
    imps = [r for r in criteo if isinstance(r, schema.Impression)]
    assert imps[0].cat[0] == 0x05DB9164 and len(imps[0].cat) == 26 and len(imps[0].dense) == 13
    assert [r.ts for r in imps[:3]] == [formats.SYNTH_START_TS + 100 * i for i in range(3)]
    dmr, _ = _records(DATA / "taobao_dmr_behavior_seq_sample/alimama_sample.txt")
    assert all(len(r.history) == 50 - (r.dense[1] != 50) * (50 - int(r.dense[1])) for r in dmr
               if isinstance(r, schema.Impression))


@needs_data
@pytest.mark.parametrize("rel", SAMPLES)
def test_adapter_replays_into_the_broker_keyed_by_user(cfg, rel):
    fmt, rows, clicks, convs = SAMPLES[rel]
    s = replay_file(cfg, DATA / rel, progress=False, watermark=False)
    assert (s.impressions, s.clicks, s.conversions, s.dead_letters, s.lines) == (rows, clicks, convs, 0, rows)
    msgs = read_topics(cfg, cfg.topics.input_topics())
    assert len(msgs) == rows + clicks + convs
    part_of = {}
    for m in msgs:
        ev = schema.decode(m.value())
        assert m.key() == str(ev.user_id).encode()
        assert m.partition() == kafka_io.partition_for(m.key(), cfg.topics.partitions)
        if isinstance(ev, schema.Impression):
            part_of[ev.event_id] = m.partition()
    for m in msgs:
        ev = schema.decode(m.value())
        if not isinstance(ev, schema.Impression):
            assert part_of[ev.impression_id] == m.partition()


@needs_data
def test_ali_ccp_sample_becomes_labelled_examples(cfg):
    from streams.flows.service import run_labels

    path = DATA / "ali_ccp_sample/ali_ccp_val_sample.csv"
    s = replay_file(cfg, path, progress=False)
    assert (s.impressions, s.clicks, s.conversions) == (50, 3, 1)
    run_labels(cfg, bounded=True)
    examples = [schema.decode(m.value(), schema.Example) for m in read_topics(cfg, [cfg.topics.examples])]
    assert len(examples) == 50 and len({e.example_id for e in examples}) == 50
    rows = (DATA / "ali_ccp_sample/ali_ccp_val_sample.csv").read_text().splitlines()[1:]
    want = {f"ali-ccp-ali_ccp_val_sample-{n}": (int(r.split(",")[0]), int(r.split(",")[1]))
            for n, r in enumerate(rows, 2)}
    assert {e.example_id: (e.click, e.conversion) for e in examples} == want
    assert all(e.impression.domain == "feed" for e in examples)


@needs_data
def test_bad_lines_become_dead_letters_and_replay_goes_on(cfg, tmp_path):
    lines = (DATA / "criteo_kaggle_sample/criteo_sample.txt").read_text().splitlines()[:21]
    good = lines[5].split(",")
    lines[3] = ",".join(lines[3].split(",")[:12])  # truncated row
    lines[6] = ",".join(["7", *good[1:]])  # label 7
    lines[9] = ",".join([*good[:14], "zzzzzzzz", *good[15:]])  # C1 not hex
    path = tmp_path / "criteo_bad.txt"
    path.write_text("\n".join(lines) + "\n")
    s = replay_file(cfg, path, progress=False, watermark=False)
    assert (s.impressions, s.dead_letters, s.lines) == (17, 3, 20)
    dls = [schema.decode(m.value(), schema.DeadLetter) for m in read_topics(cfg, [cfg.topics.dead_letters])]
    assert sorted(d.offset for d in dls) == [4, 7, 10]
    reasons = {d.offset: d.reason for d in dls}
    assert reasons[4].startswith("criteo line 4: expected 39 or 40 fields, got 12")
    assert "label" in reasons[7] and "zzzzzzzz" in reasons[10]
    assert all(d.topic == "criteo_bad.txt" and d.raw for d in dls)


@needs_data
def test_tab_separated_criteo_without_header_is_detected(tmp_path):
    lines = (DATA / "criteo_kaggle_sample/criteo_sample.txt").read_text().splitlines()[1:11]
    path = tmp_path / "train.txt"
    path.write_text("".join(line.replace(",", "\t") + "\n" for line in lines))
    assert formats.detect(path) == "criteo"
    recs, bad = _records(path)
    assert not bad and sum(isinstance(r, schema.Impression) for r in recs) == 10
    assert recs[0].event_id == "criteo-train-1"


def test_criteo_attribution_holds_late_conversions_back(tmp_path):
    from streams.sources.formats import criteo_attribution  # imported here: no earlier test may have (no data)

    head = "\t".join(criteo_attribution.COLUMNS)

    def row(ts, uid, conv_ts, attributed, click):
        return "\t".join(map(str, [ts, uid, 7, int(conv_ts >= 0), conv_ts, 1 if conv_ts >= 0 else -1, attributed,
                                   click, 0, 1, 0.1, 0.0, -1, *range(1, 10)]))

    day = 86_400
    rows = [row(0, 1, 3 * day, 1, 1), row(60, 2, -1, 0, 0), row(2 * day, 3, -1, 0, 1), row(4 * day, 4, -1, 0, 0),
            row(5 * day, 5, 2 * day, 1, 1)]  # last one: conversion before its impression
    path = tmp_path / "criteo_attribution_dataset.tsv"
    path.write_text(head + "\n" + "\n".join(rows) + "\n")
    assert formats.detect(path) == "criteo-attribution"
    items = list(formats.read(path))
    recs = [r for i in items if isinstance(i, Row) for r in i.records]
    assert [r.ts for r in recs] == sorted(r.ts for r in recs)  # the 3-day conversion waited for the log
    conv = next(r for r in recs if isinstance(r, schema.Conversion))
    assert conv.ts - formats.SYNTH_START_TS == 3 * day * 1000 and conv.impression_id.endswith("-2")
    assert recs.index(conv) > [r.user_id for r in recs].index(3)
    bad = [i for i in items if isinstance(i, BadLine)]
    assert len(bad) == 1 and bad[0].line == 6 and "before the impression" in bad[0].reason


def test_parquet_log_round_trips_and_replays_like_jsonl(cfg, tmp_path):
    sim = simulate(GeneratorConfig(n_impressions=500, seed=21, bad_rate=0.03))
    pq_path, js_path = tmp_path / "log.parquet", tmp_path / "log.jsonl"
    assert native.write_parquet(pq_path, sim.records) == len(sim.records)
    write_jsonl(js_path, sim.records)
    assert formats.detect(pq_path) == "parquet"
    from_pq = list(formats.read(pq_path))
    n_bad = sum(isinstance(r, BadRecord) for r in sim.records)
    assert sum(isinstance(i, BadLine) for i in from_pq) == n_bad
    good = [r for r in sim.records if not isinstance(r, BadRecord)]
    assert [i.records[0] for i in from_pq if isinstance(i, Row)] == good
    s = replay_file(cfg, pq_path, progress=False, watermark=False)
    assert (s.events, s.dead_letters, s.lines) == (len(good), n_bad, len(sim.records))
    got = sorted(m.value() for m in read_topics(cfg, cfg.topics.input_topics()))
    assert got == sorted(schema.encode(r) for r in good)


def test_time_range_keeps_impressions_in_range_and_their_feedback(cfg, tmp_path):
    sim = simulate(GeneratorConfig(n_impressions=2000, seed=22))
    path = tmp_path / "log.jsonl"
    write_jsonl(path, sim.records)
    imps = [r for r in sim.records if isinstance(r, schema.Impression)]
    lo, hi = imps[500].ts, imps[1500].ts
    s = replay_file(cfg, path, time_range=TimeRange(lo, hi), progress=False, watermark=False)
    in_range = {r.event_id for r in imps if lo <= r.ts < hi}
    fb = [r for r in sim.records if not isinstance(r, schema.Impression) and lo <= r.ts]
    assert s.impressions == len(in_range)
    assert s.clicks + s.conversions == len(fb)  # feedback until hi + the label window: all of it here
    assert s.skipped == len(sim.records) - s.events
    r = TimeRange.parse("2026-01-01", "2026-01-01T00:10")
    assert r == TimeRange(formats.SYNTH_START_TS, formats.SYNTH_START_TS + 600_000)
    with pytest.raises(ValueError, match="must be after"):
        TimeRange.parse("2026-01-02", "2026-01-01")


def test_cli_generate_parquet_and_replay_with_format_and_range(cfg, tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    out = tmp_path / "g.parquet"
    assert main(["--config", str(conf), "generate", "--events", "300", "--seed", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["--config", str(conf), "replay", str(out), "--format", "parquet", "--no-progress",
                 "--time-range", "2026-01-01", "2026-01-01T00:00:03"]) == 0
    line = capsys.readouterr().out
    assert "replayed 3" in line and "outside the time range" in line
    assert main(["--config", str(conf), "replay", str(out), "--format", "criteo", "--no-progress"]) == 0
    assert "0 impressions" in capsys.readouterr().out  # forced wrong format: every line a dead letter
    weird = tmp_path / "weird.csv"
    weird.write_text("a,b,c\n1,2,3\n")
    assert main(["--config", str(conf), "replay", str(weird), "--no-progress"]) == 1
    assert "cannot tell the format of weird.csv" in capsys.readouterr().err
    with pytest.raises(FormatError):
        formats.detect(weird)
