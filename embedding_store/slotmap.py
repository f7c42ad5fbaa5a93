"""Per-slot metadata that costs only what is live: a vectorised hash map and a count-min sketch (numpy).

A hashed table has ``rows`` virtual slots per table, of which a stream touches a few percent; dense per-slot
arrays (slot map, counters, importance) would cost more than the narrow rows they describe. Here

* :class:`SlotMap` maps admitted global slots (int32 keys) to a dense index (int32) with open addressing and
  linear probing, every operation vectorised over a batch of keys (a few numpy passes per probe round; the
  load stays under ``MAX_LOAD`` = 0.6, so probe chains are short). Deleted entries are tombstones until
  the next rehash. Bytes = ``8 * capacity``: 13 to 36 B per entry.
* :class:`CountMinSketch` counts how often each not-yet-admitted slot was seen (admission at ``admit_hits``) in
  a fixed ``depth x width`` int32 table: estimates never undercount and overcount by at most ``2N / width``
  with probability ``1 - 2**-depth`` (N: the sum of counts); :meth:`CountMinSketch.halve` ages old counts so
  an endless stream does not saturate it.

>>> m = SlotMap()
>>> m.put(np.array([7, 3, 1 << 30]), np.array([0, 1, 2]))
>>> m.get(np.array([3, 8, 7, 1 << 30])).tolist()
[1, -1, 0, 2]
>>> m.delete(np.array([3])); m.get(np.array([3, 7])).tolist(), len(m)
([-1, 0], 2)
>>> s = CountMinSketch(width=64, depth=2)
>>> s.add(np.array([5, 5, 9])); s.estimate(np.array([5, 9, 11])).tolist()
[2, 1, 0]
"""

from __future__ import annotations

import numpy as np

from embedding_store.ids import splitmix64

EMPTY, TOMB = -1, -2
MAX_LOAD = 0.6  # (live + tombstones) / capacity before a rehash
REHASH_LOAD = 0.45  # a rehash picks the smallest capacity with live / capacity <= this


def capacity_for(n: int, load: float = REHASH_LOAD) -> int:
    """The smallest power-of-two capacity (>= 64) holding ``n`` entries at ``load`` or below."""
    cap = 64
    while n > load * cap:
        cap *= 2
    return cap


def _hash(keys: np.ndarray, salt: int = 0) -> np.ndarray:
    return splitmix64(keys.astype(np.uint64) + np.uint64(salt * 0x9E3779B97F4A7C15 % 2**64))


