"""The storage server's listing index: a bucket's keys kept sorted in memory, each with its ``<Contents>`` XML.

Tansu 0.6 keeps one object per produced batch and lists all of a partition's objects again on every fetch of a
tailing consumer (ListObjectsV2 with the partition's ``records/`` prefix, 1,000 keys a page, continuation
tokens through all pages). localbucket answers each page by walking and sorting the directory, then two
``stat()`` calls, an ETag lookup and five ElementTree elements per listed key: under a steady stream the
storage process saturated at ~10,000 objects (README, soak). Here a page costs a bisection to its first key
and a join of the listed keys' prerendered fragments; the directory is not read again while it is current.

Current means: the directory's mtime is the one recorded when the index last read it (or last changed it
itself). The server is the only writer of its directory, and its writes and deletes update the index under
the same lock as listings (:meth:`ListingIndex.before_change`, :meth:`after_write`, :meth:`after_delete`), so
an acknowledged write is in every later listing. Anything else (a restart on an existing tree, another
program writing into the bucket) changes a directory's mtime and that directory is read again. A directory
read within :data:`RACY_NS` of its last change is read once more when a listing finds it unchanged for that
long (timestamps come from a coarse clock: a change in the same tick as the one before leaves the mtime as it
was). What mtimes cannot show: another program changing a directory within the same clock tick as one of the
server's own writes to it, or rewriting a file in place (the keys are right; its size and ETag stay those listed
before); neither happens in streamrec, where only the server writes its directory.

Pages are those of localbucket 1.2.1's ``S3Handler._list_entries`` (same keys, common prefixes, truncation and
continuation entry, and byte-identical XML): tests/test_storage.py compares both on random trees through the
real server. Keys are compared as ``str``: code-point order is UTF-8 byte order, localbucket's.
"""

from __future__ import annotations

import bisect
import os
import stat
import threading
import time
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape

import localbucket

RACY_NS = 100_000_000  # a directory changed this recently (ns) when read is read again once it has been quiet as long
_UNTRUSTED = -1


def _xml(text: str) -> bytes:
    """``text`` as ElementTree writes element text in localbucket's UTF-8 documents."""
    return escape(text).encode("utf-8", "xmlcharrefreplace")


def _prefix_end(s: str) -> str | None:
    """The least string above every string starting with ``s`` (None: there is none)."""
    s = s.rstrip("\U0010ffff")
    return s[:-1] + chr(ord(s[-1]) + 1) if s else None


def _plain(rel: str) -> bool:
    """Whether a directory part of a prefix can hold keys (keys have no empty, '.' or '..' component)."""
    return rel == "" or all(part not in ("", ".", "..") for part in rel.split("/"))


class _Dir:
    __slots__ = ("mtime_ns", "subdirs", "racy")

    def __init__(self, mtime_ns: int, subdirs: list[str], racy: bool):
        self.mtime_ns, self.subdirs, self.racy = mtime_ns, subdirs, racy


