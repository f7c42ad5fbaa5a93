"""Replaying a native log with the decoder worker process: the same messages, partitions, order and dead
letters as decoding in the replaying process; worker failures surface; the worker never outlives its parent."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict

import pytest

from conftest import make_config, read_topics
from streams import schema
from streams.sources import decode_worker, lineplan, replay
from streams.sources.generate import GeneratorConfig, simulate
from streams.sources.logfile import encode_line, iter_blocks


def _wait_ready(self) -> bool:  # hand over at the first block instead of when the worker happens to be up
    return bool(select.select([self.proc.stdout], [], [], 30)[0])


def _sometimes_ready(self) -> bool:
    """Hand over at the first block, then answer at random: "not ready" makes the parent claim blocks."""
    if not getattr(self, "_handed_over", False):
        self._handed_over = True
        return _wait_ready(self)
    return _rng.random() < 0.5


_rng = random.Random(7)


def _log(path, seed: int = 21) -> list[bytes]:
    """A log with bad lines (some at block borders), blank and whitespace lines, CRLF line ends, a mid-log
    watermark and an oversized line; returns its lines."""
    recs = simulate(GeneratorConfig(n_impressions=1500, seed=seed, bad_rate=0.02)).records
    lines = [encode_line(r) for r in recs]
    good_ts = [r.ts for r in recs if hasattr(r, "ts")]
    lines.insert(700, schema.encode(schema.Watermark(ts=good_ts[len(good_ts) // 2])))
    lines[10:10] = [b"", b"   ", b"{not json"]
    lines[40] = lines[40] + b"\r"
    lines.insert(900, b"x" * 5000)  # longer than a test block
    path.write_bytes(b"\n".join(lines) + b"\r\n")
    return lines


def _placement(cfg) -> tuple[dict, list]:
    msgs = read_topics(cfg, cfg.topics.input_topics())
    by_part = defaultdict(list)
    for m in msgs:
        by_part[(m.topic().rsplit("_", 1)[-1], m.partition())].append((m.key(), m.value()))
    dls = [schema.decode(m.value(), schema.DeadLetter) for m in read_topics(cfg, [cfg.topics.dead_letters])]
    return dict(by_part), sorted((d.offset, d.reason, d.raw) for d in dls)


@pytest.mark.parametrize("ready", [_wait_ready, _sometimes_ready], ids=["worker-only", "claims"])
def test_worker_replay_equals_inline_replay(cfg, tmp_path, monkeypatch, broker, ready):
    monkeypatch.setattr(replay, "BLOCK_BYTES", 8192)  # many blocks, bad lines at their borders
    monkeypatch.setattr(decode_worker.DecoderProcess, "ready", ready)
    claims = []
    claim = decode_worker.DecoderProcess.claim
    monkeypatch.setattr(decode_worker.DecoderProcess, "claim", lambda self, first: claims.append(first) or claim(self, first))
    path = tmp_path / "log.jsonl"
    lines = _log(path)
    s_par = replay.replay_file(cfg, path, progress=False, parallel=True)
    cfg2 = make_config(tmp_path / "inline", broker)
    from streams.bus import kafka_io

    kafka_io.ensure_topics(broker, cfg2.topics.all(), cfg2.topics.partitions)
    s_one = replay.replay_file(cfg2, path, progress=False, parallel=False)
    assert (s_par.impressions, s_par.clicks, s_par.conversions, s_par.watermarks, s_par.dead_letters, s_par.lines,
            s_par.final_watermark_ts) == (s_one.impressions, s_one.clicks, s_one.conversions, s_one.watermarks,
                                          s_one.dead_letters, s_one.lines, s_one.final_watermark_ts)
    parts_par, dls_par = _placement(cfg)
    parts_one, dls_one = _placement(cfg2)
    assert parts_par == parts_one  # same messages, keys, partitions and order in every partition
    assert dls_par == dls_one and len(dls_par) == s_par.dead_letters
    bad = {i + 1 for i, x in enumerate(lines) if x.strip() and isinstance(schema.decode(x.rstrip(b"\r")), schema.Invalid)}
    assert {d[0] for d in dls_par} == bad and all(r.startswith(f"line {n}: ") for n, r, _ in dls_par)
    assert s_par.lines == sum(1 for x in lines if x.strip())
    assert (len(claims) > 5) == (ready is _sometimes_ready)
    for (topic, _), msgs in parts_par.items():  # the mid-log watermark reached every partition once
        assert sum(v.startswith(b'{"type":"watermark"') for _, v in msgs) == 2, topic


def test_worker_plans_equal_local_plans(tmp_path):
    path = tmp_path / "log.jsonl"
    _log(path, seed=22)
    router = lineplan.Router(3)
    blocks = list(iter_blocks(path, size=16384))
    with decode_worker.DecoderProcess(path, 3, 16384) as w:
        w.begin(blocks[2].offset, blocks[2].first)  # starting mid-file, as after a hand-over
        for b in blocks[2:]:
            assert w.next_plan() == lineplan.plan_block(lineplan.split_lines(b.data), b.first, router, b.data)
        assert w.next_plan() is None


def test_worker_error_and_crash_surface(tmp_path):
    with decode_worker.DecoderProcess(tmp_path / "missing.jsonl", 2) as w:
        w.begin(0, 1)
        with pytest.raises(RuntimeError, match="decoder worker .* failed on .*missing.jsonl: FileNotFoundError"):
            w.next_plan()
    path = tmp_path / "log.jsonl"
    _log(path)
    path.write_bytes(path.read_bytes() * 30)  # 30 copies: the worker is still planning when killed
    with decode_worker.DecoderProcess(path, 2, 4096) as w:
        w.begin(0, 1)
        assert w.next_plan() is not None
        assert w.proc.poll() is None
        os.kill(w.proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exited with code -9"):
            while True:
                w.next_plan()


def test_worker_dies_with_its_parent(tmp_path):
    path = tmp_path / "log.jsonl"
    _log(path)
    code = textwrap.dedent(f"""
        import sys, time
        from streams.sources.decode_worker import DecoderProcess
        w = DecoderProcess({str(path)!r}, 2, 4096)
        w.begin(0, 1)   # the worker fills the pipe and blocks; this parent never reads again
        print(w.proc.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)  # alive
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _zombie(pid):
            return  # dead, waiting for init to reap it
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"decoder worker {pid} outlived its parent")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_small_logs_start_no_worker(cfg, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a worker was started for a small log")

    monkeypatch.setattr(replay, "DecoderProcess", refuse)
    path = tmp_path / "small.jsonl"
    _log(path)
    assert path.stat().st_size < replay.WORKER_MIN_BYTES
    s = replay.replay_file(cfg, path, progress=False)
    assert s.events > 1000


def test_worker_out_of_step_with_the_file_falls_back_to_local_plans(cfg, tmp_path, monkeypatch, broker):
    """A worker that reads different bytes (the file changed under the replay) is dropped at the first block
    it sees differently; the replay still sends exactly what the file holds."""
    monkeypatch.setattr(replay, "BLOCK_BYTES", 8192)
    monkeypatch.setattr(decode_worker.DecoderProcess, "ready", _wait_ready)
    path, other = tmp_path / "log.jsonl", tmp_path / "other.jsonl"
    lines = _log(path)
    other.write_bytes(b"\n".join(lines[:600] + lines[601:]) + b"\n")  # one line fewer from block ~8 on
    real = replay.DecoderProcess
    monkeypatch.setattr(replay, "DecoderProcess", lambda p, *a: real(other, *a))
    s = replay.replay_file(cfg, path, progress=False, parallel=True)
    ref = simulate(GeneratorConfig(n_impressions=1500, seed=21, bad_rate=0.02)).counts()
    assert (s.impressions, s.clicks, s.conversions) == (ref["impression"], ref["click"], ref["conversion"])
    assert s.lines == sum(1 for x in lines if x.strip())


def test_a_claim_after_the_worker_reached_the_end_is_harmless(tmp_path):
    path = tmp_path / "log.jsonl"
    _log(path)
    n_blocks = sum(1 for _ in iter_blocks(path, size=8192))
    with decode_worker.DecoderProcess(path, 2, 8192) as w:
        w.begin(0, 1)
        assert w.proc.wait(30) == 0  # it planned every block into the pipe and exited
        w.claim(123)  # the parent claims a block it has not read yet: the pipe is closed by then
        plans = []
        while (p := w.next_plan()) is not None:
            plans.append(p)
    assert len(plans) == n_blocks and plans[0].first == 1
