"""Producing and replaying into real topics on the embedded broker, then consuming everything back."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import msgspec
import yaml

from conftest import read_topics
from deploy.cli import main
from streams import schema
from streams.sources.generate import GeneratorConfig, produce, simulate
from streams.sources.logfile import BadRecord, write_jsonl
from streams.sources.replay import replay_file


def _by_partition(msgs):
    parts = defaultdict(list)
    for m in msgs:
        parts[(m.topic(), m.partition())].append(m)
    return parts


def _check_placement_and_end_watermarks(cfg, msgs, final_wm_ts):
    """Feedback shares its impression's partition number; every input partition ends with the watermark."""
    t = cfg.topics
    imp_part = {}
    for m in msgs:
        ev = schema.decode(m.value())
        if isinstance(ev, schema.Impression):
            assert m.topic() == t.impressions and m.key() == str(ev.user_id).encode()
            imp_part[ev.event_id] = m.partition()
    n_feedback = 0
    for m in msgs:
        ev = schema.decode(m.value())
        if isinstance(ev, (schema.Click, schema.Conversion)):
            assert m.topic() == (t.clicks if isinstance(ev, schema.Click) else t.conversions)
            assert m.partition() == imp_part[ev.impression_id]
            n_feedback += 1
    assert n_feedback > 0
    parts = _by_partition(msgs)
    for topic in t.input_topics():
        for p in range(t.partitions):
            last = schema.decode(parts[(topic, p)][-1].value())
            assert last == schema.Watermark(ts=final_wm_ts, source=schema.END_OF_LOG), (topic, p)
    assert len({p for (tp, p) in parts if tp == t.impressions}) == t.partitions  # keys spread


def test_produce_places_events_and_ends_with_watermarks(cfg):
    sim = simulate(GeneratorConfig(n_impressions=2000, seed=11, bad_rate=0.03))
    c = sim.counts()
    s = produce(cfg, sim.records, progress=False)
    assert (s.impressions, s.clicks, s.conversions, s.bad_records) == (
        c["impression"], c["click"], c["conversion"], c["bad"])
    last_ts = max(r.ts for r in sim.records if not isinstance(r, BadRecord))
    assert s.final_watermark_ts == last_ts + 1 + 1000 * max(cfg.labels.click_window_s, cfg.labels.conversion_window_s)
    n_wm = 3 * cfg.topics.partitions
    msgs = read_topics(cfg, cfg.topics.input_topics())
    assert len(msgs) == len(sim.records) + n_wm
    per_topic = Counter(m.topic() for m in msgs)
    bad_kinds = Counter(r.topic_kind for r in sim.records if isinstance(r, BadRecord))
    t, p = cfg.topics, cfg.topics.partitions
    assert per_topic == {t.impressions: c["impression"] + bad_kinds["impression"] + p,
                         t.clicks: c["click"] + bad_kinds["click"] + p,
                         t.conversions: c["conversion"] + bad_kinds["conversion"] + p}
    assert sum(isinstance(schema.decode(m.value()), schema.Invalid) for m in msgs) == c["bad"]
    _check_placement_and_end_watermarks(cfg, msgs, s.final_watermark_ts)

    stats = [schema.decode(m.value(), schema.ServiceStats) for m in read_topics(cfg, [t.service_stats])]
    assert stats and all(x.component == "replay" for x in stats)
    assert stats[-1].values["events_produced"] == s.events and stats[-1].values["bad_records"] == c["bad"]


def test_replay_file_dead_letters_bad_lines_and_goes_on(cfg, tmp_path):
    sim = simulate(GeneratorConfig(n_impressions=1000, seed=12, bad_rate=0.05))
    good = [r for r in sim.records if not isinstance(r, BadRecord)]
    mid_wm = schema.Watermark(ts=good[len(good) // 2].ts, source="replay")
    records = sim.records[: len(sim.records) // 2] + [mid_wm] + sim.records[len(sim.records) // 2:]
    path = tmp_path / "events.jsonl"
    write_jsonl(path, records)
    with open(path, "ab") as f:  # a blank line and a trailing garbage line without newline
        f.write(b"\n   \nnot json at all")
    expect_bad = {i + 1 for i, r in enumerate(records) if isinstance(r, BadRecord)} | {len(records) + 3}

    s = replay_file(cfg, path, progress=False)
    assert s.lines == len(records) + 1
    assert s.dead_letters == len(expect_bad)
    assert s.events == len(good) and s.watermarks == 1 and s.bad_records == 0
    t, p = cfg.topics, cfg.topics.partitions
    msgs = read_topics(cfg, t.input_topics())
    assert len(msgs) == len(good) + 2 * 3 * p
    assert not any(isinstance(schema.decode(m.value()), schema.Invalid) for m in msgs)
    _check_placement_and_end_watermarks(cfg, msgs, s.final_watermark_ts)
    for (topic, part), ms in _by_partition(msgs).items():  # the mid-log watermark reached every partition
        assert sum(schema.decode(m.value()) == mid_wm for m in ms) == 1, (topic, part)

    dls = [schema.decode(m.value(), schema.DeadLetter) for m in read_topics(cfg, [t.dead_letters])]
    assert {d.offset for d in dls} == expect_bad
    for d in dls:
        assert d.reason.startswith(f"line {d.offset}: ") and len(d.reason) > len(f"line {d.offset}: ") + 5
        assert d.topic == "events.jsonl" and d.step == "replay" and d.raw
    assert any("unknown domain" in d.reason for d in dls) and any("unparseable" in d.reason for d in dls)


def test_replay_paces_by_event_time(cfg, tmp_path):
    t0 = 1_767_225_600_000
    evs = [schema.Impression(event_id=f"i{i}", ts=t0 + 100 * i, user_id=i, ad_id=1, campaign_id=1,
                             advertiser_id=1, domain="feed") for i in range(16)]  # 1.5 s of event time
    path = tmp_path / "slow.jsonl"
    write_jsonl(path, evs)
    start = time.monotonic()
    s = replay_file(cfg, path, speed=3.0, progress=False, watermark=False)
    assert time.monotonic() - start >= 0.45  # 1.5 s / 3
    assert s.impressions == 16 and s.final_watermark_ts == 0


def test_cli_generate_and_replay_to_broker(cfg, tmp_path, capsys):
    conf = tmp_path / "streamrec.yaml"
    conf.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    assert main(["--config", str(conf), "generate", "--events", "300", "--seed", "5", "--no-progress"]) == 0
    assert "produced" in capsys.readouterr().out
    log = tmp_path / "l.jsonl"
    assert main(["--config", str(conf), "generate", "--events", "200", "--seed", "6", "--out", str(log)]) == 0
    assert main(["--config", str(conf), "replay", str(log), "--no-progress", "--no-watermark"]) == 0
    assert "replayed" in capsys.readouterr().out
    n = (simulate(GeneratorConfig(n_impressions=300, seed=5)).counts(),
         simulate(GeneratorConfig(n_impressions=200, seed=6)).counts())
    expected = sum(c["impression"] + c["click"] + c["conversion"] for c in n) + 3 * cfg.topics.partitions
    assert len(read_topics(cfg, cfg.topics.input_topics())) == expected
    assert main(["--config", str(conf), "replay", str(tmp_path / "missing.jsonl"), "--no-progress"]) == 1
