"""Pooled sparse embeddings behind one interface, with two backends.

* ``fbgemm``: one ``SplitTableBatchedEmbeddingBagsCodegen`` (TBE) holding every table, with
  EXACT_ROWWISE_ADAGRAD fused into backward (the weights change during ``loss.backward()``).
* ``torch``: one ``nn.EmbeddingBag`` over all tables stacked (table ``t`` owns rows ``[t*R, (t+1)*R)``),
  sparse gradients and the same row-wise Adagrad written in torch ops, applied by :meth:`step`. Runs
  anywhere torch runs (CPU, CUDA without fbgemm).

Both take TBE input (``indices``, ``offsets`` of length ``T*B+1``, bag ``(t, b)`` at ``t*B+b``), return
``(B, T*D)`` sum-pooled vectors, and export/import the same state, so a checkpoint written by one backend
loads into the other: ``{"weights": (T, R, D) float32, "momentum": (T, R) float32}``.

Row-wise Adagrad, per touched row ``r`` with summed gradient ``g`` (D,)::

    momentum[r] += mean(g**2);  w[r] -= lr * g / (sqrt(momentum[r]) + eps)
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from embedding_store.base import SparseEmbeddings

log = logging.getLogger(__name__)
INIT_RANGE = 0.01  # uniform(-a, a) initial weights
EPS = 1e-8


class _QuietFbgemm(logging.Filter):
    """fbgemm_gpu logs dozens of INFO lines through the root logger at import and TBE creation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "fbgemm_gpu" not in record.pathname


def quiet_fbgemm_logs() -> None:
    """Keep fbgemm_gpu's INFO lines out of the root logger's handlers (a command's log)."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietFbgemm) for f in h.filters):
            h.addFilter(_QuietFbgemm())


@functools.lru_cache(maxsize=None)
def fbgemm_available(device_type: str = "cpu") -> bool:
    """fbgemm's TBE imports (and, for ``cuda``, the installed build is the CUDA one, not fbgemm-gpu-cpu)."""
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except Exception as e:  # ImportError, or a torch/fbgemm ABI mismatch raising at load
        if importlib.util.find_spec("fbgemm_gpu") is not None:
            log.warning("fbgemm_gpu is installed but does not load (%s); using the torch backend", e)
        return False
    if device_type == "cuda":
        try:
            importlib.metadata.version("fbgemm-gpu")
        except importlib.metadata.PackageNotFoundError:
            return False  # the CPU-only wheel has no CUDA kernels
    return True


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"trainer.device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def resolve_backend(name: str, device: torch.device = torch.device("cpu")) -> str:
    """``auto`` -> fbgemm when importable for ``device``, else torch."""
    if name == "auto":
        return "fbgemm" if fbgemm_available(device.type) else "torch"
    if name not in ("fbgemm", "torch", "fiited"):
        raise ValueError(f"trainer.backend: expected auto, fbgemm, torch or fiited, got {name!r}")
    if name == "fbgemm" and not fbgemm_available(device.type):
        raise ValueError(f"trainer.backend={name} but fbgemm_gpu is not usable on {device.type}; "
                         "use backend=torch or auto")
    return name


