"""Configuration of the FIITED store: :class:`config.FiitedConfig` (defined with the rest of the configuration,
so ``TrainerConfig.fiited`` is typed), checked once by :func:`validate`, and derived from a trainer's settings by
:func:`trainer_config`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import msgspec

from config import FiitedConfig, FiitedOverrides

__all__ = ["POOL_SHIFT", "ROW_MASK", "FiitedConfig", "FiitedOverrides", "trainer_config", "validate"]

POOL_SHIFT = 24  # slot code = pool << POOL_SHIFT | row  (rows per pool < 16M)
ROW_MASK = (1 << POOL_SHIFT) - 1


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
        ("kernel", cfg.kernel in ("auto", "cpp", "torch", "fbgemm"), "one of auto, cpp, torch, fbgemm"),
        ("live_budget", 0 <= cfg.live_budget <= 1.5, "0 (off) or in (0, 1.5]"),
        ("importance_power", 0 < cfg.importance_power <= 4, "in (0, 4]"),
        ("sketch_width", cfg.sketch_width >= 16, ">= 16"),
        ("sketch_depth", 1 <= cfg.sketch_depth <= 8, "in [1, 8]"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"{where}.{name}: expected {want}, got {getattr(cfg, name)!r}")
    if dim is not None and dim != cfg.dim:
        raise ValueError(f"{where}.chunk_dim: chunk_dim * num_chunks = {cfg.dim} but the trainer's "
                         f"embedding_dim is {dim}")
    return cfg


def trainer_config(overrides: FiitedOverrides | Mapping[str, Any] | None, dim: int, lr: float,
                   where: str = "trainer.fiited") -> FiitedConfig:
    """The store's config for a trainer of ``embedding_dim = dim`` and ``lr_sparse = lr``, then ``overrides``
    (``TrainerConfig.fiited``, or a mapping of :class:`FiitedConfig` field names, converted by msgspec).

    Defaults derived from the trainer: chunks of 8 (4 when ``dim`` is not a multiple of 8) making up ``dim``,
    the default pool widths that fit, ``lr = lr_sparse``. Raises ``ValueError`` naming ``<where>.<field>``.

    >>> trainer_config({"budget": 0.3, "pool_chunks": [1, 4, 8]}, 64, 0.05).pool_dims()
    (8, 32, 64)
    >>> trainer_config({"budgit": 1}, 64, 0.05)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: trainer.fiited.budgit: unknown field
    """
    if overrides is None:
        overrides = FiitedOverrides()
    elif isinstance(overrides, Mapping):
        try:
            overrides = msgspec.convert(overrides, FiitedOverrides, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(_field_error(str(e), where)) from None
    elif not isinstance(overrides, FiitedOverrides):
        raise ValueError(f"{where}: expected a mapping of FiitedConfig fields, got {type(overrides).__name__}")
    vals = {k: v for k, v in msgspec.structs.asdict(overrides).items() if v is not None}
    if dim < 4 or dim % 4:
        raise ValueError(f"{where}: the trainer's embedding_dim must be a positive multiple of 4, got {dim}")
    chunk = vals.get("chunk_dim", 8 if dim % 8 == 0 else 4)
    if chunk <= 0 or dim % chunk:
        raise ValueError(f"{where}.chunk_dim: expected a positive divisor of embedding_dim {dim}, got {chunk}")
    n = dim // chunk
    pc = tuple(sorted({c for c in FiitedConfig.pool_chunks if c < n} | {n}))
    base = replace(FiitedConfig(), chunk_dim=chunk, num_chunks=n, pool_chunks=pc, lr=lr)
    return validate(replace(base, **vals), dim, where)


def _field_error(msg: str, where: str) -> str:
    """msgspec's "Expected `int | null`, got `bool` - at `$.admit_hits`" as "<where>.admit_hits: expected int, got
    bool"; "Object contains unknown field `budgit`" as "<where>.budgit: unknown field"."""
    unknown = re.match(r"Object contains unknown field `(\w+)`", msg)
    if unknown:
        return f"{where}.{unknown.group(1)}: unknown field; expected one of {', '.join(FiitedOverrides.__struct_fields__)}"
    m = re.match(r"(.*) - at `\$\.(\w+)(.*)`$", msg)
    if not m:
        return f"{where}: {msg}"
    what = m.group(1).replace(" | null", "").replace("`", "")
    return f"{where}.{m.group(2)}{m.group(3)}: {what[0].lower()}{what[1:]}"
