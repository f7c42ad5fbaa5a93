"""The embedded broker's disk: a local S3-compatible server (``localbucket``, from PyPI) in its own process.

Tansu's bundled build stores topics in memory or on S3. Pointed at this server it keeps every acknowledged
message across a SIGKILL of the broker, of this server, or of both (each object is written to a temporary
file and renamed into place). It does not fsync: a power loss can take the last writes, as it can from a
Kafka broker with its default flush settings.

Chosen over s3rver (npm) after measuring both behind Tansu (README, "What survives what"): the same
durability, faster reads of partitions holding many batches (s3rver on Node 20 fails to page listings past
1,000 objects), 25 MB of memory, no Node toolchain. Started here with TCP_NODELAY on (without it reads of small
objects wait on Nagle's algorithm: 17x slower) and without a log line per request.

Run as ``python -m streams.bus.storage DIR --port PORT``; it serves bucket :data:`BUCKET` (a folder of DIR)
on 127.0.0.1 only: it has no authentication.

Listings come from an index in memory (:mod:`streams.bus.listing`: each bucket's keys sorted, each with its
rendered XML, updated by the server's own writes and checked against directory mtimes): Tansu lists all of a
partition's batch objects on every fetch of a tailing consumer, and localbucket 1.2.1 walks and sorts the whole
bucket and stats every listed key for every page, so under a steady stream the server saturated within
minutes (``streamrec bench soak``, README). ``--listing`` serves the earlier ways instead, for comparison
(``streamrec bench storage-list``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from streams.bus import processes
from streams.bus.processes import free_port, start_child, stop_child

BUCKET = "tansu"
# Tansu's object store client needs credentials even for a server that ignores them (without, it asks a cloud
# metadata address for some); these are the ones s3rver expects, harmless anywhere else.
_KEY = "S3RVER"
# how the server answers listings: from its index (the default); walking the prefix's directory (the previous
# way); walking the whole bucket (localbucket's own)
LISTINGS = ("index", "prefix-walk", "bucket-walk")


class StorageError(RuntimeError):
    """The storage server could not be started or did not answer."""


def broker_env(port: int) -> dict[str, str]:
    """The environment Tansu needs to use the server on ``port`` (``--storage-engine s3://tansu/``)."""
    return {"AWS_ACCESS_KEY_ID": _KEY, "AWS_SECRET_ACCESS_KEY": _KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}


def command(root: str | os.PathLike, port: int, listing: str = "index") -> list[str]:
    """The command line of a server keeping its objects under ``root`` (``listing``: one of :data:`LISTINGS`)."""
    return [sys.executable, "-m", "streams.bus.storage", str(Path(root).resolve()), "--port", str(port),
            *(["--listing", listing] if listing != "index" else [])]


def ready(port: int, timeout: float = 0.5) -> bool:
    """Whether the server on ``port`` answers and has the bucket."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{BUCKET}", method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_ready(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    """Wait until the server on ``port`` has the bucket (:class:`StorageError` if ``proc`` exits first)."""
    processes.wait_ready(lambda: ready(port), proc, timeout, f"the storage server on 127.0.0.1:{port}", StorageError)


class StorageServer:
    """Start/stop one storage server process (``up`` supervises the same command instead)."""

    def __init__(self, root: str | os.PathLike, port: int | None = None, log_path: str | os.PathLike | None = None,
                 listing: str = "index"):
        self.root, self.port, self.listing = Path(root), port or free_port(), listing
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> StorageServer:
        self.proc = start_child(command(self.root, self.port, self.listing), self.log_path)
        wait_ready(self.port, self.proc, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        stop_child(self.proc, timeout)
        self.proc = None

    def __enter__(self) -> StorageServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _scoped_handler():
    import localbucket

    class ScopedHandler(localbucket.S3Handler):
        """localbucket's handler, listing from the directory a prefix names instead of the bucket's root (the
        previous way, ``--listing prefix-walk``: every page still walks and sorts that directory and stats each
        listed key; :func:`_indexed_handler` replaced it).

        Keys are paths: every key that starts with ``a/b/c`` lies under ``a/b/``, so walking that directory
        finds the same keys as walking the whole bucket (tests/test_storage.py compares the two on the same tree
        for prefixes, delimiters, markers and pages). Measured on a bucket of 30,000 objects: a listing of one
        partition of 313 keys took 440 ms with localbucket's walk (8,000 objects: 84 ms; 1,000: 10 ms).
        """

        def _list_entries(self, bucket_dir: Path, prefix: str, delimiter: str, marker: str, marker_is_prefix: bool,
                          max_keys: int):
            top = bucket_dir / prefix.rpartition("/")[0]
            if ".." in Path(prefix).parts:  # not a plain path: localbucket's own way
                return localbucket.S3Handler._list_entries(self, bucket_dir, prefix, delimiter, marker,
                                                           marker_is_prefix, max_keys)
            # from here on localbucket 1.2.1's S3Handler._list_entries, with the walk rooted at `top` and keys
            # made as strings (a Path per object took half the time of a listing); Paths only for the page
            contents: list[tuple[str, Path]] = []
            common_prefixes: list[str] = []
            last_entry = ""
            truncated = False
            keys = []
            skip = len(str(bucket_dir)) + 1
            for directory, _, files in os.walk(top):
                rel = directory[skip:].replace(os.sep, "/")
                for name in files:
                    if name.startswith(localbucket.TEMP_PREFIX):
                        continue
                    keys.append(f"{rel}/{name}" if rel else name)
            keys.sort(key=str.encode)
            for key in keys:
                if not key.startswith(prefix):
                    continue
                if marker and (key.encode() <= marker.encode() or (marker_is_prefix and key.startswith(marker))):
                    continue
                common = ""
                if delimiter:
                    index = key.find(delimiter, len(prefix))
                    if index >= 0:
                        common = key[: index + len(delimiter)]
                if common and common_prefixes and common_prefixes[-1] == common:
                    continue
                if len(contents) + len(common_prefixes) >= max_keys:
                    truncated = max_keys > 0
                    break
                if common:
                    common_prefixes.append(common)
                    last_entry = "P:" + common
                else:
                    contents.append((key, bucket_dir / key))
                    last_entry = "K:" + key
            return contents, common_prefixes, truncated, last_entry

    return ScopedHandler


def _indexed_handler():
    import xml.etree.ElementTree as ET
    from http import HTTPStatus

    import localbucket

    from streams.bus.listing import ListingIndex

    class IndexedHandler(localbucket.S3Handler):
        """localbucket's handler, answering listings from a :class:`~streams.bus.listing.ListingIndex` per
        bucket, which its own writes and deletes keep current under the index's lock (so a listing after an
        acknowledged write has it). The rest of each response is localbucket's own: its header elements, then
        the page's prerendered fragments joined in before the closing tag."""

        indexes: dict[str, ListingIndex] = {}
        indexes_lock = threading.Lock()

        def _index(self, bucket_dir: Path) -> ListingIndex:
            with self.indexes_lock:
                index = self.indexes.get(str(bucket_dir))
                if index is None:
                    index = self.indexes[str(bucket_dir)] = ListingIndex(bucket_dir)
                return index

        def _list_entries(self, bucket_dir: Path, prefix: str, delimiter: str, marker: str, marker_is_prefix: bool,
                          max_keys: int):
            return self._index(bucket_dir).page(prefix, delimiter, marker, marker_is_prefix, max_keys)

        def _add_list_entries(self, root, contents, common_prefixes, encode):
            self._entries = ListingIndex.render(contents, common_prefixes, self.query.get("encoding-type") == "url")

        def _send_xml(self, root):
            entries, self._entries = getattr(self, "_entries", None), None
            if entries is None:
                return super()._send_xml(root)
            head = ET.tostring(root, encoding="UTF-8", xml_declaration=True)
            close = f"</{root.tag}>".encode()
            self._send(HTTPStatus.OK, head[: -len(close)] + entries + close, {"Content-Type": "application/xml"})

        def _write_object(self, bucket: str, key: str, write) -> str:
            return self._change(bucket, key, lambda: super(IndexedHandler, self)._write_object(bucket, key, write),
                                ListingIndex.after_write)

        def _delete_object(self, bucket: str, key: str):
            return self._change(bucket, key, lambda: super(IndexedHandler, self)._delete_object(bucket, key),
                                ListingIndex.after_delete)

        def _change(self, bucket: str, key: str, change, update):
            """Run the write or delete ``change`` of ``key`` and ``update`` the index, both under its lock."""
            target = self._object_path(bucket, key)  # S3Error for a bad key or bucket, before anything changes
            bucket_dir = self._bucket_dir(bucket)
            index = self._index(bucket_dir)
            with index.lock:
                before = index.before_change(key)
                try:
                    result = change()
                except BaseException:
                    index.changed(key)
                    raise
                if target != bucket_dir.resolve().joinpath(*key.split("/")):  # through a symlink: not worth it
                    index.clear()
                else:
                    update(index, key, before)
                return result

        def _create_bucket(self, bucket: str):
            self._forget_bucket(bucket)
            super()._create_bucket(bucket)

        def _delete_bucket(self, bucket: str):
            super()._delete_bucket(bucket)
            self._forget_bucket(bucket)

        def _forget_bucket(self, bucket: str) -> None:
            with self.indexes_lock:
                index = self.indexes.pop(str(self.data_root / bucket), None)
            if index is not None:
                with index.lock:
                    index.clear()

    return IndexedHandler


