"""The join's cold tier: compacted impressions of one partition in an embedded SQLite file.

Why SQLite: it is in the standard library (nothing to install or pin), embedded (one file per partition state,
no server), crash-safe in WAL mode (a killed process leaves the last committed transaction), and fast enough for
what the cold tier asks of it: appends of whole blocks, point look-ups by a 64-bit key (the rare conversion or
late feedback), and sequential reads of one block at a time when windows close. Its page cache is bounded
(``cache_size``), so resident memory does not grow with the file.

Layout (``<labels.recovery_dir>/join-state/join-<partition>.sqlite3``)::

    blocks(id INTEGER PRIMARY KEY, gen, meta, data)   one row per block of up to BLOCK_ROWS impressions,
        data = lz4(msgpack([(impression id, (raw bytes, ts, user key, click ts, conversion ts, emitted)), ...]))
        sorted by ts: the join's in-memory tuple as it was when compacted (~160 bytes an impression);
        meta = per record crc32 of the id, ts, bits (1 clicked, 2 converted, 4 example emitted), and the ids:
        what a look-up reads, by incremental blob I/O, without decoding the block (~35 bytes an impression)
    meta(k PRIMARY KEY, v)                              purged_upto (see below)

Only appends and whole-block deletes: no B-tree keyed by impression id on disk (random inserts into a tree of
tens of millions of rows dirty one page per impression). Instead an in-memory :class:`CrcIndex` (8 bytes per
compacted impression: crc32 of the id and the block) says which blocks may hold an id; the block's ``meta``
settles it by the id itself. Look-ups are rare (conversions and late clicks of compacted impressions,
impressions re-sent after their click window); the index is rebuilt from the ``meta`` column on restore.

Consistency with Bytewax recovery (at-least-once: restore the snapshot of epoch E, replay input after E's
offsets). The in-memory :class:`~streams.flows.join.JoinState` is the source of truth; the file only holds
what the state names, and every change to the file is made undoable until no snapshot that predates it can
be restored:

- generations: the state counts snapshots (``gen``); every block written carries the generation it was
  written in, and the snapshot records its high-water mark (``hw`` = the generation it closes).
- restore to ``hw`` (:meth:`ColdStore.open`): delete every block with ``gen > hw`` (written after the snapshot:
  the replay writes them again), then build the in-memory index from the blocks left. A fresh state (no
  snapshot) restores to 0: the file is emptied.
- deletions are never made in place: a block whose impressions all left (and whose ids were remembered for one
  more window, for duplicate and late-feedback checks) goes to the state's ``trash`` with the generation that
  trashed it; the snapshot carries the trash, and look-ups ignore trashed blocks. Only a snapshot
  ``KEEP_GENS`` generations later deletes trashed rows for good, and writes ``purged_upto`` in ``meta``.
  Restoring a snapshot older than ``purged_upto`` (Bytewax resumes from the last committed epoch, one or two
  snapshots back at most) is refused with an error rather than run on a store that lacks its rows.
- updates are never made to rows: feedback that joins a compacted impression lives in the state
  (``cold_fb``), which the snapshot covers; blocks are immutable once written.

Commits: one transaction per block write or purge, ``synchronous=NORMAL`` (WAL: durable against a killed
process, fsync at checkpoints); a crash loses at most writes of the running generation, which restore deletes
anyway.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import lz4.block
import msgspec
import numpy as np

BLOCK_ROWS = 4096  # impressions per block: one write, one index batch, one read when windows close
KEEP_GENS = 8  # snapshots between a block's trashing and its deletion for good
CACHE_KIB = 16 * 1024  # SQLite page cache per partition (KiB)
WAL_PAGES = 16384  # WAL checkpoint every 64 MiB of pages (one fsync each)
CLICKED, CONVERTED, EMITTED = 1, 2, 4
# (impression id, (raw impression bytes, ts, user key, first click ts, first conversion ts, emitted)): the
# join's Pending tuple as it was in memory
ColdRecord = tuple[str, tuple[bytes, int, bytes, "int | None", "int | None", bool]]

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[tuple[str, tuple[bytes, int, bytes, int | None, int | None, bool]]]).decode


class ColdStore:
    """One partition's SQLite file and its in-memory index. Not thread-safe: one partition state, one worker
    thread."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for p in ("journal_mode=WAL", "synchronous=NORMAL", f"cache_size=-{CACHE_KIB}", "temp_store=MEMORY",
                  f"wal_autocheckpoint={WAL_PAGES}"):
            self.db.execute(f"PRAGMA {p}")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS blocks(id INTEGER PRIMARY KEY, gen INTEGER NOT NULL, meta BLOB NOT NULL,"
            " data BLOB NOT NULL);"
            "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);")
        self.index = CrcIndex()
        self._cache: OrderedDict[int, list] = OrderedDict()  # decoded blocks, most recent last

    # ------------------------------------------------------------------------------------------ recovery
    def open(self, hw: int) -> None:
        """Make the file what the snapshot with high-water mark ``hw`` expects (see the module docstring), and
        build the in-memory index from the blocks that stay."""
        row = self.db.execute("SELECT v FROM meta WHERE k='purged_upto'").fetchone()
        if row is not None and row[0] > hw:
            raise RuntimeError(f"join state store {self.path}: the snapshot to restore (generation {hw}) is older "
                               f"than the rows deleted for good (up to generation {row[0]}); this store cannot "
                               f"serve it. Start the labels flow with a new recovery directory.")
        self.db.execute("DELETE FROM blocks WHERE gen > ?", (hw,))
        self._cache.clear()
        self.index = CrcIndex()
        for bid, meta in self.db.execute("SELECT id, meta FROM blocks"):
            self.index.add(bid, BlockMeta.crcs(meta))

    def purge(self, block_ids: list[int], upto: int) -> None:
        """Delete trashed blocks for good; ``upto``: the generation now purged."""
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM blocks WHERE id=?", [(b,) for b in block_ids])
        self.db.execute("INSERT OR REPLACE INTO meta VALUES('purged_upto', ?)", (upto,))
        self.db.execute("COMMIT")
        self.index.drop(block_ids)
        for bid in block_ids:
            self._cache.pop(bid, None)

    # -------------------------------------------------------------------------------------------- writes
    def write_block(self, bid: int, gen: int, recs: list[ColdRecord]) -> None:
        """One block of records sorted by ts, in one transaction; its ids go to the in-memory index."""
        meta = BlockMeta.of(recs)
        self.db.execute("INSERT INTO blocks VALUES(?, ?, ?, ?)", (bid, gen, meta.pack(),
                                                                   lz4.block.compress(_pack(recs))))
        self.index.add(bid, meta.crc)

    # --------------------------------------------------------------------------------------------- reads
    def lookup(self, iid: str, skip: set[int] | frozenset = frozenset()) -> tuple[int, int, int] | None:
        """(ts, block, bits) of a compacted impression (the newest block holding it, blocks in ``skip``
        ignored), or None."""
        key = iid.encode()
        c = zlib.crc32(key)
        for bid in sorted(self.index.candidates(c), reverse=True):
            if bid in skip:
                continue
            try:
                blob = self.db.blobopen("blocks", "meta", bid, readonly=True)
            except sqlite3.OperationalError as e:
                raise KeyError(f"join state store {self.path}: block {bid} is missing (store and snapshot "
                               f"disagree)") from e
            with blob:  # read the crc column, then only the matching records' fields (not the whole meta)
                found = BlockMeta.probe(blob, c, key)
            if found is not None:
                return found[0], bid, found[1]
        return None

    def block(self, bid: int) -> list[ColdRecord]:
        """The records of block ``bid`` (the last few decoded blocks are cached)."""
        recs = self._cache.get(bid)
        if recs is None:
            row = self.db.execute("SELECT data FROM blocks WHERE id=?", (bid,)).fetchone()
            if row is None:
                raise KeyError(f"join state store {self.path}: block {bid} is missing (store and snapshot disagree)")
            recs = _unpack(lz4.block.decompress(row[0]))
            self._cache[bid] = recs
            if len(self._cache) > 2:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(bid)
        return recs

    def find(self, bid: int, iid: str) -> ColdRecord | None:
        for r in self.block(bid):
            if r[0] == iid:
                return r
        return None

    def disk_bytes(self) -> int:
        n = 0
        for suffix in ("", "-wal"):
            try:
                n += os.stat(str(self.path) + suffix).st_size
            except FileNotFoundError:
                pass
        return n

    def memory_bytes(self) -> int:
        """Rough bytes in memory: the index, the decoded-block caches, SQLite's page cache (bounded by
        ``cache_size``, and by the file)."""
        recs = sum(sum(len(r[1][0]) + 200 for r in recs) for recs in self._cache.values())
        return self.index.nbytes() + recs + self.sqlite_cache_bytes()

    def sqlite_cache_bytes(self) -> int:
        return min(CACHE_KIB * 1024, self.disk_bytes())

    def close(self) -> None:
        self.db.close()


