"""What every command does when it is interrupted, and what an interrupted writer leaves behind.

    @command  (on each console entry point's `main(argv) -> int`)
        SIGTERM raises KeyboardInterrupt, as Ctrl-C (SIGINT) does, so a `kill`, a scheduler's preemption or
        a container's stop runs the same cleanup as Ctrl-C: `finally` blocks run and sharnn.io.atomic removes
        its temporaries. A KeyboardInterrupt that reaches `main` becomes one line on stderr and the exit
        status 130 (SIGINT) or 143 (SIGTERM), not a traceback.
    sweep_stale_temporaries(out)
        removes the temporaries of `out` (hidden siblings `.NAME.tmp-...`) whose writer is gone, so that what
        a SIGKILL (or a power cut) left does not stay for ever. Only temporaries named with `temporary_name`
        (the writer's pid and host) are judged: a temporary of a live writer, of a writer on another machine
        (a shared filesystem), or of unknown origin is left alone.
    read_head(path, n_bytes)
        the first n_bytes of a file, pipe, FIFO or device, never reading more, and interruptible while it
        waits for input (see its docstring).

Signal handlers can only be set in the main thread: elsewhere `command` changes no handler. A handler another
part of the command installs later (the trainer's StopSignal, which turns SIGTERM into a clean stop with a
checkpoint) stays: `command` puts its predecessor back only if its own handler is still the one installed. A
second SIGTERM while the first one's cleanup runs is ignored (a scheduler sends SIGKILL when its grace time
is over); a second Ctrl-C interrupts the cleanup as Python's always does.

Only stdlib is imported here, so a command can use it before its heavy imports.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
"""A temporary sibling of NAME is `.NAME.tmp-...` (sharnn.io.atomic)."""


def read_head(path: str | Path, n_bytes: int, chunk: int = 1 << 20) -> bytes:
    """The first `n_bytes` of a file, pipe, FIFO or device, read in pieces: never more than is used (an
    endless input such as /dev/urandom or a pipe left open is read only that far).

    Before each read it waits for input in slices of 0.2 s. A signal that arrives just before a blocking
    read() is handled by the C handler at once, but its Python handler (`command`'s KeyboardInterrupt) runs
    only between bytecodes, and read() itself is not interrupted: a reader waiting on a quiet FIFO would
    ignore SIGTERM until input came. Waking every 0.2 s runs the pending handler."""
    pieces, total = [], 0
    with open(path, "rb", buffering=0) as f:
        while total < n_bytes:
            while not select.select([f], [], [], 0.2)[0]:
                pass
            piece = f.read(min(chunk, n_bytes - total))
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
    return b"".join(pieces)


class _TermAsInterrupt:
    """The SIGTERM handler of `command`: KeyboardInterrupt at the first SIGTERM, nothing at later ones."""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        if not self.received:
            self.received = True
            raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[_TermAsInterrupt]:
    """Within the block, SIGTERM raises KeyboardInterrupt (once); afterwards the previous handler is back
    unless something else replaced ours meanwhile. `received` tells whether SIGTERM came."""
    handler = _TermAsInterrupt()
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a console entry point: SIGTERM as Ctrl-C while it runs, and an interruption that reaches it
    as one line and exit status 128 + the signal's number."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        with terminate_as_interrupt() as term:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                return interrupted(signal.SIGTERM if term.received else signal.SIGINT)

    return wrapper


def interrupted(signum: int) -> int:
    """Say that the command was interrupted (one line on stderr); the exit status to return."""
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    print(f"error: interrupted by {name} before the command finished", file=sys.stderr)
    return 128 + signum


# ---------------------------------------------------------------------------- temporaries of the killed
HOST = socket.gethostname()


def temporary_name(out: str | Path, pid: int | None = None) -> str:
    """`.NAME.tmp-PID@HOST`: the name of a temporary sibling of `out` written by this process that
    `sweep_stale_temporaries` can judge; a directory's: this name + "@" as `tempfile.mkdtemp`'s prefix (a
    hostname holds no "@", so the name splits back unambiguously)."""
    return f".{Path(out).name}{TMP_MARK}{os.getpid() if pid is None else pid}@{HOST}"


def _writer(tmp_name: str, out_name: str) -> tuple[int, str] | None:
    """(pid, host) of the writer of the temporary `tmp_name` of `out_name`; None if its name does not say."""
    prefix = f".{out_name}{TMP_MARK}"
    if not tmp_name.startswith(prefix):
        return None
    pid, at, rest = tmp_name[len(prefix):].partition("@")
    if not (at and pid.isdigit() and rest):
        return None
    return int(pid), rest.split("@")[0]


def process_running(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of `out` whose writer (named in the temporary's name) was a process of
    this machine that no longer runs; return what was removed. A recycled pid keeps a temporary until the
    next sweep after that process ends."""
    out = Path(out)
    parent = out.parent
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        writer = _writer(entry.name, out.name)
        if writer is None or writer[1] != HOST or writer[0] == os.getpid() or process_running(writer[0]):
            continue
        path = parent / entry.name
        with contextlib.suppress(OSError):  # best effort: another sweep may be removing it too
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed
