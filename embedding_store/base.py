"""The sparse-embedding backend interface shared by fixed-dimension tables (trainer/embeddings.py) and the
FIITED variable-dimension store (embedding_store/fiited.py)."""

from __future__ import annotations

import torch
from torch import nn

from streams.names import Stat


class SparseEmbeddings(nn.Module):
    """Interface: ``forward(indices, offsets) -> (B, T*D)``; ``step()`` after backward; state export/import."""

    num_tables: int
    rows: int
    dim: int

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