class FbgemmEmbeddings(SparseEmbeddings):
    """fbgemm TBE, row-wise Adagrad fused into backward."""

    def __init__(self, num_tables: int, rows: int, dim: int, lr: float, device: torch.device):
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            ComputeDevice,
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        self.num_tables, self.rows, self.dim = num_tables, rows, dim
        cuda = device.type == "cuda"
        loc = EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST
        comp = ComputeDevice.CUDA if cuda else ComputeDevice.CPU
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(rows, dim, loc, comp)] * num_tables,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=EPS,
            pooling_mode=PoolingMode.SUM, device=device)
        # CPU TBE weights start at all zeros: with zero weights nothing ever gets a gradient
        self.tbe.init_embedding_weights_uniform(-INIT_RANGE, INIT_RANGE)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        self._note_lookup(indices, offsets)
        return self.tbe(indices, offsets)

    @torch.no_grad()
    def serving_rows(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        slots = np.asarray(slots, dtype=np.int64)
        out = torch.empty(len(slots), self.dim)
        tables = slots // self.rows
        for t, w in enumerate(self.tbe.split_embedding_weights()):
            m = np.flatnonzero(tables == t)
            if len(m):
                rows = torch.from_numpy(slots[m] - t * self.rows).to(w.device)
                out[torch.from_numpy(m)] = w[rows].cpu()
        return out, torch.full((len(slots),), self.dim, dtype=torch.int16)

    @torch.no_grad()
    def write_rows(self, slots: np.ndarray, vectors: torch.Tensor) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        tables = slots // self.rows
        for t, w in enumerate(self.tbe.split_embedding_weights()):
            m = np.flatnonzero(tables == t)
            if len(m):
                rows = torch.from_numpy(slots[m] - t * self.rows).to(w.device)
                w[rows] = vectors[torch.from_numpy(m)].to(w.device, w.dtype)

    @torch.no_grad()
    def export_state(self) -> dict[str, torch.Tensor]:
        return {"weights": torch.stack([w.detach().cpu() for w in self.tbe.split_embedding_weights()]),
                "momentum": torch.stack([s[0].detach().cpu() for s in self.tbe.split_optimizer_states()])}

    @torch.no_grad()
    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self._check_state(state)
        self._note_import()
        # split_* return views into the TBE's flat buffers, so copy_ writes the live weights
        for t, w in enumerate(self.tbe.split_embedding_weights()):
            w.copy_(state["weights"][t])
        for t, s in enumerate(self.tbe.split_optimizer_states()):
            s[0].copy_(state["momentum"][t])


class TorchEmbeddings(SparseEmbeddings):
    """``nn.EmbeddingBag`` (sparse grads) over all tables stacked, row-wise Adagrad in :meth:`step`."""

    def __init__(self, num_tables: int, rows: int, dim: int, lr: float, device: torch.device):
        super().__init__()
        self.num_tables, self.rows, self.dim, self.lr = num_tables, rows, dim, lr
        self.bag = nn.EmbeddingBag(num_tables * rows, dim, mode="sum", sparse=True, include_last_offset=True,
                                   device=device)
        nn.init.uniform_(self.bag.weight, -INIT_RANGE, INIT_RANGE)
        self.register_buffer("momentum", torch.zeros(num_tables * rows, device=device))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        tb = offsets.numel() - 1
        b = tb // self.num_tables
        # shift each id into its table's row range: table of bag i is i // B, repeated over the bag's length
        table = torch.arange(tb, device=offsets.device) // b
        shift = torch.repeat_interleave(table * self.rows, offsets.diff(), output_size=indices.numel())
        if self._changed is not None and torch.is_grad_enabled():
            self._note_slots(indices + shift)
        pooled = self.bag(indices + shift, offsets)  # (T*B, D), bag t*B+b
        return pooled.view(self.num_tables, b, self.dim).transpose(0, 1).reshape(b, self.num_tables * self.dim)

    @torch.no_grad()
    def step(self) -> None:
        g = self.bag.weight.grad
        if g is None:
            return
        g = g.coalesce()  # sums repeated rows, like fbgemm's per-row dedup
        rows, vals = g.indices()[0], g.values()
        m = self.momentum[rows] + vals.pow(2).mean(dim=1)
        self.momentum[rows] = m
        self.bag.weight[rows] -= (self.lr / (m.sqrt() + EPS)).unsqueeze(1) * vals
        self.bag.weight.grad = None

    @torch.no_grad()
    def serving_rows(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(self.bag.weight.device)
        return self.bag.weight[idx].cpu(), torch.full((len(idx),), self.dim, dtype=torch.int16)

    @torch.no_grad()
    def write_rows(self, slots: np.ndarray, vectors: torch.Tensor) -> None:
        idx = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(self.bag.weight.device)
        self.bag.weight[idx] = vectors.to(self.bag.weight.device, self.bag.weight.dtype)

    @torch.no_grad()
    def export_state(self) -> dict[str, torch.Tensor]:
        return {"weights": self.bag.weight.detach().cpu().view(self.num_tables, self.rows, self.dim).clone(),
                "momentum": self.momentum.detach().cpu().view(self.num_tables, self.rows).clone()}

    @torch.no_grad()
    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self._check_state(state)
        self._note_import()
        self.bag.weight.copy_(state["weights"].reshape(-1, self.dim))
        self.momentum.copy_(state["momentum"].reshape(-1))


def make_embeddings(backend: str, num_tables: int, rows: int, dim: int, lr: float,
                    device: torch.device, fiited: Mapping[str, Any] | None = None) -> SparseEmbeddings:
    """``backend``: auto | fbgemm | torch | fiited (see :func:`resolve_backend`); ``fiited``: the store's knobs
    (``TrainerConfig.fiited``, FiitedConfig field names) when ``backend=fiited``, checked here."""
    name = resolve_backend(backend, device)
    if name == "fiited":  # variable-width rows (embedding_store/): FiitedConfig at this dim and lr + overrides
        from embedding_store.fiited import fiited_for_trainer
        return fiited_for_trainer(num_tables, rows, dim, lr, device, fiited)
    cls = FbgemmEmbeddings if name == "fbgemm" else TorchEmbeddings
    return cls(num_tables, rows, dim, lr, device)
