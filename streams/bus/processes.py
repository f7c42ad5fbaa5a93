"""Local child processes of the stack: free ports, and children that die with their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from typing import Callable

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn`` for children that must not outlive this process (runs between fork and exec).

    SIGKILL, not SIGTERM: a parent that dies without stopping its children has already lost the orderly
    shutdown, and a child's own SIGTERM path may wait on a peer that died too (a trainer flushing to a
    broker that went with the same parent waits forever). Every child resumes from its checkpoint or
    recovery store after a SIGKILL; the chaos tests prove it for each one."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def start_child(cmd: list[str], log_path: str | os.PathLike | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (a terminal's Ctrl-C does not reach it), dying with this process,
    its output appended to ``log_path`` (or discarded)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, preexec_fn=die_with_parent,
                                start_new_session=True)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def wait_ready(ready: Callable[[], bool], proc: subprocess.Popen | None, timeout: float, what: str,
               error: type[Exception] = RuntimeError) -> None:
    """Poll ``ready()`` until it is true; ``error`` naming ``what`` if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise error(f"{what} exited with code {proc.returncode} while starting")
        if ready():
            return
        time.sleep(0.05)
    raise error(f"{what} did not answer within {timeout:.0f}s")


def stop_child(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