class ListingIndex:
    """The keys of one bucket directory, sorted, with their rendered ``<Contents>`` fragments.

    Filled lazily: a listing reads (once) the directories under its prefix's directory and checks their mtimes
    on every later listing (one ``lstat`` per directory: one for a Tansu partition). All methods that touch the
    index run under :attr:`lock`; :meth:`page` takes it itself, the write hooks expect the caller to hold it
    around the write.
    """

    def __init__(self, bucket_dir: str | os.PathLike):
        self.root = str(bucket_dir)
        self.lock = threading.Lock()
        self.keys: list[str] = []  # every indexed key, sorted
        self.fragments: dict[str, bytes | None] = {}  # key -> <Contents>...</Contents> (None: not rendered yet)
        self.dirs: dict[str, _Dir] = {}  # indexed directory ("" the bucket's, else "a/b") -> its state
        self.scans = 0  # directories read (tests and the benchmark check that current ones are not)

    # ------------------------------------------------------------------------------------------ listing
    def page(self, prefix: str, delimiter: str, marker: str, marker_is_prefix: bool, max_keys: int
             ) -> tuple[list[tuple[str, bytes]], list[str], bool, str]:
        """localbucket's ``_list_entries``: (contents as (key, fragment), common prefixes, truncated, last entry)."""
        top = prefix.rpartition("/")[0]
        if not _plain(top):  # e.g. "a//b", "a/../b": no key starts with it
            return [], [], False, ""
        with self.lock:
            self._validate(top)
            while True:
                listed, common_prefixes, truncated, last_entry = self._entries(
                    prefix, delimiter, marker, marker_is_prefix, max_keys)
                contents, gone = [], []
                for key in listed:  # fragments are rendered when first listed
                    fragment = self.fragments[key]
                    if fragment is None:
                        try:
                            fragment = self.fragments[key] = self._fragment(key, self._path(key))
                        except OSError:  # deleted beside the server since its directory was read
                            gone.append(key)
                    contents.append((key, fragment))
                if not gone:
                    return contents, common_prefixes, truncated, last_entry
                for key in gone:  # its directory's mtime has changed too: it is read again next time
                    self._drop(key)

    def _entries(self, prefix: str, delimiter: str, marker: str, marker_is_prefix: bool, max_keys: int
                 ) -> tuple[list[str], list[str], bool, str]:
        """The keys and common prefixes of a page, localbucket's way, from the sorted keys."""
        keys = self.keys
        i = bisect.bisect_left(keys, prefix)
        if marker:
            i = max(i, bisect.bisect_right(keys, marker))
            if marker_is_prefix:
                end = _prefix_end(marker)
                i = max(i, len(keys) if end is None else bisect.bisect_left(keys, end))
        end = _prefix_end(prefix)
        n = len(keys) if end is None else bisect.bisect_left(keys, end, i)  # keys[i:n] start with the prefix
        if not delimiter:  # Tansu's listings: a slice
            listed = keys[i:min(n, i + max_keys)]
            truncated = max_keys > 0 and i + max_keys < n
            return listed, [], truncated, "K:" + listed[-1] if listed else ""
        listed, common_prefixes, last_entry, truncated = [], [], "", False
        while i < n:
            key = keys[i]
            at = key.find(delimiter, len(prefix))
            if len(listed) + len(common_prefixes) >= max_keys:
                truncated = max_keys > 0
                break
            if at >= 0:
                common = key[: at + len(delimiter)]
                common_prefixes.append(common)
                last_entry = "P:" + common
                end = _prefix_end(common)  # the keys starting with it are contiguous: skip them all
                i = n if end is None else bisect.bisect_left(keys, end, i + 1, n)
            else:
                listed.append(key)
                last_entry = "K:" + key
                i += 1
        return listed, common_prefixes, truncated, last_entry

    @staticmethod
    def render(contents: list[tuple[str, bytes]], common_prefixes: list[str], url: bool = False) -> bytes:
        """The ``<Contents>`` and ``<CommonPrefixes>`` elements of a page (``url``: encoding-type=url)."""
        if url:
            enc = lambda text: quote(text, safe="/")  # noqa: E731 (localbucket's _list_encoder)
            parts = [b"<Contents><Key>" + _xml(enc(key)) + frag[frag.index(b"</Key>"):] for key, frag in contents]
        else:
            enc = lambda text: text  # noqa: E731
            parts = [frag for _, frag in contents]
        parts += [b"<CommonPrefixes><Prefix>" + _xml(enc(c)) + b"</Prefix></CommonPrefixes>" for c in common_prefixes]
        return b"".join(parts)

    # ------------------------------------------------------------------------------------------ the server's own writes
    def before_change(self, key: str) -> int | None:
        """Before the server writes or deletes ``key``: its directory's mtime if the index holds that directory
        as current (then :meth:`after_write` / :meth:`after_delete` update the index in place), else None."""
        d = self.dirs.get(key.rpartition("/")[0])
        if d is None or d.mtime_ns == _UNTRUSTED:
            return None
        try:
            m = os.lstat(self._path(key.rpartition("/")[0])).st_mtime_ns
        except OSError:
            return None
        return m if m == d.mtime_ns else None

    def after_write(self, key: str, before: int | None) -> None:
        """``key`` was just written by the server (``before``: :meth:`before_change`'s answer)."""
        rel = key.rpartition("/")[0]
        d = self.dirs.get(rel)
        if d is None:
            return  # not indexed: read when a listing first needs it (its parent's new mtime says so)
        if before is None:
            d.mtime_ns = _UNTRUSTED
            return
        try:
            mtime = os.lstat(self._path(rel)).st_mtime_ns
            fragment = self._fragment(key, self._path(key))
        except OSError:
            d.mtime_ns = _UNTRUSTED
            return
        if key not in self.fragments:
            bisect.insort(self.keys, key)
        self.fragments[key] = fragment
        d.mtime_ns = mtime

    def after_delete(self, key: str, before: int | None) -> None:
        """``key`` was just deleted by the server (its emptied directories too)."""
        rel = key.rpartition("/")[0]
        d = self.dirs.get(rel)
        if d is None:
            return
        try:
            mtime = os.lstat(self._path(rel)).st_mtime_ns
        except OSError:
            self._forget(rel)  # removed with its last object; its parent's mtime changed
            return
        if before is None:
            d.mtime_ns = _UNTRUSTED
            return
        self._drop(key)
        d.mtime_ns = mtime

    def changed(self, key: str) -> None:
        """A change to ``key``'s directory whose outcome is unknown (a write that failed): read it again."""
        d = self.dirs.get(key.rpartition("/")[0])
        if d is not None:
            d.mtime_ns = _UNTRUSTED

    def clear(self) -> None:
        """Forget everything (the bucket was deleted or created, or a write went through a symlink)."""
        self.keys, self.fragments, self.dirs = [], {}, {}

    # ------------------------------------------------------------------------------------------ reading directories
    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _block(self, rel: str) -> tuple[int, int]:
        """The slice of :attr:`keys` under directory ``rel``."""
        if not rel:
            return 0, len(self.keys)
        lo = bisect.bisect_left(self.keys, rel + "/")
        return lo, bisect.bisect_left(self.keys, rel + "0", lo)  # "0" follows "/"

    def _validate(self, top: str) -> None:
        """Make the index current for every directory under ``top`` (os.walk's: not into symlinked ones)."""
        stack = [top]
        while stack:
            rel = stack.pop()
            try:
                st = os.lstat(self._path(rel))
            except OSError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._forget(rel)
                continue
            d = self.dirs.get(rel)
            if (d is None or d.mtime_ns != st.st_mtime_ns
                    or (d.racy and st.st_mtime_ns + RACY_NS < time.time_ns())):
                d = self._scan(rel, st)
            stack.extend(f"{rel}/{s}" if rel else s for s in d.subdirs)

    def _scan(self, rel: str, st: os.stat_result) -> _Dir:
        """Read directory ``rel`` (whose ``lstat`` is ``st``) into the index: its files (their fragments rendered
        again when next listed: any may have been replaced), and which subdirectories it still has (the keys and
        state of vanished ones are dropped). One ``scandir``, no ``stat`` per file."""
        self.scans += 1
        started = time.time_ns()
        base = self._path(rel)
        files: list[str] = []
        subdirs: list[str] = []
        readable = True
        try:
            with os.scandir(base) as it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        if not entry.is_symlink():
                            subdirs.append(entry.name)
                    elif not entry.name.startswith(localbucket.TEMP_PREFIX):
                        if entry.is_symlink() and not os.path.exists(entry.path):
                            continue  # dangling: not an object (localbucket would fail the listing)
                        files.append(entry.name)
        except OSError:  # os.walk skips what it cannot read; read it again next time
            readable = False
        slash = f"{rel}/" if rel else ""
        new: dict[str, bytes | None] = dict.fromkeys(slash + name for name in files)  # rendered when listed
        keep = set(subdirs)
        lo, hi = self._block(rel)
        kept = []
        for key in self.keys[lo:hi]:
            sub, sep, _ = key[len(slash):].partition("/")
            if sep and sub in keep:
                kept.append(key)
            else:  # a file of this directory (read again above) or under a subdirectory that is gone
                self.fragments.pop(key, None)
        self.fragments.update(new)
        self.keys[lo:hi] = sorted(kept + list(new))
        for d in [d for d in self.dirs if d != rel and d.startswith(slash)
                  and d[len(slash):].partition("/")[0] not in keep]:
            del self.dirs[d]
        d = self.dirs[rel] = _Dir(st.st_mtime_ns if readable else _UNTRUSTED, subdirs,
                                  racy=started <= st.st_mtime_ns + RACY_NS)
        return d

    def _drop(self, key: str) -> None:
        if key in self.fragments:
            del self.fragments[key]
            del self.keys[bisect.bisect_left(self.keys, key)]

    def _forget(self, rel: str) -> None:
        """Drop directory ``rel`` and everything under it."""
        lo, hi = self._block(rel)
        for key in self.keys[lo:hi]:
            self.fragments.pop(key, None)
        del self.keys[lo:hi]
        slash = f"{rel}/" if rel else ""
        for d in [d for d in self.dirs if d == rel or d.startswith(slash)]:
            del self.dirs[d]

    @staticmethod
    def _fragment(key: str, path: str) -> bytes:
        """``key``'s ``<Contents>`` element as localbucket renders it (one ``stat``; the ETag from localbucket's
        cache, which holds every object this process wrote or read while it is unchanged)."""
        st = os.stat(path)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with localbucket._etag_lock:
            cached = localbucket._etag_cache.get(path)
        etag = cached[1] if cached and cached[0] == signature else localbucket.object_etag(Path(path))
        return (b"<Contents><Key>" + _xml(key) + b"</Key><LastModified>"
                + localbucket.iso_timestamp(st.st_mtime).encode() + b'</LastModified><ETag>"' + etag.encode()
                + b'"</ETag><Size>' + str(st.st_size).encode() + b"</Size><StorageClass>STANDARD</StorageClass>"
                  b"</Contents>")