def handler_class(listing: str = "index"):
    """The request handler class serving listings the ``listing`` way (one of :data:`LISTINGS`)."""
    import localbucket

    if listing not in LISTINGS:
        raise ValueError(f"unknown listing {listing!r}: one of {', '.join(LISTINGS)}")
    return {"index": _indexed_handler, "prefix-walk": _scoped_handler,
            "bucket-walk": lambda: type("BucketWalkHandler", (localbucket.S3Handler,), {})}[listing]()


def serve(root: Path, port: int, host: str = "127.0.0.1", listing: str = "index") -> None:
    """Serve ``root`` (buckets are its folders) until interrupted."""
    from http.server import ThreadingHTTPServer

    import localbucket

    (root / BUCKET).mkdir(parents=True, exist_ok=True)
    handler = handler_class(listing)
    handler.data_root = root.resolve()
    handler.disable_nagle_algorithm = True
    localbucket.logger.setLevel(logging.WARNING)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.bus.storage",
                                description="The embedded broker's local S3 server (127.0.0.1 only).")
    p.add_argument("root", type=Path, help="directory holding the buckets")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--listing", choices=LISTINGS, default="index",
                   help="how listings are answered: from an index in memory (default); walking the directory the "
                        "prefix names, or the whole bucket, for every page (the earlier ways, for comparison)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args.root, args.port, listing=args.listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
