"""The broker's storage server answers listings from an index in memory (and, earlier, from the directory a
prefix names): the same answers as localbucket's own listing (which walks the whole bucket), page by page and
byte for byte through the real servers, after random writes, overwrites, deletes, copies and multipart uploads,
changes made while it was down and changes made beside it."""

from __future__ import annotations

import base64
import http.client
import itertools
import os
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from http.server import ThreadingHTTPServer

import localbucket
import pytest

from streams.bus.listing import ListingIndex
from streams.bus.storage import BUCKET, StorageServer, _scoped_handler, handler_class


@pytest.fixture
def tree(tmp_path):
    """A bucket shaped like Tansu's: topics / partitions / records, plus metadata and a half-written object."""
    bucket = tmp_path / BUCKET
    for topic, part, n in itertools.product(("clicks", "examples", "ex"), range(3), (0, 1, 5)):
        d = bucket / "clusters" / "c1" / "topics" / topic / "partitions" / f"{part:010d}" / "records"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n + part):
            (d / f"{i:020d}.batch").write_bytes(b"x" * (i + 1))
    (bucket / "clusters" / "c1" / "meta.json").write_text("{}")
    (bucket / "clusters" / "c1" / "topics" / "clicks" / f"{localbucket.TEMP_PREFIX}upload").write_text("partial")
    return bucket


PREFIXES = ("", "clusters/", "clusters/c1/topics/", "clusters/c1/topics/ex", "clusters/c1/topics/ex/",
            "clusters/c1/topics/examples/partitions/0000000002/records/", "clusters/c1/topics/examples/partitions/00",
            "clusters/c1/meta", "clusters/c2/", "nothing/here/", "clusters/c1/topics/../topics/clicks/")


