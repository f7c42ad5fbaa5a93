"""FIITED's lookup kernels (embedding_store/kernels): the C++ kernel and the device-generic torch path against the
dict/numpy reference twin (the oracle) and the old fbgemm path, on every pool width, duplicates, empty bags and
shared rows; the kernel switch; the build cache."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_store import kernels
from embedding_store.config import POOL_SHIFT, ROW_MASK, FiitedConfig, trainer_config
from embedding_store.fiited import FiitedEmbeddings, fiited_for_trainer
from embedding_store.reference import ReferenceStore

T, R, B = 3, 40, 6
# every slot placed by hand, none admitted or maintained during the test: only the kernels differ between stores
CFG = FiitedConfig(chunk_dim=4, num_chunks=4, pool_chunks=(1, 2, 3, 4), budget=1.0, maintain_every=10**6,
                   resize_every=10**6, admit_hits=10**6, ttl_steps=10**6, lr=0.1)


def to_reference(f: FiitedEmbeddings) -> ReferenceStore:
    """A reference twin holding exactly ``f``'s rows and momenta (private rows and shared rows)."""
    r = ReferenceStore(f.num_tables, f.rows, f.cfg)
    for s in np.flatnonzero(f.code.numpy()).tolist():
        c = int(f.code[s])
        p, row = c >> POOL_SHIFT, c & ROW_MASK
        t = s // f.rows
        r.private[s] = [p, f.pools.weights(t, p)[row].numpy().copy(), np.float32(f.pools.momentum(t, p)[row])]
    for t in range(f.num_tables):
        r.shared[t] = [f.pools.weights(t, 0)[0].numpy().copy(), np.float32(f.pools.momentum(t, 0)[0])]
    return r


def batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """T*B bags of 0-4 ids (empty bags), ids from a small hot range (duplicates within bags and across them)."""
    lengths = rng.integers(0, 5, T * B)
    lengths[rng.integers(0, T * B)] = 0
    idx = rng.integers(0, 12, int(lengths.sum()))
    return torch.from_numpy(idx), torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))


def placed(kernel: str, seed: int = 0) -> FiitedEmbeddings:
    """A store whose slots 0..9 of each table sit on the shared row, the rest in random pools (every width)."""
    f = FiitedEmbeddings(T, R, replace(CFG, kernel=kernel))
    rng = np.random.default_rng(seed)
    slots = np.array([t * R + v for t in range(T) for v in range(10, R)])
    pools = rng.integers(0, len(CFG.pool_chunks), len(slots))
    pools[: len(CFG.pool_chunks)] = np.arange(len(CFG.pool_chunks))  # each width at least once
    f.place(slots, pools)
    with torch.no_grad():  # distinct values and some momentum everywhere (init leaves private rows small)
        f.pools.w.copy_(torch.randn(f.pools.w.shape, generator=torch.Generator().manual_seed(seed)))
        f.pools.m.uniform_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return f


