"""Foundation-model distillation in the learner (ExFM: auxiliary head, student adapter) and the FM/VM role
presets (docs/transfer.md). In-process, small synthetic streams, CPU."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
import torch

from config import TrainerConfig
from streams import schema
from trainer import export
from trainer.features import featurize
from trainer.model import Learner
from trainer.publish import Publisher, VersionStore
from trainer.roles import PRESETS, role_config, serves

TC = TrainerConfig(hash_buckets=1000, batch_size=128, device="cpu", backend="torch", user_model=False,
                   embedding_dim=8, history_len=2, cat_slots=1)
KD = msgspec.structs.replace(TC, teacher_weight=1.0, aux_head=False, student_adapter=False)
EXFM = msgspec.structs.replace(TC, teacher_weight=1.0, aux_head=True, student_adapter=True)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def stream(n: int, seed: int = 0, shift: float = 1.0, teacher_share: float = 1.0, start: int = 0
           ) -> tuple[list[schema.Example], np.ndarray]:
    """Examples whose true click logit depends on the ad and the domain, with a teacher whose click logit is
    the truth's + ``shift`` (post-click conversion: the truth's), on ``teacher_share`` of the rows; and the
    true click logits."""
    rng = np.random.default_rng(seed)
    ads = rng.integers(0, 50, n)
    dom = rng.integers(0, len(schema.DOMAINS), n)
    logit = -1.0 + 1.5 * (ads % 5 < 2) - 0.8 * (ads % 3 == 0) + 0.4 * (dom == 2)
    p = _sigmoid(logit)
    p_cvr = np.where(ads % 4 == 0, 0.5, 0.1)
    click = rng.random(n) < p
    conv = click & (rng.random(n) < p_cvr)
    has = rng.random(n) < teacher_share
    out = []
    for i in range(n):
        j = start + i
        imp = schema.Impression(event_id=f"i{j}", ts=1_700_000_000_000 + j, user_id=int(rng.integers(0, 300)),
                                ad_id=int(ads[i]), campaign_id=int(ads[i]) // 3, advertiser_id=1,
                                domain=schema.DOMAINS[int(dom[i])], cat=[int(ads[i]) % 7], dense=[0.0])
        pt = float(_sigmoid(logit[i] + shift))
        t = schema.Teacher(p_click=pt, p_conversion=pt * float(p_cvr[i]), model_version=j // 128,
                           scored_ts=1_700_000_000_000 + j - 5000) if has[i] else None
        out.append(schema.Example(example_id=f"e{j}", impression=imp, click=int(click[i]), conversion=int(conv[i]),
                                  emitted_ts=1_700_000_000_000 + j, teacher=t))
    return out, logit


def _dense(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("emb.")}


def test_teacher_columns_of_a_batch():
    exs, _ = stream(10, teacher_share=0.5)
    fb = featurize(exs, TC)
    has = np.array([e.teacher is not None for e in exs], np.float32)
    assert np.array_equal(fb.has_teacher, has) and 0 < has.sum() < 10
    assert np.all(fb.teacher_p_click[has == 0] == 0) and np.all(fb.teacher_version[has == 0] == -1)
    assert np.allclose(fb.teacher_age_s[has == 1], 5.0)
    b = fb.to_torch("cpu")
    assert torch.equal(b.has_teacher, torch.from_numpy(has))
    plain = featurize([msgspec.structs.replace(e, teacher=None) for e in exs], TC)
    assert plain.has_teacher is None and plain.to_torch("cpu").teacher_p_click is None


def test_aux_head_and_adapter_are_in_checkpoints_but_not_in_the_export_or_published_versions(tmp_path):
    learner = Learner(EXFM)
    exs, _ = stream(128 * 4, seed=1)
    for i in range(3):
        learner.train_step(featurize(exs[i * 128:(i + 1) * 128], EXFM))
    st = learner.state()
    assert any(k.startswith("aux.") for k in st["dense"]) and "adapter" in st and "adapter_opt" in st
    # a checkpoint restores everything: the next step is identical
    again = Learner(EXFM)
    again.load_state(st)
    last = featurize(exs[384:], EXFM)
    r1, r2 = learner.train_step(last), again.train_step(last)
    assert r1.loss == r2.loss
    for (k, a), (_, b) in zip(_dense(learner.model).items(), _dense(again.model).items()):
        assert torch.equal(a, b), k
    for a, b in zip(learner.adapter.parameters(), again.adapter.parameters()):
        assert torch.equal(a, b)
    probe = featurize(stream(64, seed=9)[0], EXFM)
    want = learner.score(probe)
    # the serving export: no aux.* and no adapter; it loads into a serving model and scores identically
    v = export.export(learner, tmp_path / "export")
    saved = torch.load(v / "model.pt", weights_only=True)
    assert saved["dense"] and not any(k.startswith("aux.") for k in saved["dense"])
    assert "adapter" not in saved
    m = export.load(tmp_path / "export", device="cpu", backend="torch")
    assert m.model.aux is None
    with torch.no_grad():
        got = m.model(probe.to_torch("cpu"))
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5, atol=1e-7)
    # a published version: the same
    Publisher(tmp_path / "pub").publish(learner, examples_trained=512)
    pub = VersionStore(tmp_path / "pub").load()
    assert pub.model.aux is None and not any(k.startswith("aux.") for k in pub.model.state_dict())
    dense_pt = torch.load(next((tmp_path / "pub").glob("v*/dense.pt")), weights_only=True)
    assert dense_pt and not any(k.startswith("aux.") for k in dense_pt)
    with torch.no_grad():
        got = pub.model(probe.to_torch("cpu"))
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tcfg", [KD, EXFM], ids=["plain-kd", "aux-adapter"])
def test_distillation_loss_comes_only_from_rows_with_a_teacher(tcfg):
    exs, _ = stream(128, seed=2, teacher_share=0.5)
    fb = featurize(exs, tcfg)
    rows = int(fb.has_teacher.sum())
    # garbage in the teacher columns of rows without a teacher changes nothing
    noisy = dataclasses.replace(fb, teacher_p_click=np.where(fb.has_teacher > 0, fb.teacher_p_click, 0.99)
                                .astype(np.float32), teacher_age_s=np.where(fb.has_teacher > 0, fb.teacher_age_s,
                                                                             1e6).astype(np.float32))
    a, b = Learner(tcfg), Learner(tcfg)
    ra, rb = a.train_step(fb), b.train_step(noisy)
    assert ra.teacher_rows == rb.teacher_rows == rows and ra.distill_loss > 0
    assert ra.loss == pytest.approx(rb.loss, rel=1e-6) and ra.distill_loss == pytest.approx(rb.distill_loss, rel=1e-6)
    assert a.distill_stats["teacher_rows"] == rows and a.distill_stats["rows"] == 128
    # a batch without any teacher: no distillation at all; plain KD then trains exactly like no distillation
    bare = featurize([msgspec.structs.replace(e, teacher=None) for e in exs], tcfg)
    c = Learner(tcfg)
    rc = c.train_step(bare)
    assert rc.teacher_rows == 0 and rc.distill_loss == 0.0
    if not tcfg.aux_head:
        ref = Learner(TC)
        rr = ref.train_step(bare)
        assert rr.loss == rc.loss
        for (k, x), (_, y) in zip(_dense(ref.model).items(), _dense(c.model).items()):
            assert torch.equal(x, y), k


def test_plain_kd_trains_the_serving_head_and_the_aux_path_leaves_it_to_the_labels():
    fb = featurize(stream(128, seed=3, shift=2.0)[0], TC)
    alone, kd, exfm = Learner(TC), Learner(KD), Learner(EXFM)
    assert kd.model.aux is None and kd.adapter is None
    assert exfm.model.aux is not None and exfm.adapter is not None
    with pytest.raises(ValueError, match="no auxiliary head"):
        kd.model.distill_logits(fb.to_torch("cpu"))
    r0, r1, r2 = alone.train_step(fb), kd.train_step(fb), exfm.train_step(fb)
    # same initial serving model: progressive predictions are the serving head's, identical before any update
    assert np.array_equal(r0.p_click, r1.p_click) and np.array_equal(r0.p_click, r2.p_click)
    g0, g1, g2 = (m.model.head_w.grad for m in (alone, kd, exfm))
    assert not torch.allclose(g1, g0)  # plain KD: the teacher pulls on the serving head itself
    assert torch.allclose(g2, g0, atol=1e-7)  # ExFM: the serving head learns from the labels only ...
    assert exfm.model.aux.head_w.grad.abs().sum() > 0  # ... the auxiliary head from the (adapted) teacher ...
    assert not torch.allclose(exfm.model.bottom.weight.grad, alone.model.bottom.weight.grad)  # ... via shared weights
    assert exfm.adapter.scale.weight.grad.abs().sum() > 0  # the adapter learns from the true labels
    # aux head without an adapter: the raw teacher is its target (the adapter starts as the identity: same loss)
    raw = Learner(msgspec.structs.replace(EXFM, student_adapter=False))
    assert raw.adapter is None and raw.train_step(fb).distill_loss == pytest.approx(r2.distill_loss, rel=1e-5)


def test_the_adapter_learns_to_undo_a_teacher_shifted_by_one():
    learner = Learner(EXFM)
    exs, _ = stream(128 * 40, seed=4, shift=1.0)
    for i in range(0, len(exs), 128):
        learner.train_step(featurize(exs[i:i + 128], EXFM))
    probe, truth = stream(2000, seed=5, shift=1.0, start=10**6)
    fb = featurize(probe, EXFM)
    pc, _ = learner.adapted_teacher(fb)
    corrected = np.log(pc / (1 - pc))
    raw_err = np.abs(np.log(fb.teacher_p_click / (1 - fb.teacher_p_click)) - truth).mean()
    err = np.abs(corrected - truth).mean()
    assert raw_err == pytest.approx(1.0, abs=1e-3)
    assert err < 0.25, f"adapter's mean |logit error| {err:.3f} (teacher's {raw_err:.3f})"
    assert abs((corrected - truth).mean()) < 0.2  # the +1 bias is gone


def test_role_presets_and_vm_domains():
    fm = role_config(TrainerConfig(role="fm"))
    vm = role_config(TrainerConfig(role="vm", vm_domains=("search",)))
    assert fm.hash_buckets > TrainerConfig().hash_buckets > vm.hash_buckets
    assert fm.embedding_dim > vm.embedding_dim and fm.history_len > vm.history_len and vm.cat_slots < fm.cat_slots
    assert fm.user_model and not vm.user_model and vm.teacher_weight > 0 and fm.teacher_weight == 0
    assert role_config(TrainerConfig()) == TrainerConfig()
    # explicitly set fields stay: a non-default value, or a name in `explicit`
    kept = role_config(TrainerConfig(role="vm", hash_buckets=7777, teacher_weight=0.3))
    assert kept.hash_buckets == 7777 and kept.teacher_weight == 0.3 and kept.embedding_dim == PRESETS["vm"]["embedding_dim"]
    assert role_config(TrainerConfig(role="fm", history_len=8), explicit=["history_len"]).history_len == 8
    with pytest.raises(ValueError, match="role"):
        role_config(TrainerConfig(role="teacher"))
    assert serves(vm, "search") and not serves(vm, "feed") and serves(fm, "feed")
    assert serves(msgspec.structs.replace(vm, vm_domains=()), "feed")  # a VM of no listed domain serves all
    Learner(msgspec.structs.replace(vm, device="cpu", hash_buckets=1000))  # the preset builds a model


def test_sudden_levels_is_sudden_plus_per_domain_level_jumps():
    from streams.sources.generate import GeneratorConfig, simulate
    from streams.sources.scenarios import ScenarioConfig

    def logits(name):
        sim = simulate(GeneratorConfig(n_impressions=3000, seed=4, scenario=ScenarioConfig(name=name, at=0.5)))
        p = sim.truth.column("p_click").to_numpy()
        return np.log(p / (1 - p)), sim

    base, sim = logits("sudden")
    lev, sim2 = logits("sudden-levels")
    assert sim.truth.column("impression_id").to_pylist() == sim2.truth.column("impression_id").to_pylist()
    dom = np.array([sim.config.domains.index(d) for d in sim.truth.column("domain").to_pylist()])
    ts = sim.truth.column("ts").to_numpy()
    after = (ts - ts[0]) / (ts[-1] - ts[0]) >= 0.5
    want = np.where(after, 0.7 * np.where(dom % 2 == 0, 1.0, -1.0), 0.0)
    np.testing.assert_allclose(lev - base, want, atol=1e-6)


def test_bench_transfer_runs_end_to_end_on_a_tiny_stream():
    from benchmarks import transfer

    res, _ = transfer.run("stationary", 2000, 256, 1.0, 0, lambda s: None)
    assert {"FM itself", "VM alone", "+ plain KD", transfer.ALL_TOGETHER} <= set(res)
    assert all(0.3 < res[m]["pooled"] < 1.0 for m in res)
    rows: list = []
    ratios = transfer.table("stationary", res, rows)
    assert len(rows) == len(res) * 6 and set(ratios["+ plain KD"]) == {"pooled", *transfer.DOMAINS}
    assert {transfer.LOOPFM, transfer.ALL_TOGETHER} <= set(ratios)  # LoopFM and everything together are rows
