"""The broker's storage server: listing requests/s of one partition of N objects, index vs prefix walk.

The listing index (streams/bus/listing.py, the server's default) against walking the prefix's directory and
stat'ing every listed key for every page (the previous handler, ``--listing prefix-walk``), at each N.

Listed the way Tansu 0.6 lists a partition on every fetch of a tailing consumer (logged from a real embedded
broker): ``GET /tansu?list-type=2&prefix=<partition>/records/``, then the same with each page's
``continuation-token`` until the last; 1,000 keys a page (no max-keys: the default), one kept-alive
connection. The server is the real process (``python -m streams.bus.storage --listing ...``) on a tree of N
objects written beforehand (a restart on an existing partition: the index reads it on the first listing).
Each full listing is checked to hold all N keys. On shared cores compare the server's CPU per request (from
/proc) as well as the rates. The "while writing" rows add a writer putting 50 new batch
objects a second into the same partition (through the server, on its own connection) during the measurement,
as Tansu does while consumers tail.

    streamrec bench storage-list [--quick] [--n 1000,5000,20000] [--seconds S]
"""

from __future__ import annotations

import http.client
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import parser, report
from streams.bus.storage import BUCKET, StorageServer

PARTITION = "clusters/bench/topics/impressions/partitions/0000000000/records/"
_TOKEN = re.compile(rb"<NextContinuationToken>(.*?)</NextContinuationToken>")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def full_listing(conn: http.client.HTTPConnection) -> tuple[int, int]:
    """List the partition through all its pages as Tansu does: (pages, keys)."""
    pages = keys = 0
    token = None
    while True:
        q = f"continuation-token={token}&list-type=2&prefix=" if token else "list-type=2&prefix="
        conn.request("GET", f"/{BUCKET}?{q}{PARTITION.replace('/', '%2F')}")
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"listing answered {r.status}: {body[:300]!r}")
        pages += 1
        keys += body.count(b"<Contents>")
        found = _TOKEN.search(body)
        if not found:
            return pages, keys
        token = found[1].decode()


def writer(port: int, start: int, per_s: float, stop: threading.Event, written: list[int]) -> None:
    """Put new batch objects into the partition at ``per_s`` a second until ``stop``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i, t0 = start, time.perf_counter()
    while not stop.is_set():
        conn.request("PUT", f"/{BUCKET}/{PARTITION}{i:020d}.batch", body=b"w" * 4096)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"put answered {r.status}")
        i += 1
        written[0] = i - start
        time.sleep(max(0.0, t0 + (i - start) / per_s - time.perf_counter()))
    conn.close()


def measure(root: Path, n: int, listing: str, seconds: float, write_per_s: float = 0.0) -> dict:
    """Full listings of the partition for ``seconds`` against a fresh server process serving ``listing``."""
    with StorageServer(root, listing=listing) as s3:
        conn = http.client.HTTPConnection("127.0.0.1", s3.port, timeout=120)
        t0 = time.perf_counter()
        pages, keys = full_listing(conn)  # the first: the index reads the partition
        first_ms = (time.perf_counter() - t0) * 1e3
        if keys != n:
            raise RuntimeError(f"{listing}: the first listing has {keys} keys, not {n}")
        stop, written = threading.Event(), [0]
        w = threading.Thread(target=writer, args=(s3.port, n, write_per_s, stop, written), daemon=True)
        if write_per_s:
            w.start()
        c0, t0 = cpu_s(s3.proc.pid), time.perf_counter()
        requests = listings = 0
        while True:
            before = written[0]
            p, k = full_listing(conn)
            if not n + before <= k <= n + written[0] + 1:  # every write acknowledged before it began is listed
                raise RuntimeError(f"{listing}: a listing has {k} keys, expected {n + before}..{n + written[0]}")
            requests, listings = requests + p, listings + 1
            wall = time.perf_counter() - t0
            if wall >= seconds:
                break
        cores = (cpu_s(s3.proc.pid) - c0) / wall
        stop.set()
        if write_per_s:
            w.join()
        conn.close()
        extra = written[0]
    # the written objects are removed again: every configuration starts from the same N
    for i in range(n, n + extra):
        (root / BUCKET / PARTITION / f"{i:020d}.batch").unlink()
    return {"requests_per_s": requests / wall, "listing_ms": wall / listings * 1e3, "pages": pages,
            "first_ms": first_ms, "server_cores": cores, "server_cpu_ms_per_request": cores * wall / requests * 1e3,
            "writes": extra}


def make_partition(root: Path, n: int) -> None:
    """Grow the partition's records to ``n`` objects of 4 KiB (about a soak batch)."""
    d = root / BUCKET / PARTITION
    d.mkdir(parents=True, exist_ok=True)
    have = len(os.listdir(d))
    for i in range(have, n):
        (d / f"{i:020d}.batch").write_bytes(b"b" * 4096)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", default="1000,5000,20000", help="objects in the partition, comma-separated (default 1000,5000,20000, also with --quick)")
    p.add_argument("--seconds", type=float, default=None, help="seconds of listing per configuration (default 5, quick 1.5)")
    args = p.parse_args()
    sizes = sorted(int(x) for x in args.n.split(","))
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    rows: list[tuple[str, ...]] = []
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="storage-list-") as tmp:
        root = Path(tmp)
        for n in sizes:
            make_partition(root, n)
            runs = [("prefix-walk", 0.0), ("index", 0.0)]
            if n == sizes[-1]:
                runs += [("prefix-walk", 50.0), ("index", 50.0)]
            for listing, wps in runs:
                r = measure(root, n, listing, seconds, wps)
                name = f"{listing}{' while writing' if wps else ''}"
                results[f"{n}/{name}"] = {k: round(v, 2) for k, v in r.items()}
                rows.append((f"{n:,}", name + (f" ({r['writes']} puts)" if wps else ""), str(r["pages"]),
                             f"{r['requests_per_s']:,.1f}", f"{r['listing_ms']:,.1f}", f"{r['first_ms']:,.0f}",
                             f"{r['server_cpu_ms_per_request']:,.2f}", f"{r['server_cores']:.2f}"))
    for n in sizes:
        a, b = results[f"{n}/index"], results[f"{n}/prefix-walk"]
        rows.append((f"{n:,}", "index / prefix-walk", "", f"{a['requests_per_s'] / b['requests_per_s']:.1f}x",
                     f"{b['listing_ms'] / a['listing_ms']:.1f}x", "",
                     f"{b['server_cpu_ms_per_request'] / a['server_cpu_ms_per_request']:.1f}x", ""))
    top = sizes[-1]
    report("storage-list", rows,
           ("objects", "listing", "pages", "requests/s", "ms per full listing", "first listing ms",
            "server CPU ms/request", "server cores"),
           value=results[f"{top}/index"]["requests_per_s"], unit=f"listing requests/s, one partition of {top:,} objects",
           baseline=results[f"{top}/prefix-walk"]["requests_per_s"], seconds=seconds, results=results)


if __name__ == "__main__":
    main()
