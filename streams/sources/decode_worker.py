"""A decoder process for ``streamrec replay``: it reads the log itself and sends one
:class:`~streams.sources.lineplan.Plan` per block, so the replaying process only slices lines and produces.

Why a process of its own, started with ``python -m`` rather than ``multiprocessing``: the parent holds
librdkafka threads (fork is unsafe), and ``spawn``/``forkserver`` would re-import the parent's ``__main__``
(the whole CLI). This module imports only msgspec and the schema, so the worker is ready in ~0.1 s.

Protocol (frames ``kind:1 byte, length:4 bytes LE, payload`` on the worker's stdout):

    worker -> "R" (ready)       parent -> "OFFSET FIRST_LINE\\n" on stdin (where to start; EOF = stop)
    worker -> "P" msgpack Plan, one per :func:`streams.sources.logfile.iter_blocks` block, in order
    parent -> "FIRST_LINE\\n" at any time: the parent plans that block itself (it does so while it would
              otherwise wait for the worker); the worker answers that block with "K" unless it began it
    worker -> "E" (end of file) or "X" error text, then exits

The pipe holds a few plans (its buffer is raised to 1 MiB where Linux allows): that is the pipeline depth,
and a full pipe blocks the worker. The worker dies with its parent: ``PR_SET_PDEATHSIG`` and a check of its
parent's pid, a broken pipe, or EOF on stdin; it runs in its own session so Ctrl-C reaches only the parent,
which kills it (:meth:`DecoderProcess.close`).

>>> import os, tempfile
>>> from streams import schema
>>> path = os.path.join(tempfile.mkdtemp(), "log.jsonl")
>>> _ = open(path, "wb").write(schema.encode(schema.Watermark(ts=1_767_225_600_000)) + b"\\n{bad\\n")
>>> with DecoderProcess(path, partitions=4) as w:
...     w.begin(0, 1)
...     plan = w.next_plan()
...     plan.marks, plan.failed[0][0], w.next_plan()
([(0, 0)], 2, None)
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import select
import signal
import struct
import subprocess
import sys
import traceback
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Iterator

import msgspec

from streams.sources.lineplan import Plan, Router, plan_block, split_lines
from streams.sources.logfile import Block, iter_blocks

CLAIM_AHEAD = 16  # blocks the parent may plan ahead while the worker is behind (~0.3 MiB each)
BLOCK_BYTES = 1 << 18  # ~800 lines of ours: fine-grained hand-over and claims, ~0.05 us per line of overhead
SKIPPED = object()  # next_plan's answer for a block the parent claimed
_HEAD = struct.Struct("<cI")
_F_SETPIPE_SZ = 1031  # Linux fcntl
_PR_SET_PDEATHSIG = 1


def _bigger_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default 64 KiB holds ~2 plans


# -- worker side ----------------------------------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _Claims:
    """Lines the parent writes on the worker's stdin, read without blocking: "OFFSET FIRST" (start) first,
    then the first line numbers of blocks the parent plans itself."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.closed = fd, b"", False

    def lines(self, wait: bool) -> list[bytes]:
        while not self.closed and (wait or select.select([self.fd], [], [], 0)[0]):
            chunk = os.read(self.fd, 65536)
            self.closed = not chunk
            self.buf += chunk
            wait = wait and b"\n" not in self.buf
        *done, self.buf = self.buf.split(b"\n")
        return done


def serve(path: str, partitions: int, block_bytes: int, out, inp_fd: int) -> None:
    """The worker's loop: announce readiness, read where to start, then one frame per block: its plan, or
    "K" for a block the parent claimed; "E" at the end."""
    write = out.write

    def frame(kind: bytes, payload: bytes = b"") -> None:
        write(_HEAD.pack(kind, len(payload)))
        write(payload)
        out.flush()

    frame(b"R")
    inp = _Claims(inp_fd)
    start = inp.lines(wait=True)
    if not start:
        return  # the parent finished the log itself
    offset, first = map(int, start[0].split())
    claimed = set(map(int, start[1:]))
    router, encode = Router(partitions), msgspec.msgpack.Encoder().encode
    try:
        for b in iter_blocks(path, offset, first, block_bytes):
            claimed.update(map(int, inp.lines(wait=False)))
            if b.first in claimed:
                claimed.discard(b.first)
                frame(b"K")
            else:
                frame(b"P", encode(plan_block(split_lines(b.data), b.first, router, b.data)))
    except Exception:
        frame(b"X", traceback.format_exc().encode())
        raise SystemExit(1)
    frame(b"E")


def main(argv: list[str]) -> int:
    path, partitions, block_bytes, parent = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    _die_with_parent(parent)
    gc.disable()  # plans hold no cycles; a block of records would otherwise cost GC passes
    _bigger_pipe(sys.stdout.fileno())
    try:
        serve(path, partitions, block_bytes, sys.stdout.buffer, sys.stdin.fileno())
    except BrokenPipeError:
        return 1  # the parent went away
    return 0


# -- parent side ----------------------------------------------------------------------------------------------

