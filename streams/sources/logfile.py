"""Event logs on disk: one record per line (JSONL), written by ``streamrec generate --out`` and read by
``streamrec replay``.

A good record is the JSON that :func:`streams.schema.encode` produces (with its ``type`` tag); a malformed
record (:class:`BadRecord`) is written as its raw bytes with line breaks escaped, so one record always stays
one line. Other formats (Parquet, public datasets) live in :mod:`streams.sources.formats`.

>>> import tempfile, os
>>> from streams.schema import Watermark
>>> path = os.path.join(tempfile.mkdtemp(), "log.jsonl")
>>> write_jsonl(path, [Watermark(ts=1_767_225_600_000), BadRecord("impression", b"{oops\\n", "truncated")])
2
>>> list(iter_jsonl(path))
[(1, b'{"type":"watermark","ts":1767225600000,"source":"replay"}'), (2, b'{oops\\\\n')]
>>> count_lines(path)
2
"""

from __future__ import annotations

import os
from typing import BinaryIO, Iterable, Iterator, Literal, NamedTuple

import msgspec

from streams import schema

TopicKind = Literal["impression", "click", "conversion"]

# A line longer than this is cut (and will fail to decode) instead of being read whole into memory.
MAX_LINE_BYTES = 16 * 1024 * 1024


class BadRecord(msgspec.Struct, frozen=True):
    """A deliberately malformed record: ``raw`` bytes meant for the topic of ``topic_kind``.

    ``kind`` names the defect (``"truncated_json"``, ``"unknown_domain"``, ...); ``schema.decode(raw)`` must
    return :class:`streams.schema.Invalid` for every bad record.
    """

    topic_kind: TopicKind
    raw: bytes
    kind: str


def escape_line(raw: bytes) -> bytes:
    """``raw`` with CR/LF escaped so it fits on one line (the result is still bad input)."""
    return raw.replace(b"\r", b"\\r").replace(b"\n", b"\\n")


def encode_line(rec: msgspec.Struct) -> bytes:
    """One log line (without the trailing newline) for an event, watermark or :class:`BadRecord`."""
    if isinstance(rec, BadRecord):
        return escape_line(rec.raw)
    return schema.encode(rec)  # msgspec escapes control characters inside strings: never a raw newline


def write_jsonl(path: str | os.PathLike, records: Iterable[msgspec.Struct]) -> int:
    """Write ``records`` one per line; returns the number of lines written."""
    n = 0
    with open(path, "wb") as f:
        buf: list[bytes] = []
        for rec in records:
            buf.append(encode_line(rec))
            n += 1
            if len(buf) >= 4096:
                f.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            f.write(b"\n".join(buf) + b"\n")
    return n


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Stream ``(line_no, raw)`` pairs (1-based line numbers, line break removed); blank lines are skipped.

    The file is read line by line, never whole; a line over :data:`MAX_LINE_BYTES` yields its first
    ``MAX_LINE_BYTES`` bytes (which cannot decode) and the rest of it is skipped.
    """
    with open(path, "rb") as f:
        n = 0
        while True:
            line = f.readline(MAX_LINE_BYTES)
            if not line:
                return
            n += 1
            if not line.endswith(b"\n") and len(line) >= MAX_LINE_BYTES:
                while True:  # drain the rest of an oversized line
                    rest = f.readline(MAX_LINE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
            raw = line.rstrip(b"\r\n")
            if raw.strip():
                yield n, raw


def iter_jsonl_chunks(path: str | os.PathLike, chunk: int = 1 << 20) -> Iterator[tuple[int, list[bytes]]]:
    """Stream ``(first_line_no, lines)`` in blocks of about ``chunk`` bytes: the same lines as
    :func:`iter_jsonl` (blank ones included, so numbering is positional; CR stripped), without a Python call
    per line. A line over :data:`MAX_LINE_BYTES` is cut to its first ``MAX_LINE_BYTES`` bytes.
    """
    carry, skipping, n = b"", False, 1
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if skipping:  # inside an oversized line: drop up to its end
                cut = block.find(b"\n")
                if cut < 0:
                    continue
                block, skipping = block[cut + 1:], False
            lines = (carry + block).split(b"\n")
            carry = lines.pop()
            if len(carry) > MAX_LINE_BYTES:
                lines.append(carry[:MAX_LINE_BYTES])
                carry, skipping = b"", True
            if lines:
                if b"\r" in block:
                    lines = [x.rstrip(b"\r") for x in lines]
                yield n, lines
                n += len(lines)
        if carry:
            yield n, [carry.rstrip(b"\r")]


class Block(NamedTuple):
    """Whole lines of a file: ``data`` (without its last line break) starts at byte ``offset`` with line
    number ``first``; the next block starts at ``end``."""

    first: int
    offset: int
    data: bytes
    end: int


def iter_blocks(path: str | os.PathLike, offset: int = 0, first: int = 1, size: int = 1 << 20) -> Iterator[Block]:
    """Blocks of about ``size`` bytes of whole lines, from byte ``offset`` (a line start, numbered ``first``).

    Each block depends only on the file and its own offset, so two readers starting at the same block read
    the same blocks (the replay's parent and its decoder worker do). The lines are those of
    :func:`iter_jsonl_chunks`: a line over :data:`MAX_LINE_BYTES` is cut to that length (the rest skipped).
    """
    with open(path, "rb") as f:
        while True:
            f.seek(offset)
            buf = f.read(size)
            if not buf:
                return
            cut = buf.rfind(b"\n")
            if cut >= 0:
                data, end = buf[:cut], offset + cut + 1
            elif len(buf) < size:  # the last line, without a line break
                data, end = buf, offset + len(buf)
            else:  # one line longer than a block
                data, end = _long_line(f, buf, offset)
            yield Block(first, offset, data, end)
            first += data.count(b"\n") + 1
            offset = end


def _long_line(f: BinaryIO, buf: bytes, offset: int) -> tuple[bytes, int]:
    """A line starting at ``offset`` whose first ``len(buf)`` bytes are ``buf`` and hold no line break: the
    line (cut to MAX_LINE_BYTES) and where the next line starts."""
    parts, n = [buf], len(buf)
    while n <= MAX_LINE_BYTES:
        more = f.read(min(1 << 20, MAX_LINE_BYTES + 1 - n))
        cut = more.find(b"\n")
        if cut >= 0:
            parts.append(more[:cut])
            return b"".join(parts), offset + n + cut + 1
        if not more:
            return b"".join(parts), offset + n
        parts.append(more)
        n += len(more)
    line = b"".join(parts)[:MAX_LINE_BYTES]
    while more := f.read(1 << 20):  # drop the rest of the oversized line
        cut = more.find(b"\n")
        n += len(more)
        if cut >= 0:
            return line, offset + n - len(more) + cut + 1
    return line, offset + n


def count_lines(path: str | os.PathLike, chunk: int = 1 << 20) -> int:
    """Number of lines in a text file (a last line without a newline counts), read in 1 MiB chunks."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(chunk):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
