"""One trainer per run directory: an exclusive lock that a launch holds for its run's life.

    with RunLock() as lock:
        ... checks that write nothing ...
        lock.acquire(run_dir)      # global rank 0 takes it; a second trainer stops here with one error line
        ... the run ...
    # released however the block ends: the lock file removed, and the directories acquire() created
    # removed again while they are empty (a failed start leaves --out as it was)

The lock is flock(2) on RUN/.lock (`sharnn.io.rundir.LOCK_NAME`); the file names its holder: host, pid, the
time it took the lock, its command line. A second trainer on the same run directory is refused with
`error: --out RUN is in use by another trainer (host H, pid P, started T) ...`.

Why it is built this way:
- A lock, not a pid file: the kernel releases a flock when the process holding it ends, SIGKILL and a crash
  included, so a killed run never blocks its own resume; the file it leaves is simply taken over. A pid file
  outlives its process and its pid is reused.
- flock, not fcntl/lockf: a POSIX lock belongs to the process and is dropped when the process closes *any*
  descriptor of the file; a flock belongs to the one open file. On NFS, Linux emulates flock with a
  whole-file POSIX lock that the server arbitrates between machines, so the holder never opens the file a
  second time (that would drop it there): it writes its record through the descriptor it locked.
- Taken before anything reads the run directory (which checkpoint `--resume auto` continues, whether an
  earlier run is there): a trainer that checked first and locked afterwards could act on files the previous
  holder was still writing, or replace a run that ended in between.
- Inside the run directory, so the lock is about that run and nothing is written beside it. acquire()
  therefore creates --out when it is missing; these are the only things written before the start has
  succeeded, and release() removes them when the start fails.
- The launch holds it, not each process: only global rank 0 (RANK, which torchrun and `accelerate launch`
  set, or MPI's rank variables; 0 for a single process) takes it, before the process group exists, on a
  filesystem all nodes share (a multi-node run needs one for its checkpoints anyway). When rank 0 is refused
  it exits at once and the launcher ends the launch's other processes (torchrun stops the other workers of a
  launch when one fails; other nodes lose the rendezvous store and fail with it), so no rank waits for a
  process group that will never form (tests/integration/test_lock.py: two nodes end long before
  --timeout_s). The other ranks read the run directory without the lock, at the moment rank 0 takes it: one
  that read the checkpoints while a trainer ending just then still wrote them could resume from another
  checkpoint than rank 0, which the trainer's check that every rank starts from the same weights
  (check_same_weights in train/distributed.py) refuses.
- Forked children close their copy of the descriptor (os.register_at_fork), so a child outliving a killed
  trainer does not keep the run locked; programs the trainer runs never get it (close-on-exec).
- Removed at release while still locked. A trainer that opened the old file locks an unlinked file, so after
  locking it checks that RUN/.lock is still the file it locked, and starts again if not.
- A filesystem that refuses flock (some Lustre mounts without `-o flock`): a warning, and the run goes on
  without the lock. Where locks are kept per machine (Lustre's `localflock`, NFS mounted `nolock`) two
  trainers on different machines are not refused.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from sharnn.io.rundir import LOCK_NAME
from sharnn.io.signals import process_running

_HELD: set[int] = set()
"""Descriptors of the locks this process holds: closed in forked children."""


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""flock's errors on a filesystem that does not support it."""


RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
"""Where launchers put a process's global rank: torchrun / `accelerate launch`, then MPI's (the variables
accelerate reads, accelerate/utils/environment.py)."""


def launch_rank() -> int:
    """This process's global rank as its launcher set it; 0 when launched alone."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


class RunLock:
    """The run directory's lock (see the module docstring). Use as a context manager: `acquire` inside."""

    def __init__(self):
        self.path: Path | None = None
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, run_dir: str | Path, rank: int | None = None) -> None:
        """Take the lock of `run_dir` on global rank 0 (other ranks: nothing); SystemExit naming the holder
        when another trainer holds it."""
        if (launch_rank() if rank is None else rank) != 0 or self.held:
            return
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        for _ in range(100):  # each round: the file was removed or replaced between our open and our lock
            self._make_dirs(run_dir)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # the directory was removed by a trainer whose start failed
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise SystemExit(in_use(run_dir, holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in NO_FLOCK:
                    raise
                print(f"warning: --out {run_dir}: this filesystem does not support file locks "
                      f"({e.strerror}): a second trainer started on this run directory would not be refused",
                      file=sys.stderr)
                return
            if _same_file(fd, path):
                break
            os.close(fd)
        else:
            raise SystemExit(f"error: --out {run_dir}: could not take the run directory's lock {path}: it "
                             "keeps being replaced (another trainer starting and failing in a loop?)")
        self.path, self.fd = path, fd
        _HELD.add(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file and unlock; remove the directories `acquire` created if they are empty."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # still locked: see the module docstring
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
        for directory in reversed(self.created):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only while empty: the run wrote nothing
        self.created = []

    def _make_dirs(self, run_dir: Path) -> None:
        missing = [p for p in (run_dir.absolute(), *run_dir.absolute().parents) if not p.exists()]
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
                self.created.append(directory)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int, wait_s: float = 2.0) -> dict | None:
    """The holder's record, read through our own descriptor; None if it has not written a readable one
    within `wait_s` (it writes it right after locking)."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(os.pread(fd, 65536, 0).decode())
            if isinstance(record, dict):
                return record
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def in_use(run_dir: Path, holder: dict | None) -> str:
    """The error line of a trainer refused because `holder` (its record, or None) holds `run_dir`."""
    if holder is None:
        who = "a process that has not recorded itself"
    else:
        pid = holder.get("pid")
        who = f"host {holder.get('host', '?')}, pid {pid}, started {holder.get('started', '?')}"
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_running(pid):
            who += ("; that process has ended, but a process it started still holds the lock: find it with "
                    f"`fuser {run_dir / LOCK_NAME}`")
    return (f"error: --out {run_dir} is in use by another trainer ({who}); two trainers would mix one run. "
            "Wait for it to end or stop it, or choose another --out")