class BlockMeta(NamedTuple):
    """What look-ups read of a block without decoding it: per record, crc32 of the id, ts, bits, the id.

    Packed: n (uint32) | crc (uint32 x n) | ts (int64 x n) | bits (uint8 x n) | id offsets (uint32 x n+1) | ids.
    """

    crc: np.ndarray  # uint32
    ts: np.ndarray  # int64
    bits: np.ndarray  # uint8
    ids: list[bytes]

    @classmethod
    def of(cls, recs: list[ColdRecord]) -> BlockMeta:
        ids = [r[0].encode() for r in recs]
        crc = np.array([zlib.crc32(i) for i in ids], np.uint32)
        ts = np.array([p[1] for _, p in recs], np.int64)
        b = np.array([(p[3] is not None) | (p[4] is not None) << 1 | p[5] << 2 for _, p in recs], np.uint8)
        return cls(crc, ts, b, ids)

    def pack(self) -> bytes:
        off = np.zeros(len(self.ids) + 1, np.uint32)
        np.cumsum([len(i) for i in self.ids], out=off[1:])
        return b"".join((len(self.ids).to_bytes(4, "little"), self.crc.tobytes(), self.ts.tobytes(),
                         self.bits.tobytes(), off.tobytes(), *self.ids))

    @staticmethod
    def crcs(blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, np.uint32, int.from_bytes(blob[:4], "little"), 4)

    @staticmethod
    def probe(blob, c: int, key: bytes) -> tuple[int, int] | None:
        """(ts, bits) of the record with id ``key`` (crc32 ``c``) in an open ``sqlite3.Blob``, or None."""
        n = int.from_bytes(blob.read(4), "little")
        for i in np.flatnonzero(np.frombuffer(blob.read(4 * n), np.uint32) == c).tolist():
            blob.seek(4 + 13 * n + 4 * i)
            lo, hi = struct.unpack("<II", blob.read(8))
            blob.seek(8 + 17 * n + lo)
            if blob.read(hi - lo) == key:
                blob.seek(4 + 4 * n + 8 * i)
                ts = int.from_bytes(blob.read(8), "little", signed=True)
                blob.seek(4 + 12 * n + i)
                return ts, blob.read(1)[0]
        return None


class CrcIndex:
    """Which blocks may hold an id: sorted uint64 arrays of ``crc32(id) << 32 | block`` (8 bytes per compacted
    impression), merged size-tiered (a new array merges into the previous one while at least half its size,
    up to MERGE_CAP entries, so a merge never copies more than that), so a look-up is one binary search per
    array (O(log n) arrays, plus one per capped array). Dropped blocks are skipped by look-ups and filtered out
    at merges, and from every array once DROP_SWEEP blocks are waiting. Rebuilt from the file on restore,
    never snapshotted."""

    MERGE_CAP = 1 << 23  # entries (64 MiB)
    DROP_SWEEP = 256  # dropped blocks (~1M entries) that make a sweep over every array worth its cost

    def __init__(self):
        self.segs: list[np.ndarray] = []
        self.dropped: set[int] = set()

    def add(self, bid: int, crc: np.ndarray) -> None:
        self.segs.append(np.sort((crc.astype(np.uint64) << np.uint64(32)) | np.uint64(bid)))
        while (len(self.segs) > 1 and 2 * len(self.segs[-1]) >= len(self.segs[-2])
               and len(self.segs[-1]) + len(self.segs[-2]) <= self.MERGE_CAP):
            b, a = self.segs.pop(), self.segs.pop()
            merged = self._live(np.concatenate((a, b)))
            merged.sort(kind="stable")  # two sorted runs: a merge
            self.segs.append(merged)

    def _live(self, seg: np.ndarray) -> np.ndarray:
        if not self.dropped:
            return seg
        gone = np.fromiter(self.dropped, np.uint64, len(self.dropped))
        return seg[~np.isin(seg & np.uint64(0xFFFFFFFF), gone)]

    def drop(self, bids: list[int]) -> None:
        self.dropped.update(bids)
        if len(self.dropped) >= self.DROP_SWEEP:
            self.segs = [s for s in map(self._live, self.segs) if len(s)]
            self.dropped.clear()

    def candidates(self, c: int) -> set[int]:
        lo, hi = np.uint64(c << 32), np.uint64((c + 1) << 32)
        out = set()
        for seg in self.segs:
            i, j = np.searchsorted(seg, lo), np.searchsorted(seg, hi)
            out.update(int(x) & 0xFFFFFFFF for x in seg[i:j].tolist())
        return out - self.dropped

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segs) + 80 * len(self.dropped)
