"""The sparse-embedding backend interface shared by fixed-dimension tables (trainer/embeddings.py) and the
FIITED variable-dimension store (embedding_store/fiited.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from streams.names import Stat


@dataclass(frozen=True)
class Changes:
    """What may have changed in :meth:`SparseEmbeddings.serving_state` since the previous
    :meth:`SparseEmbeddings.take_changes` (a superset: a listed slot may hold the same vector).

    ``slots`` (K,) int64 sorted global slots ``t * rows + r`` whose vector or width may differ; ``shared_tables``
    (S,) int64 tables whose *shared* row changed (a FIITED store: every slot that reads it changed with it, see
    :meth:`SparseEmbeddings.serving_shared`); fixed-width tables have none."""

    slots: np.ndarray
    shared_tables: np.ndarray


class SparseEmbeddings(nn.Module):
    """Interface: ``forward(indices, offsets) -> (B, T*D)``; ``step()`` after backward; state export/import.

    Change tracking (continuous publishing, trainer/publish.py): after :meth:`track_changes`, every training
    lookup (``forward`` with grad enabled) marks the slots it read in a bitmap of ``T * rows`` bits;
    :meth:`take_changes` returns them and starts over. :meth:`import_state` makes every slot changed
    (``take_changes`` returns None: publish a full snapshot)."""

    num_tables: int
    rows: int
    dim: int
    _changed: torch.Tensor | None = None  # (T * rows,) bool on the lookups' device, while tracking
    _changed_all = False

    # -- change tracking -----------------------------------------------------------------------------
    def track_changes(self) -> None:
        """Start recording changed slots from now on (again: forget what was recorded)."""
        self._changed = torch.zeros(self.num_tables * self.rows, dtype=torch.bool)
        self._changed_all = False

    def take_changes(self) -> Changes | None:
        """The slots changed since :meth:`track_changes` or the previous call, and start over; None when not
        tracking or when everything may have changed (a state import)."""
        if self._changed is None or self._changed_all:
            return None
        slots = torch.nonzero(self._changed).view(-1).cpu().numpy().astype(np.int64)
        self._changed.zero_()
        return Changes(slots, np.zeros(0, dtype=np.int64))

    def _note_slots(self, slots: torch.Tensor) -> None:
        """Mark global ``slots`` (any int tensor) changed, when tracking."""
        if self._changed is not None:
            if self._changed.device != slots.device:
                self._changed = self._changed.to(slots.device)
            self._changed[slots] = True

    def _note_lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        """A training lookup of TBE input ``(indices, offsets)``: its slots may change in the update."""
        if self._changed is None or not torch.is_grad_enabled():
            return
        tb = offsets.numel() - 1
        table = torch.arange(tb, device=offsets.device) // max(tb // self.num_tables, 1)
        shift = torch.repeat_interleave(table * self.rows, offsets.diff(), output_size=indices.numel())
        self._note_slots(indices.long() + shift)

    def _note_import(self) -> None:
        if self._changed is not None:
            self._changed_all = True

    # -- serving layout ------------------------------------------------------------------------------
    @torch.no_grad()
    def serving_rows(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The :meth:`serving_state` entries of global ``slots`` (K,): ``(vectors (K, D) float32, widths (K,)
        int16)`` on the CPU (backends override this with a gather; this default copies every table)."""
        w = self.export_state()["weights"].reshape(-1, self.dim)
        idx = torch.from_numpy(np.asarray(slots, dtype=np.int64))
        return w[idx].clone(), torch.full((len(idx),), self.dim, dtype=torch.int16)

    def serving_shared(self) -> np.ndarray | None:
        """(T * rows,) bool: slots that read their table's shared row (a FIITED store's ids not admitted yet);
        None for fixed-width tables (no shared rows)."""
        return None

    @torch.no_grad()
    def shared_rows(self, tables: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (S, D), widths (S,))`` of the shared rows of ``tables`` (stores with shared rows)."""
        raise NotImplementedError(f"{type(self).__name__} has no shared rows")

    @torch.no_grad()
    def write_rows(self, slots: np.ndarray, vectors: torch.Tensor) -> None:
        """Overwrite the weights of global ``slots`` (K,) with ``vectors`` (K, D) (a serving copy receiving a
        published delta; optimizer state untouched). Fixed-width backends only."""
        raise NotImplementedError(f"{type(self).__name__} cannot write rows in place")

    def step(self) -> None:
        """Apply the sparse optimizer after ``backward()`` (no-op where it is fused into backward)."""

    def export_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def memory_report(self) -> dict[str, float]:
        """Gauges for ``ServiceStats.values`` (the trainer publishes them every second): bytes and rows per row
        width, ``embedding_bytes_d<width>`` and ``embedding_rows_d<width>``. Fixed tables (fbgemm TBE, torch
        EmbeddingBag) hold every row at ``dim``: float32 weights and one float32 row-wise Adagrad momentum per
        row; a variable-width store overrides this with one entry per width (and its own details)."""
        rows = self.num_tables * self.rows
        return {f"{Stat.EMBEDDING_BYTES_PREFIX}{self.dim}": float(rows * 4 * (self.dim + 1)),
                f"{Stat.EMBEDDING_ROWS_PREFIX}{self.dim}": float(rows)}

    @torch.no_grad()
    def serving_state(self) -> dict[str, torch.Tensor]:
        """What scoring needs, in one layout for every backend (a serving export, trainer/export.py):
        ``weights`` (T, R, D) float32, the vector each slot looks up, and ``widths`` (T, R) int16, how many of
        its leading columns come from the row it reads (the rest are zeros). Fixed tables: their weights, all
        ``D`` wide; a variable-width store overrides this (its :meth:`export_state` has no dense table)."""
        w = self.export_state()["weights"]
        return {"weights": w, "widths": torch.full(w.shape[:2], self.dim, dtype=torch.int16)}

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        want = {"weights": (self.num_tables, self.rows, self.dim), "momentum": (self.num_tables, self.rows)}
        for k, shape in want.items():
            got = tuple(state[k].shape) if k in state else None
            if got != shape:
                raise ValueError(f"embedding state {k!r}: expected shape {shape}, got {got} "
                                 "(checkpoint written with other trainer.hash_buckets/embedding_dim/cat_slots?)")
