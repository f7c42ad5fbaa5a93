"""Configuration of the FIITED store: one frozen dataclass, checked once by :func:`validate`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

POOL_SHIFT = 24  # slot code = pool << POOL_SHIFT | row  (rows per pool < 16M)
ROW_MASK = (1 << POOL_SHIFT) - 1


@dataclass(frozen=True)
class FiitedConfig:
    """Knobs of :class:`embedding_store.fiited.FiitedEmbeddings` (and its reference twin).

    A full row is ``num_chunks * chunk_dim`` wide (= the trainer's ``embedding_dim``); a row lives in the
    pool of one of ``pool_chunks`` (allowed chunk counts, ascending, last = ``num_chunks``).

    * ``budget``: pool bytes (weights + row-wise momentum) allowed, as a fraction of fixed full-width tables
      (``T * rows * (D + 1) * 4``); :func:`importance.assign_chunks` fits the live rows under it.
    * ``maintain_every``: steps between eviction/admission passes; ``resize_every``: steps between resizes.
    * ``admit_hits``: a slot keeps using its table's shared row until it was seen this many times (0: it gets
      its own row before its first training lookup, while the budget has room).
    * ``ttl_steps``: a row unseen for this many steps is evicted unless its importance is in the top
      ``protect_quantile`` of live rows (the floor).
    * ``decay``: importance multiplier per maintenance pass (old gradient energy fades).
    * ``resize_fill``: a resize fits the live rows into this fraction of the budget; the rest is room for ids
      admitted before the next resize.
    * ``grow_momentum``: a row moved to a wider pool keeps this fraction of its row-wise Adagrad momentum
      (new chunks start at zero and must learn fast; the row's full momentum would freeze them).
    * ``headroom``: spare rows per pool after a compaction (fraction of the live rows).
    """

    chunk_dim: int = 8
    num_chunks: int = 8
    pool_chunks: tuple[int, ...] = (1, 2, 4, 8)
    budget: float = 0.25
    maintain_every: int = 50
    resize_every: int = 200
    admit_hits: int = 0
    ttl_steps: int = 5_000
    protect_quantile: float = 0.9
    decay: float = 0.5
    resize_fill: float = 0.9
    grow_momentum: float = 0.1
    headroom: float = 0.25
    lr: float = 0.05
    init_range: float = 0.01
    seed: int = 0

    @property
    def dim(self) -> int:
        return self.chunk_dim * self.num_chunks

    def pool_dims(self) -> tuple[int, ...]:
        return tuple(c * self.chunk_dim for c in self.pool_chunks)


def validate(cfg: FiitedConfig, dim: int | None = None, where: str = "FiitedConfig") -> FiitedConfig:
    """Raise ``ValueError`` naming ``<where>.<field>`` when ``cfg`` cannot work (``dim``: the trainer's
    embedding_dim)."""
    pc = cfg.pool_chunks
    checks = [
        ("chunk_dim", cfg.chunk_dim > 0 and cfg.chunk_dim % 4 == 0, "a positive multiple of 4 (fbgemm rows)"),
        ("num_chunks", cfg.num_chunks >= 1, ">= 1"),
        ("pool_chunks", len(pc) >= 1 and list(pc) == sorted(set(pc)) and pc[0] >= 1 and pc[-1] == cfg.num_chunks
         and len(pc) < 128, f"ascending distinct chunk counts in [1, {cfg.num_chunks}] ending at num_chunks"),
        ("budget", 0 < cfg.budget <= 1.5, "in (0, 1.5]"),
        ("maintain_every", cfg.maintain_every >= 1, ">= 1"),
        ("resize_every", cfg.resize_every >= cfg.maintain_every and cfg.resize_every % cfg.maintain_every == 0,
         "a multiple of maintain_every"),
        ("admit_hits", cfg.admit_hits >= 0, ">= 0"),
        ("ttl_steps", cfg.ttl_steps >= 1, ">= 1"),
        ("protect_quantile", 0 <= cfg.protect_quantile <= 1, "in [0, 1]"),
        ("decay", 0 <= cfg.decay <= 1, "in [0, 1]"),
        ("resize_fill", 0 < cfg.resize_fill <= 1, "in (0, 1]"),
        ("grow_momentum", 0 <= cfg.grow_momentum <= 1, "in [0, 1]"),
        ("headroom", cfg.headroom >= 0, ">= 0"),
        ("lr", cfg.lr > 0, "> 0"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"{where}.{name}: expected {want}, got {getattr(cfg, name)!r}")
    if dim is not None and dim != cfg.dim:
        raise ValueError(f"{where}.chunk_dim: chunk_dim * num_chunks = {cfg.dim} but the trainer's "
                         f"embedding_dim is {dim}")
    return cfg


def _coerce(name: str, kind: type, value: Any, where: str) -> Any:
    """One field value from YAML/JSON/env (ints for floats, lists for tuples) -> the field's type."""
    bad = ValueError(f"{where}.{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, bool):
        raise bad
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind is int and isinstance(value, int):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is tuple and isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where}.{name}: expected a list of integers, got {list(value)!r}")
        return tuple(value)
    raise bad


_KINDS = {"int": int, "float": float, "tuple[int, ...]": tuple}


def trainer_config(overrides: Mapping[str, Any] | None, dim: int, lr: float,
                   where: str = "trainer.fiited") -> FiitedConfig:
    """The store's config for a trainer of ``embedding_dim = dim`` and ``lr_sparse = lr``, then ``overrides``
    (``TrainerConfig.fiited``: field names of :class:`FiitedConfig`; lists for tuples).

    Defaults derived from the trainer: chunks of 8 (4 when ``dim`` is not a multiple of 8) making up ``dim``,
    the default pool widths that fit, ``lr = lr_sparse``. Raises ``ValueError`` naming ``<where>.<field>``.

    >>> trainer_config({"budget": 0.3, "pool_chunks": [1, 4, 8]}, 64, 0.05).pool_dims()
    (8, 32, 64)
    >>> trainer_config({"budgit": 1}, 64, 0.05)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: trainer.fiited.budgit: unknown field; expected one of ...
    """
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}: expected a mapping of FiitedConfig fields, got {type(overrides).__name__}")
    kinds = {f.name: _KINDS[str(f.type)] for f in fields(FiitedConfig)}
    vals: dict[str, Any] = {}
    for k, v in overrides.items():
        if k not in kinds:
            raise ValueError(f"{where}.{k}: unknown field; expected one of {', '.join(sorted(kinds))}")
        vals[k] = _coerce(k, kinds[k], v, where)
    if dim < 4 or dim % 4:
        raise ValueError(f"{where}: the trainer's embedding_dim must be a positive multiple of 4, got {dim}")
    chunk = vals.get("chunk_dim", 8 if dim % 8 == 0 else 4)
    if chunk <= 0 or dim % chunk:
        raise ValueError(f"{where}.chunk_dim: expected a positive divisor of embedding_dim {dim}, got {chunk}")
    n = dim // chunk
    pc = tuple(sorted({c for c in FiitedConfig.pool_chunks if c < n} | {n}))
    base = replace(FiitedConfig(), chunk_dim=chunk, num_chunks=n, pool_chunks=pc, lr=lr)
    return validate(replace(base, **vals), dim, where)
