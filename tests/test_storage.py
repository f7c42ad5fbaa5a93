"""The broker's storage server lists from the directory a prefix names: the same answers as localbucket's own
listing (which walks the whole bucket), page by page, through the real server."""

from __future__ import annotations

import itertools
import re
import urllib.parse
import urllib.request

import localbucket
import pytest

from streams.bus.storage import BUCKET, StorageServer, _scoped_handler


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
