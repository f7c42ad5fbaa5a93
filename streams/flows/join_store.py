"""The join's cold tier: compacted impressions of one partition in an embedded SQLite file.

Why SQLite: it is in the standard library (nothing to install or pin), embedded (one file per partition state,
no server), crash-safe in WAL mode (a killed process leaves the last committed transaction), and fast enough for
what the cold tier asks of it: appends of whole blocks, point look-ups by a 64-bit key (the rare conversion or
late feedback), and sequential reads of one block at a time when windows close. Its page cache is bounded
(``cache_size``), so resident memory does not grow with the file.

Layout (``<labels.recovery_dir>/join-state/join-<partition>.sqlite3``)::

    blocks(id INTEGER PRIMARY KEY, gen, keys, data)   one row per block of up to BLOCK_ROWS impressions,
        data = lz4(msgpack([(impression id, ts, user key, click ts, conversion ts, emitted, raw bytes), ...]))
        sorted by ts; keys = the rows' 64-bit id hashes (little-endian int64), to delete their index rows
    idx(h INTEGER PRIMARY KEY, ts, block, bits)       one row per impression: blake2b-64 of its id ->
        its ts, its block, bits (1 clicked, 2 converted, 4 example emitted) as of compaction
    meta(k PRIMARY KEY, v)                              purged_upto (see below)

The key is a 64-bit hash, not the id: at 100M ids, a look-up of an id that is not stored matches a stored one
with probability ~5e-12; two stored ids colliding (~3e-4 per 100M) lose one index row (``INSERT OR REPLACE``):
a conversion of that impression then becomes an orphan dead letter, nothing is emitted twice.

Consistency with Bytewax recovery (at-least-once: restore the snapshot of epoch E, replay input after E's
offsets). The in-memory :class:`~streams.flows.join.JoinState` is the source of truth; the file only holds
what the state names, and every change to the file is made undoable until no snapshot that predates it can
be restored:

- generations: the state counts snapshots (``gen``); every block written carries the generation it was
  written in, and the snapshot records its high-water mark (``hw`` = the generation it closes).
- restore to ``hw`` (:meth:`ColdStore.open`): delete every block with ``gen > hw`` and its index rows (written
  after the snapshot: the replay writes them again). A fresh state (no snapshot) restores to 0: the file is
  emptied.
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

import array
import hashlib
import os
import sqlite3
from collections import OrderedDict
from pathlib import Path

import lz4.block
import msgspec

BLOCK_ROWS = 4096  # impressions per block: one write, one index batch, one read when windows close
KEEP_GENS = 8  # snapshots between a block's trashing and its deletion for good
CACHE_KIB = 16 * 1024  # SQLite page cache per partition (KiB)
CLICKED, CONVERTED, EMITTED = 1, 2, 4
# (impression id, ts, user key, first click ts, first conversion ts, emitted, raw impression bytes)
ColdRecord = tuple[str, int, bytes, "int | None", "int | None", bool, bytes]

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[tuple[str, int, bytes, int | None, int | None, bool, bytes]]).decode


def id_hash(iid: str) -> int:
    """Signed 64-bit key of an impression id (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(iid.encode(), digest_size=8).digest(), "little", signed=True)


def bits(click_ts: int | None, conv_ts: int | None, emitted: bool) -> int:
    return (click_ts is not None) * CLICKED | (conv_ts is not None) * CONVERTED | emitted * EMITTED


class ColdStore:
    """One partition's SQLite file. Not thread-safe: one partition state, one worker thread."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for p in ("journal_mode=WAL", "synchronous=NORMAL", f"cache_size=-{CACHE_KIB}", "temp_store=MEMORY"):
            self.db.execute(f"PRAGMA {p}")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS blocks(id INTEGER PRIMARY KEY, gen INTEGER NOT NULL, keys BLOB NOT NULL,"
            " data BLOB NOT NULL);"
            "CREATE TABLE IF NOT EXISTS idx(h INTEGER PRIMARY KEY, ts INTEGER NOT NULL, block INTEGER NOT NULL,"
            " bits INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);")
        self._cache: OrderedDict[int, list] = OrderedDict()  # decoded blocks, most recent last

    # ------------------------------------------------------------------------------------------ recovery
    def open(self, hw: int) -> None:
        """Make the file what the snapshot with high-water mark ``hw`` expects (see the module docstring)."""
        row = self.db.execute("SELECT v FROM meta WHERE k='purged_upto'").fetchone()
        if row is not None and row[0] > hw:
            raise RuntimeError(f"join state store {self.path}: the snapshot to restore (generation {hw}) is older "
                               f"than the rows deleted for good (up to generation {row[0]}); this store cannot "
                               f"serve it. Start the labels flow with a new recovery directory.")
        newer = self.db.execute("SELECT id, keys FROM blocks WHERE gen > ?", (hw,)).fetchall()
        if newer:
            self._delete(newer)
        self._cache.clear()

    def purge(self, block_ids: list[int], upto: int) -> None:
        """Delete trashed blocks (and their index rows) for good; ``upto``: the generation now purged."""
        self.db.execute("BEGIN")
        rows = []
        for bid in block_ids:
            r = self.db.execute("SELECT id, keys FROM blocks WHERE id=?", (bid,)).fetchone()
            if r is not None:
                rows.append(r)
        self._delete(rows, begin=False)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES('purged_upto', ?)", (upto,))
        self.db.execute("COMMIT")
        for bid in block_ids:
            self._cache.pop(bid, None)

    def _delete(self, rows: list[tuple[int, bytes]], begin: bool = True) -> None:
        if begin:
            self.db.execute("BEGIN")
        for bid, keys in rows:
            hs = memoryview(keys).cast("q").tolist()
            self.db.executemany("DELETE FROM idx WHERE h=? AND block=?", [(h, bid) for h in hs])
            self.db.execute("DELETE FROM blocks WHERE id=?", (bid,))
        if begin:
            self.db.execute("COMMIT")

    # -------------------------------------------------------------------------------------------- writes
    def write_block(self, bid: int, gen: int, recs: list[ColdRecord]) -> None:
        """One block of records sorted by ts, and its index rows, in one transaction."""
        hs = [id_hash(r[0]) for r in recs]
        self.db.execute("BEGIN")
        self.db.execute("INSERT INTO blocks VALUES(?, ?, ?, ?)", (bid, gen, array.array("q", hs).tobytes(),
                                                                   lz4.block.compress(_pack(recs))))
        self.db.executemany("INSERT OR REPLACE INTO idx VALUES(?, ?, ?, ?)",
                            [(h, r[1], bid, bits(r[3], r[4], r[5])) for h, r in zip(hs, recs)])
        self.db.execute("COMMIT")

    # --------------------------------------------------------------------------------------------- reads
    def lookup(self, iid: str) -> tuple[int, int, int] | None:
        """(ts, block, bits) of a compacted impression, or None."""
        return self.db.execute("SELECT ts, block, bits FROM idx WHERE h=?", (id_hash(iid),)).fetchone()

    def block(self, bid: int) -> list[ColdRecord]:
        """The records of block ``bid`` (the last few decoded blocks are cached)."""
        recs = self._cache.get(bid)
        if recs is None:
            row = self.db.execute("SELECT data FROM blocks WHERE id=?", (bid,)).fetchone()
            if row is None:
                raise KeyError(f"join state store {self.path}: block {bid} is missing (store and snapshot disagree)")
            recs = _unpack(lz4.block.decompress(row[0]))
            self._cache[bid] = recs
            if len(self._cache) > 4:
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

    def cache_bytes(self) -> int:
        """Rough bytes in memory: the decoded-block cache (records and their raw bytes) and SQLite's page cache
        (bounded by ``cache_size``, and by the file)."""
        pages = sum(sum(len(r[6]) + 200 for r in recs) for recs in self._cache.values())
        return pages + min(CACHE_KIB * 1024, self.disk_bytes())

    def close(self) -> None:
        self.db.close()