class DecoderProcess:
    """The parent's handle on one worker: start it, :meth:`ready` (non-blocking), :meth:`begin` at a block,
    then :meth:`next_plan` until it returns None; always :meth:`close` (or use as a context manager)."""

    def __init__(self, path: str | os.PathLike, partitions: int, block_bytes: int = BLOCK_BYTES):
        root = str(Path(__file__).resolve().parent.parent)  # so `-m streams.sources.decode_worker` imports this tree
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.path = str(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.sources.decode_worker", self.path, str(partitions), str(block_bytes),
             str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
            bufsize=0)  # unbuffered: select() on the pipe then tells exactly whether a frame is waiting
        self._decode = msgspec.msgpack.Decoder(Plan).decode
        self._started = False

    def ready(self) -> bool:
        """Whether the worker has said it is ready (or has died: :meth:`begin` then raises)."""
        return bool(select.select([self.proc.stdout], [], [], 0)[0])

    def begin(self, offset: int, first: int) -> None:
        """Start the worker at the block at byte ``offset`` (line number ``first``); waits for it to be ready."""
        kind, _ = self._frame()
        if kind != b"R":
            raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}): expected its ready frame, got {kind!r}")
        self.proc.stdin.write(b"%d %d\n" % (offset, first))
        self.proc.stdin.flush()
        self._started = True

    def claim(self, first: int) -> None:
        """Tell the worker that this process plans the block starting at line ``first`` itself; the worker
        then answers that block with :data:`SKIPPED` (or, when it had started on it already, with its plan).
        A worker that already reached the end of the file has exited: its frames, this block's plan and the
        end frame included, are in the pipe, so the claim has nothing left to tell it (found by CI: a
        BrokenPipeError when the worker outran the parent)."""
        try:
            self.proc.stdin.write(b"%d\n" % first)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def next_plan(self) -> Plan | object | None:
        """The next block's plan, :data:`SKIPPED` for a claimed block, None at the end of the file. Raises
        RuntimeError when the worker failed."""
        kind, payload = self._frame()
        if kind == b"P":
            return self._decode(payload)
        if kind == b"K":
            return SKIPPED
        if kind == b"E":
            return None
        text = payload.decode(errors="replace").strip()
        last = text.splitlines()[-1] if text else f"unknown frame {kind!r}"
        raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}) failed on {self.path}: {last}\n{text}")

    def _read(self, n: int) -> bytes:
        read, parts, left = self.proc.stdout.read, [], n
        while left:
            got = read(left)
            if not got:
                break
            parts.append(got)
            left -= len(got)
        return b"".join(parts)

    def _frame(self) -> tuple[bytes, bytes]:
        head = self._read(_HEAD.size)
        if len(head) < _HEAD.size:
            code = self.proc.wait()
            raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}) exited with code {code} "
                               f"while replaying {self.path}")
        kind, n = _HEAD.unpack(head)
        payload = self._read(n) if n else b""
        if len(payload) < n:  # it died while writing a frame
            code = self.proc.wait()
            raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}) exited with code {code} in the "
                               f"middle of a frame ({len(payload)} of {n} bytes) while replaying {self.path}")
        return kind, payload

    def close(self) -> None:
        """Stop the worker (kill it if it is still running) and reap it."""
        p = self.proc
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        if p.poll() is None:
            p.kill()
        p.wait()

    def __enter__(self) -> DecoderProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the parent's plan stream ------------------------------------------------------------------------------

class NoWorker:
    """Stands in for a :class:`DecoderProcess` when there is none: never ready."""

    def ready(self) -> bool:
        return False

    def __enter__(self) -> NoWorker:
        return self

    def __exit__(self, *exc) -> None:
        pass


def planned_blocks(path: str | os.PathLike, partitions: int, worker: DecoderProcess | NoWorker,
                   block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[list[bytes], Plan]]:
    """``(lines, plan)`` per block of the log, in order: planned here until the worker is ready, then by the
    worker, except blocks this process claims and plans itself while it would otherwise wait for the worker
    (up to :data:`CLAIM_AHEAD` blocks ahead). If the worker saw a block differently (the file changed under
    us), that block and all after it are planned here."""
    router = Router(partitions)

    def local(b):
        lines = split_lines(b.data)
        return lines, plan_block(lines, b.first, router, b.data)

    blocks = iter_blocks(path, size=block_bytes)
    for b in blocks:
        if worker.ready():
            worker.begin(b.offset, b.first)
            yield from _with_worker(worker, chain([b], blocks), local)
            return
        yield local(b)


def _with_worker(worker: DecoderProcess, blocks: Iterator[Block], local) -> Iterator[tuple[list[bytes], Plan]]:
    ahead: deque = deque()  # (block, local plan or None), read from the file, not yet yielded
    owed = 0  # frames the worker still sends for claimed blocks already yielded

    def fallback():  # the worker is out of step with the file (or ended early): plan the rest here
        worker.close()
        for b2, own2 in ahead:
            yield own2 or local(b2)
        for b2 in blocks:
            yield local(b2)

    for b in blocks:
        ahead.append((b, None))
        while ahead:
            b, own = ahead[0]
            if own is not None:
                ahead.popleft()
                owed += 1
                yield own
                continue
            # the worker's block: while its plan is not there, take owed frames that are, and claim blocks
            while True:
                while owed and worker.ready():
                    if worker.next_plan() is None:  # SKIPPED, or a plan made before the claim arrived
                        yield from fallback()
                        return
                    owed -= 1
                if (not owed and worker.ready()) or len(ahead) > CLAIM_AHEAD:
                    break
                nb = next(blocks, None)
                if nb is None:
                    break
                worker.claim(nb.first)
                ahead.append((nb, local(nb)))
            for _ in range(owed):
                if worker.next_plan() is None:
                    yield from fallback()
                    return
            owed = 0
            plan = worker.next_plan()
            if type(plan) is not Plan or plan.first != b.first or plan.nbytes != len(b.data):
                yield from fallback()
                return
            ahead.popleft()
            yield split_lines(b.data), plan


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