def test_scoped_listing_equals_localbuckets_walk_of_the_whole_bucket(tree):
    scoped = _scoped_handler()
    keys = [k for k, _ in localbucket.S3Handler._list_entries(None, tree, "", "", "", False, 1000)[0]]
    markers = ["", keys[len(keys) // 3], "clusters/c1/topics/ex", "zzz"]
    for prefix, delimiter, marker, is_prefix, max_keys in itertools.product(
            PREFIXES, ("", "/"), markers, (False, True), (0, 3, 1000)):
        args = (tree, prefix, delimiter, marker, is_prefix, max_keys)
        want = localbucket.S3Handler._list_entries(None, *args)
        assert scoped._list_entries(None, *args) == want, args


def test_the_server_pages_a_partition_in_key_order(tree):
    prefix = "clusters/c1/topics/examples/partitions/0000000002/records/"
    expected = sorted(p.relative_to(tree).as_posix() for p in (tree / prefix).iterdir())
    got, token = [], None
    with StorageServer(tree.parent) as s3:
        while True:
            q = {"list-type": "2", "prefix": prefix, "max-keys": "3", **({"continuation-token": token} if token else {})}
            with urllib.request.urlopen(f"http://127.0.0.1:{s3.port}/{BUCKET}?{urllib.parse.urlencode(q)}") as r:
                body = r.read().decode()
            got += re.findall(r"<Key>(.*?)</Key>", body)
            token = (re.findall(r"<NextContinuationToken>(.*?)</NextContinuationToken>", body) or [None])[0]
            if token is None:
                break
    assert got == expected and len(got) == 7


def test_index_pages_equal_localbuckets_walk_of_the_whole_bucket(tree):
    keys = [k for k, _ in localbucket.S3Handler._list_entries(None, tree, "", "", "", False, 1000)[0]]
    markers = ["", keys[len(keys) // 3], "clusters/c1/topics/ex", "clusters/c1/topics/examples/", "zzz"]
    hour_ago = time.time() - 3600  # not changed just now: a directory is read once (else once more, later)
    for d, _, _ in os.walk(tree):
        os.utime(d, (hour_ago, hour_ago))
    index = ListingIndex(tree)
    for prefix, delimiter, marker, is_prefix, max_keys in itertools.product(
            PREFIXES, ("", "/", "s"), markers, (False, True), (0, 1, 3, 1000)):
        args = (prefix, delimiter, marker, is_prefix, max_keys)
        contents, common, truncated, last = index.page(*args)
        want = localbucket.S3Handler._list_entries(None, tree, *args)
        assert ([k for k, _ in contents], common, truncated, last) == ([k for k, _ in want[0]], *want[1:]), args
    assert index.scans == len([d for d, _, _ in os.walk(tree)])  # each directory read once


# ---------------------------------------------------------------------------------------------- through the servers
def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        assert r.status < 300, (method, path, r.status, data)
        return data
    finally:
        conn.close()


def _key_path(key: str) -> str:
    return f"/{BUCKET}/" + urllib.parse.quote(key)


def _put(port: int, key: str, body: bytes) -> None:
    _request(port, "PUT", _key_path(key), body)


def _copy(port: int, source: str, key: str) -> None:
    _request(port, "PUT", _key_path(key), headers={"x-amz-copy-source": f"/{BUCKET}/" + urllib.parse.quote(source)})


def _multipart(port: int, key: str, body: bytes) -> None:
    started = _request(port, "POST", _key_path(key) + "?uploads")
    upload = re.search(rb"<UploadId>(\w+)</UploadId>", started)[1].decode()
    _request(port, "PUT", _key_path(key) + f"?partNumber=1&uploadId={upload}", body)
    etag = localbucket.hashlib.md5(body).hexdigest()
    done = f"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"{etag}\"</ETag></Part>" \
           "</CompleteMultipartUpload>"
    _request(port, "POST", _key_path(key) + f"?uploadId={upload}", done.encode())


def _list(port: int, **query) -> bytes:
    return _request(port, "GET", f"/{BUCKET}?" + urllib.parse.urlencode(query))


DIRS = ("", "a", "a/b", "a.b", "a0", "c/d/e", "c/d", "\u00fc", "p/records")
NAMES = ("f", "f.1", "g-2", "h&<>'\"", "\u00e9", "z z", "00", "b0", "a.b.c")


def _random_ops(rng: random.Random, port: int, existing: set[str], n: int) -> None:
    """``n`` random writes, overwrites, copies, multipart uploads and deletes through the server on ``port``."""
    for _ in range(n):
        op = rng.choice(("put", "put", "put", "overwrite", "delete", "delete", "copy", "multipart"))
        key = "/".join(filter(None, (rng.choice(DIRS), rng.choice(NAMES))))
        body = os.urandom(rng.randrange(0, 50))
        if op in ("overwrite", "delete", "copy") and existing:
            old = rng.choice(sorted(existing))
            if op == "overwrite":
                _put(port, old, body)
            elif op == "delete":
                _request(port, "DELETE", _key_path(old))
                existing.discard(old)
            elif old != key:
                _copy(port, old, key)
                existing.add(key)
        elif op == "multipart":
            _multipart(port, key, body)
            existing.add(key)
        else:
            _put(port, key, body)
            existing.add(key)


def _queries(keys: list[str]) -> list[dict]:
    """Listing queries for V1 and V2: prefixes, delimiters, markers / start-after, max-keys, url encoding."""
    out = []
    prefixes = ("", "a", "a/", "a/b", "a/b/", "a.", "c/d/", "c/d/e/", "\u00fc/", "p/records/", "nope/", "a//",
                "a/../a/", "/a")
    markers = ("", "a/b/f", "a/b/", "c", "\u00fc/z z", *(keys[len(keys) // 2:len(keys) // 2 + 1]))
    for prefix, delimiter in itertools.product(prefixes, ("", "/", ".")):
        base = {"prefix": prefix, **({"delimiter": delimiter} if delimiter else {})}
        out.append({"list-type": "2", **base})
        out.append({"list-type": "2", **base, "max-keys": "0"})
        out.append({"list-type": "2", **base, "max-keys": "1", "encoding-type": "url"})
        out.append({**base, "max-keys": "3"})
    for marker, delimiter in itertools.product(markers, ("", "/")):
        d = {"delimiter": delimiter} if delimiter else {}
        out.append({"list-type": "2", "prefix": "", "start-after": marker, "max-keys": "4", **d})
        out.append({"marker": marker, "max-keys": "2", **d})
    return out


def _pages(port: int, prefix: str, delimiter: str, max_keys: int) -> list[bytes]:
    """Every page of a V2 listing, following continuation tokens (as Tansu does)."""
    pages, token = [], None
    while True:
        q = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys), **({"delimiter": delimiter} if delimiter else {}),
             **({"continuation-token": token} if token else {})}
        pages.append(_list(port, **q))
        found = re.search(rb"<NextContinuationToken>(.*?)</NextContinuationToken>", pages[-1])
        if not found:
            return pages
        token = found[1].decode()


def _assert_same_listings(port: int, reference: int, existing: set[str]) -> None:
    keys = sorted(existing)
    for q in _queries(keys):
        assert _list(port, **q) == _list(reference, **q), q
    for prefix, delimiter, max_keys in itertools.product(("", "a/", "p/records/"), ("", "/"), (1, 2, 1000)):
        assert _pages(port, prefix, delimiter, max_keys) == _pages(reference, prefix, delimiter, max_keys)
    everything = b"".join(_pages(port, "", "", 1000))
    assert sorted(k.decode() for k in re.findall(rb"<Key>(.*?)</Key>", everything)) == sorted(
        localbucket.escape(k) for k in existing)


def test_indexed_server_answers_like_localbucket_after_random_changes_and_restarts(tmp_path):
    rng = random.Random(7)
    existing: set[str] = set()
    with StorageServer(tmp_path, listing="index") as s3, StorageServer(tmp_path, listing="bucket-walk") as ref:
        _assert_same_listings(s3.port, ref.port, existing)  # empty bucket
        for _ in range(6):
            _random_ops(rng, s3.port, existing, 25)
            _assert_same_listings(s3.port, ref.port, existing)
        # changes while the indexed server is down: a restart finds the tree as it is
        s3.stop()
        _random_ops(rng, ref.port, existing, 30)
        s3.start()
        _assert_same_listings(s3.port, ref.port, existing)
        # changes made beside it, through the other server, once the index holds every directory
        time.sleep(0.2)  # past the coarse clock's tick of the last change (a few ms)
        _random_ops(rng, ref.port, existing, 10)
        _assert_same_listings(s3.port, ref.port, existing)
        _random_ops(rng, s3.port, existing, 20)
        _assert_same_listings(s3.port, ref.port, existing)


@pytest.fixture
def in_process(tmp_path):
    """An indexed server in this process (its indexes inspectable): (port, handler class)."""
    handler = handler_class("index")
    handler.data_root = tmp_path.resolve()
    handler.disable_nagle_algorithm = True
    (tmp_path / BUCKET).mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_a_tailed_partition_is_read_from_disk_once_and_every_write_is_listed_at_once(in_process, tmp_path):
    port, handler = in_process
    records = "clusters/c/topics/t/partitions/0000000000/records/"
    for i in range(30):
        _put(port, f"{records}{i:020d}.batch", b"x" * i)
    index = handler.indexes[str(tmp_path.resolve() / BUCKET)] if handler.indexes else None
    for i in range(30, 330):
        _put(port, f"{records}{i:020d}.batch", b"y" * (i % 7))
        listed = b"".join(_pages(port, records, "", 100))
        keys = re.findall(rb"<Key>(.*?)</Key>", listed)
        assert len(keys) == i + 1 and keys[-1] == f"{records}{i:020d}.batch".encode()  # the write just acknowledged
        index = index or handler.indexes[str(tmp_path.resolve() / BUCKET)]
    # read once, plus once more at most for each time it was read within RACY_NS of a write (then quiet
    # for that long before a listing): not once per listing
    assert index.scans <= 3, index.scans
    assert _pages(port, records, "", 100)[-1].count(b"<Contents>") == 30


def test_a_change_beside_the_server_right_after_it_read_a_directory_is_listed(in_process, tmp_path):
    port, handler = in_process
    d = tmp_path / BUCKET / "p" / "records"
    d.mkdir(parents=True)
    (d / "0.batch").write_bytes(b"a")
    assert re.findall(rb"<Key>(.*?)</Key>", _list(port, **{"list-type": "2", "prefix": "p/records/"})) == [
        b"p/records/0.batch"]
    (d / "1.batch").write_bytes(b"b")  # maybe within the same clock tick as the first: the mtime may not change
    (d / f"{localbucket.TEMP_PREFIX}x").write_bytes(b"half")  # a write in progress: never listed
    deadline = time.monotonic() + 5
    while True:  # listed once the directory has been quiet for RACY_NS (read again), or at once (a new mtime)
        got = re.findall(rb"<Key>(.*?)</Key>", _list(port, **{"list-type": "2", "prefix": "p/records/"}))
        if got == [b"p/records/0.batch", b"p/records/1.batch"] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert got == [b"p/records/0.batch", b"p/records/1.batch"]
    os.unlink(d / "0.batch")
    (d.parent / "watermark.json").write_text("{}")
    time.sleep(0.2)
    assert re.findall(rb"<Key>(.*?)</Key>", _list(port, **{"list-type": "2", "prefix": "p/"})) == [
        b"p/records/1.batch", b"p/watermark.json"]


def test_continuation_tokens_are_localbuckets(in_process):
    port, _ = in_process
    for i in range(5):
        _put(port, f"r/{i}", b"")
    first = _list(port, **{"list-type": "2", "prefix": "r/", "max-keys": "2"})
    token = re.search(rb"<NextContinuationToken>(.*?)</NextContinuationToken>", first)[1]
    assert base64.urlsafe_b64decode(token) == b"K:r/1"


def _keys(port: int, prefix: str) -> list[str]:
    return [k.decode() for k in re.findall(rb"<Key>(.*?)</Key>", b"".join(_pages(port, prefix, "", 1000)))]


def test_a_change_beside_the_server_is_not_hidden_by_its_next_write(in_process, tmp_path):
    port, _ = in_process
    _put(port, "r/0", b"a")
    d = tmp_path / BUCKET / "r"
    os.utime(d, ns=(1, 10**18))  # the directory's mtime: long ago, so the index trusts what it reads now
    assert _keys(port, "r/") == ["r/0"]
    (d / "beside").write_bytes(b"b")  # a new mtime (now)
    _put(port, "r/1", b"c")  # the server's write must not take the new mtime as its own
    assert _keys(port, "r/") == ["r/0", "r/1", "r/beside"]


def test_a_change_within_the_clock_tick_of_a_read_is_listed_once_the_directory_is_quiet(in_process, tmp_path,
                                                                                       monkeypatch):
    from streams.bus import listing

    monkeypatch.setattr(listing, "RACY_NS", 10**9)  # wide enough for a loaded machine to read within it
    port, _ = in_process
    d = tmp_path / BUCKET / "r"
    d.mkdir()
    (d / "0").write_bytes(b"a")
    tick = time.time_ns()
    os.utime(d, ns=(tick, tick))
    assert _keys(port, "r/") == ["r/0"]  # read within RACY_NS of its last change
    (d / "1").write_bytes(b"b")
    os.utime(d, ns=(tick, tick))  # changed again within the same tick: the mtime says nothing
    time.sleep(max(0.0, (tick + listing.RACY_NS - time.time_ns()) / 1e9) + 0.01)
    assert _keys(port, "r/") == ["r/0", "r/1"]


def test_fragments_are_rendered_when_first_listed_and_a_file_gone_meanwhile_is_skipped(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    for i in range(5):
        (d / str(i)).write_bytes(b"x" * i)
    (d / "link").symlink_to(d / "4")  # a symlink to a file is an object (os.walk's file), a dangling one is not
    (d / "nowhere").symlink_to(d / "missing")
    os.utime(d, ns=(1, 10**18))
    index = ListingIndex(tmp_path)
    assert [k for k, _ in index.page("r/", "", "", False, 2)[0]] == ["r/0", "r/1"]
    assert [k for k, f in index.fragments.items() if f is not None] == ["r/0", "r/1"]  # read, not yet stat'ed
    os.unlink(d / "3")
    os.utime(d, ns=(1, 10**18))  # as if within the same clock tick: the index cannot know
    contents, _, truncated, last = index.page("r/", "", "r/1", False, 2)
    assert [k for k, _ in contents] == ["r/2", "r/4"] and truncated and last == "K:r/4"
    assert [k for k, _ in index.page("r/", "", "r/4", False, 2)[0]] == ["r/link"]
    want = localbucket.S3Handler._list_entries(None, tmp_path, "r/", "", "", False, 1000)[0]
    assert [k for k, _ in index.page("r/", "", "", False, 1000)[0]] == [k for k, _ in want if k != "r/nowhere"]
    assert b"<Size>4</Size>" in dict(index.page("r/", "", "", False, 1000)[0])["r/link"]
