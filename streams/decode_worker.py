"""A decoder process for ``streamrec replay``: it reads the log itself and sends one
:class:`~streams.lineplan.Plan` per block, so the replaying process only slices lines and produces.

Why a process of its own, started with ``python -m`` rather than ``multiprocessing``: the parent holds
librdkafka threads (fork is unsafe), and ``spawn``/``forkserver`` would re-import the parent's ``__main__``
(the whole CLI). This module imports only msgspec and the schema, so the worker is ready in ~0.1 s.

Protocol (frames ``kind:1 byte, length:4 bytes LE, payload`` on the worker's stdout):

    worker -> "R" (ready)       parent -> "OFFSET FIRST_LINE\\n" on stdin (where to start; EOF = stop)
    worker -> "P" msgpack Plan, one per :func:`streams.logfile.iter_blocks` block, in order
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
from pathlib import Path

import msgspec

from streams.lineplan import Plan, Router, plan_block, split_lines
from streams.logfile import iter_blocks

BLOCK_BYTES = 1 << 20
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


def serve(path: str, partitions: int, block_bytes: int, out, inp) -> None:
    """The worker's loop: announce readiness, read where to start, send a plan per block, then "E"."""
    write = out.write

    def frame(kind: bytes, payload: bytes = b"") -> None:
        write(_HEAD.pack(kind, len(payload)))
        write(payload)
        out.flush()

    frame(b"R")
    start = inp.readline()
    if not start:
        return  # the parent finished the log itself
    offset, first = map(int, start.split())
    router, encode = Router(partitions), msgspec.msgpack.Encoder().encode
    try:
        for b in iter_blocks(path, offset, first, block_bytes):
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
        serve(path, partitions, block_bytes, sys.stdout.buffer, sys.stdin.buffer)
    except BrokenPipeError:
        return 1  # the parent went away
    return 0


# -- parent side ----------------------------------------------------------------------------------------------

class DecoderProcess:
    """The parent's handle on one worker: start it, :meth:`ready` (non-blocking), :meth:`begin` at a block,
    then :meth:`next_plan` until it returns None; always :meth:`close` (or use as a context manager)."""

    def __init__(self, path: str | os.PathLike, partitions: int, block_bytes: int = BLOCK_BYTES):
        root = str(Path(__file__).resolve().parent.parent)  # so `-m streams.decode_worker` imports this tree
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.path = str(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.decode_worker", self.path, str(partitions), str(block_bytes),
             str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
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

    def next_plan(self) -> Plan | None:
        """The next block's plan; None at the end of the file. Raises RuntimeError when the worker failed."""
        kind, payload = self._frame()
        if kind == b"P":
            return self._decode(payload)
        if kind == b"E":
            return None
        text = payload.decode(errors="replace").strip()
        last = text.splitlines()[-1] if text else f"unknown frame {kind!r}"
        raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}) failed on {self.path}: {last}\n{text}")

    def _frame(self) -> tuple[bytes, bytes]:
        read = self.proc.stdout.read
        head = read(_HEAD.size)
        if len(head) < _HEAD.size:
            code = self.proc.wait()
            raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}) exited with code {code} "
                               f"while replaying {self.path}")
        kind, n = _HEAD.unpack(head)
        payload = read(n) if n else b""
        if len(payload) < n:
            raise RuntimeError(f"replay decoder worker (pid {self.proc.pid}): frame cut short "
                               f"({len(payload)} of {n} bytes)")
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