def available() -> list[str]:
    """The C++ kernel must build wherever a compiler is (only a machine without g++ runs the torch path alone)."""
    if kernels.load():
        return ["cpp", "torch"]
    assert shutil.which(kernels.os.environ.get("CXX", "g++")) is None, f"C++ kernel build failed: {kernels._failed}"
    return ["torch"]


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_kernel_matches_reference_and_fbgemm(kernel):
    if kernel not in available():
        pytest.skip("no C++ compiler here: the torch path only")
    f, old = placed(kernel), placed("fbgemm")
    assert f.kernel == kernel and old.kernel == "fbgemm"
    assert set((f.code.numpy()[f.code.numpy() != 0] >> POOL_SHIFT).tolist()) == set(range(len(CFG.pool_chunks)))
    ref = to_reference(f)
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        idx, off = batch(rng)
        g = torch.randn(B, T * CFG.dim, generator=gen)
        outs = [s(idx, off) for s in (f, old, ref)]
        assert outs[0].shape == (B, T * CFG.dim)
        for o in outs[1:]:
            torch.testing.assert_close(outs[0], o, rtol=1e-5, atol=1e-6)
        for o, s in zip(outs, (f, old, ref)):
            (o * g).sum().backward()
            s.step()
        every = np.arange(T * R)
        want = np.stack([ref.row(t, v) for t in range(T) for v in range(R)])
        np.testing.assert_allclose(f.vectors(every).numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(old.vectors(every).numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([f.row_momentum(t, v) for t in range(T) for v in range(R)],
                                   [ref.row_momentum(t, v) for t in range(T) for v in range(R)], rtol=1e-5, atol=1e-7)
    # a narrow row's padding stays zero, and a row that trained moved (no silent no-op)
    moved = np.abs(f.pools.w.numpy() - placed(kernel).pools.w.numpy()).max()
    assert moved > 1e-3
    assert torch.equal(f.pools.w != placed(kernel).pools.w, old.pools.w != placed(kernel).pools.w)


def test_kernel_is_a_no_op_without_grad_and_on_an_empty_batch():
    for k in available():
        f = placed(k)
        w0 = f.pools.w.clone()
        with torch.no_grad():
            y = f(*batch(np.random.default_rng(2)))
        empty = f(torch.zeros(0, dtype=torch.int64), torch.zeros(T * B + 1, dtype=torch.int64))
        assert torch.equal(empty, torch.zeros(B, T * CFG.dim))
        empty.sum().backward()
        f.step()
        assert y.shape == (B, T * CFG.dim) and torch.equal(f.pools.w, w0)
        assert f(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)).shape == (0, T * CFG.dim)


def test_kernel_choice_config_env_and_devices(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert FiitedEmbeddings(2, 8, replace(CFG, kernel="torch")).kernel == "torch"
    monkeypatch.setenv(kernels.ENV, "fbgemm")  # the comparison switch beats the config
    assert FiitedEmbeddings(2, 8, replace(CFG, kernel="torch")).kernel == "fbgemm"
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="STREAMREC_FIITED_KERNEL"):
        FiitedEmbeddings(2, 8, CFG)
    monkeypatch.delenv(kernels.ENV)
    with pytest.raises(ValueError, match="trainer.fiited.kernel"):
        trainer_config({"kernel": "fast"}, 32, 0.05)
    cuda = torch.device("cuda")
    assert kernels.resolve("auto", cuda) == "torch"  # the CUDA path (decided without touching a device)
    for k in ("cpp", "fbgemm"):
        with pytest.raises(ValueError, match="CPU only"):
            kernels.resolve(k, cuda)
    # the trainer's fiited backend no longer refuses other devices: the torch path, here run on the CPU
    emb = fiited_for_trainer(2, 50, 16, 0.05, torch.device("cpu"), {"kernel": "torch"})
    out = emb(torch.tensor([1, 2, 2, 3]), torch.tensor([0, 1, 3, 3, 4]))
    out.sum().backward()
    emb.step()
    assert emb.kernel == "torch" and emb.steps == 1 and out.shape == (2, 32)


def test_build_is_cached_keyed_and_atomic(tmp_path, monkeypatch):
    """The library is built once per (source, compile command, torch version) into the cache; a cached library
    is reused without running the compiler. (The compiler is faked here: other tests build the real one.)"""
    assert f"kPoolShift = {POOL_SHIFT};" in kernels.SOURCE.read_text()  # the C++ decodes the same slot codes
    monkeypatch.setenv("STREAMREC_KERNEL_CACHE", str(tmp_path))
    calls = []

    def fake_compiler(cmd, **kw):
        calls.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"lib")
        return __import__("subprocess").CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(kernels.subprocess, "run", fake_compiler)
    lib = kernels.build()
    assert lib.parent.parent == tmp_path and lib.read_bytes() == b"lib" and len(calls) == 1
    assert calls[0][0] in ("g++", kernels.os.environ.get("CXX")) and str(kernels.SOURCE) in calls[0]
    assert "-fPIC" in calls[0] and any(a.startswith("-D_GLIBCXX_USE_CXX11_ABI=") for a in calls[0])
    assert kernels.build() == lib and len(calls) == 1  # cached
    assert kernels.build(force=True) == lib and len(calls) == 2
    assert [p.name for p in lib.parent.iterdir() if p.suffix == ".so"] == [kernels.LIB_NAME]  # no temp left
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert kernels.build_dir() != lib.parent  # another torch gets its own build

    def failing(cmd, **kw):
        return __import__("subprocess").CompletedProcess(cmd, 1, "", "error: no compiler")

    monkeypatch.setattr(kernels.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match="no compiler"):
        kernels.build()
    assert not list(kernels.build_dir().glob("*.so"))
