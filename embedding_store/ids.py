"""Ids at the edge: raw ids and TBE batches are validated here, never inside a kernel; and the id mix
(:func:`splitmix64`) the trainer's hashing and the store's initial values share.

>>> validate_ids([0, 7, 2**64 - 1]).dtype
dtype('uint64')
>>> validate_ids([3, -1], where="ad_id")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
...
embedding_store.ids.IdError: ad_id: ids must be >= 0, got -1 at position 1
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

U64_MAX = 2**64 - 1


class IdError(ValueError):
    """A bad id or batch, caught before any kernel sees it (the message names the place and the value)."""


def validate_ids(ids, where: str = "ids") -> np.ndarray:
    """Raw ids (list / numpy / torch of integers in ``[0, 2**64)``) -> uint64 array (N,).

    Rejects floats, bools, strings, negatives and values beyond 64 bits with :class:`IdError`.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise IdError(f"{where}: ids must be integers, got tensor of {ids.dtype}")
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind == "u":
            return ids.astype(np.uint64, copy=False).ravel()
        if ids.dtype.kind == "i":
            flat = ids.ravel()
            neg = np.flatnonzero(flat < 0)
            if neg.size:
                raise IdError(f"{where}: ids must be >= 0, got {int(flat[neg[0]])} at position {int(neg[0])}")
            return flat.astype(np.uint64)
        if ids.dtype.kind != "O":
            raise IdError(f"{where}: ids must be integers, got array of {ids.dtype}")
        ids = ids.ravel().tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise IdError(f"{where}: expected a sequence of integer ids, got {type(ids).__name__}")
    out = []
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise IdError(f"{where}: ids must be integers, got {type(x).__name__} {x!r} at position {i}")
        x = int(x)
        if x < 0:
            raise IdError(f"{where}: ids must be >= 0, got {x} at position {i}")
        if x > U64_MAX:
            raise IdError(f"{where}: ids must fit in 64 bits (<= {U64_MAX}), got {x} at position {i}")
        out.append(x)
    return np.array(out, dtype=np.uint64)


def validate_batch(indices: torch.Tensor, offsets: torch.Tensor, num_tables: int, rows: int,
                   where: str = "fiited") -> int:
    """Check TBE input (``indices`` (N,) int64 in ``[0, rows)``, ``offsets`` (T*B+1,) from 0 to N, non-decreasing);
    return the batch size B. Raises :class:`IdError`."""
    for name, t in (("indices", indices), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise IdError(f"{where}: {name} must be a 1-d int64 tensor, got {got}")
    n_bags = offsets.numel() - 1
    if n_bags < 0 or n_bags % num_tables:
        raise IdError(f"{where}: offsets must have T*B+1 entries with T={num_tables}, got {offsets.numel()}")
    if n_bags and (int(offsets[0]) != 0 or int(offsets[-1]) != indices.numel()):
        raise IdError(f"{where}: offsets must run from 0 to len(indices)={indices.numel()}, "
                      f"got {int(offsets[0])}..{int(offsets[-1])}")
    if n_bags and bool((offsets.diff() < 0).any()):
        raise IdError(f"{where}: offsets must be non-decreasing")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise IdError(f"{where}: row ids must be in [0, {rows}) (hash raw ids first), got {bad}")
    return n_bags // num_tables


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over a uint64 array (wrapping arithmetic), a strong deterministic mix.

    >>> splitmix64(np.array([0, 1], dtype=np.uint64)).tolist()
    [0, 6238072747940578789]
    """
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z