class SlotMap:
    """int32 key (>= 0) -> int32 value, vectorised; missing keys read ``-1``.

    With ``universe`` (keys < universe), the map turns into a plain array of ``universe`` int32 when that is
    no larger than the hash table would be (most slots live: a gather is cheaper than probing), and back when
    deletions make the hash table less than half of it."""

    def __init__(self, capacity: int = 64, universe: int | None = None):
        cap = 64
        while cap < capacity:
            cap *= 2
        self.universe, self.dense = universe, None
        self._alloc(cap)
        if universe is not None and 4 * universe <= 8 * cap:
            self._to_dense()

    def _alloc(self, cap: int) -> None:
        self.keys = np.full(cap, EMPTY, dtype=np.int32)
        self.vals = np.full(cap, -1, dtype=np.int32)
        self.n = self.used = 0  # live entries; live + tombstones

    def __len__(self) -> int:
        return self.n

    @property
    def capacity(self) -> int:
        return len(self.keys) if self.dense is None else len(self.dense)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes if self.dense is None else self.dense.nbytes

    @staticmethod
    def bytes_for(n: int, universe: int | None = None) -> int:
        """Bytes of a map holding ``n`` entries right after growing to them (the smallest capacity it uses)."""
        b = 8 * capacity_for(n, MAX_LOAD)
        return b if universe is None else min(b, 4 * universe)

    def _to_dense(self) -> None:
        k, v = self.items()
        self.dense = np.full(self.universe, -1, dtype=np.int32)
        self.dense[k] = v
        self.keys = self.vals = np.zeros(0, dtype=np.int32)
        self.used = self.n

    def _to_hashed(self) -> None:
        k, v = self.items()
        self.dense = None
        self._alloc(capacity_for(len(k)))
        self.put(k, v)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        """First cell (N,) int64 of each key: Fibonacci hashing (one multiply, the top log2(capacity) bits)."""
        with np.errstate(over="ignore"):
            h = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (h >> np.uint64(64 - (len(self.keys).bit_length() - 1))).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key (N,) in the table, or -1."""
        mask = len(self.keys) - 1
        pos = self._home(keys)
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        while len(todo):
            k = self.keys[pos]
            hit = k == keys[todo]
            out[todo[hit]] = pos[hit]
            go = ~hit & (k != EMPTY)  # a tombstone or another key: probe on
            todo, pos = todo[go], (pos[go] + 1) & mask
        return out

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Values (N,) int32 of ``keys`` (N,), -1 where absent."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.dense is not None:
            return self.dense[keys]
        if not len(keys):
            return np.zeros(0, dtype=np.int32)
        p = self._find(keys)
        return np.where(p >= 0, self.vals[np.maximum(p, 0)], -1).astype(np.int32)

    def put(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Set ``keys`` (N,) distinct -> ``vals`` (N,): existing keys are overwritten, new ones inserted."""
        keys, vals = np.asarray(keys, dtype=np.int64), np.asarray(vals, dtype=np.int32)
        if not len(keys):
            return
        if self.dense is not None:
            self.n += int((self.dense[keys] < 0).sum())
            self.dense[keys] = vals
            self.used = self.n
            return
        p = self._find(keys)
        self.vals[p[p >= 0]] = vals[p >= 0]
        keys, vals = keys[p < 0], vals[p < 0]
        if self.used + len(keys) > MAX_LOAD * len(self.keys):
            if self.universe is not None and 4 * self.universe <= 8 * capacity_for(self.n + len(keys)):
                self._to_dense()
                return self.put(keys, vals)
            self._rehash(self.n + len(keys))
        mask = len(self.keys) - 1
        pos = self._home(keys)
        todo = np.arange(len(keys))
        while len(todo):  # claim an empty cell; several keys wanting one cell: the first wins, the rest probe
            free = self.keys[pos] == EMPTY
            cand = todo[free]
            cells, first = np.unique(pos[free], return_index=True)
            won = cand[first]
            self.keys[cells], self.vals[cells] = keys[won], vals[won]
            placed = np.zeros(len(keys), dtype=bool)
            placed[won] = True
            go = ~placed[todo]
            todo, pos = todo[go], (pos[go] + 1) & mask
        self.n += len(keys)
        self.used += len(keys)

    def delete(self, keys: np.ndarray) -> None:
        """Remove present ``keys`` (absent ones are ignored)."""
        if self.dense is not None:
            k = np.unique(np.asarray(keys, dtype=np.int64))
            self.n -= int((self.dense[k] >= 0).sum())
            self.dense[k] = -1
            self.used = self.n
            return
        p = self._find(np.asarray(keys, dtype=np.int64))
        p = p[p >= 0]
        self.keys[p], self.vals[p] = TOMB, -1
        self.n -= len(p)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of every entry, in table order."""
        if self.dense is not None:
            k = np.flatnonzero(self.dense >= 0)
            return k.astype(np.int64), self.dense[k].copy()
        live = self.keys >= 0
        return self.keys[live].astype(np.int64), self.vals[live].copy()

    def _rehash(self, n: int) -> None:
        """Rebuild without tombstones at :func:`capacity_for` ``n`` entries."""
        k, v = self.items()
        self._alloc(capacity_for(n))
        self.put(k, v)

    def compact(self) -> None:
        """Drop tombstones and shrink to fit (after mass deletion)."""
        if self.dense is not None:
            if 2 * 8 * capacity_for(self.n) < 4 * self.universe:
                self._to_hashed()
            return
        if self.used > self.n or self.n < REHASH_LOAD / 4 * len(self.keys):
            self._rehash(self.n)


class CountMinSketch:
    """``depth`` rows of ``width`` uint8 counters saturating at 255 (admission thresholds are small);
    :meth:`add` increments, :meth:`estimate` is the row minimum."""

    def __init__(self, width: int = 1 << 16, depth: int = 2):
        if width < 1 or depth < 1:
            raise ValueError(f"count-min sketch: width and depth must be >= 1, got {width} x {depth}")
        self.table = np.zeros((depth, width), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _cells(self, keys: np.ndarray) -> np.ndarray:
        d, w = self.table.shape
        return [(_hash(keys, salt=i + 1) % np.uint64(w)).astype(np.int64) for i in range(d)]

    def add(self, keys: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Count each occurrence of ``keys`` (N,) (repeats count repeatedly; ``counts`` (N,): that many each)."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return
        w = self.table.shape[1]
        for i, c in enumerate(self._cells(keys)):
            n = np.bincount(c, weights=counts, minlength=w)
            self.table[i] = np.minimum(self.table[i] + n, 255).astype(np.uint8)

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """Counts (N,) int64, never below the truth."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        c = self._cells(keys)
        return np.min(np.stack([self.table[i][c[i]] for i in range(len(c))]), axis=0).astype(np.int64)

    def halve(self) -> None:
        """Age every count (integer halving): old sightings fade, the sketch never saturates."""
        self.table >>= 1
