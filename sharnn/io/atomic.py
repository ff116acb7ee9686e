"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

    write_text(path, text) / write_bytes(path, data) / write_json(path, obj)
        written to a temporary sibling `.NAME.tmp-PID@HOST`, then `os.replace`d onto `path`
    with build_dir(out) as tmp: ...
        a directory built under a temporary sibling `.NAME.tmp-PID@HOST@XXXX` and renamed to `out` when the
        block ends without an exception (a previous `out` is replaced, and put back if the rename fails)
    with staging_dir(out) as tmp: ... replace_dir(tmp, out) ...
        the same with the rename left to the caller (who may decide to keep nothing), which `replace_dir`
        also does for directories staged elsewhere (checkpoints: every rank writes into `.tmp-step-N`,
        the main process renames it)

    cannot_write_into(directory)
        why files cannot be created in `directory` (created first if missing), or None: checked before any
        work, so that a command fails at once rather than after its work
    check_output(path, option, kind=..., what=..., is_ours=..., inputs=...)
        the one rule for every path a user names for a command to write (below), checked before any work

A failure, Ctrl-C included, leaves the target as it was and removes the temporary sibling; what a killed
writer left (SIGKILL, a power cut) is removed by the next write of the same target once the process named in
it has ended (sharnn.io.signals.sweep_stale_temporaries). Readers that list a directory should skip names
starting with "." (temporary siblings are hidden). `apply_umask` gives files and directories the modes a
plain `open`/`mkdir` would have (safetensors and mkdtemp make them private).

The output rule (`check_output`): a command writes its output under a temporary sibling and renames it onto
the path the user named, so whatever is at that path is replaced. It may replace only what the same command
wrote there before (`is_ours`: e.g. a previous attention report, recognised by the marker in its
report.json), or an empty directory / an empty file. Refused whatever exists: a directory holding anything
else, a file of other content, a symbolic link, anything that is not a regular file; and always `/`, a mount
point, the current directory, the home directory (or a directory holding either), and a path that is, lies
inside or holds one of the command's inputs (the corpus, the model's run directory, the text read).

A full disk (`DiskFull`, an OSError): the writers here turn "no space left" into one message naming the
filesystem, its free space and the space needed; the temporary sibling is removed as for any failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sharnn.io.signals import sweep_stale_temporaries, temporary_name


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary sibling, then os.replace). A full disk raises
    `DiskFull` (the temporary sibling removed, `path` as it was)."""
    path = Path(path)
    sweep_stale_temporaries(path)  # what a killed writer of `path` left
    tmp = path.with_name(temporary_name(path))  # .NAME.tmp-PID@HOST
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        if out_of_space(e, path.parent):
            tmp.unlink(missing_ok=True)  # first: the message tells the space free without it
            raise disk_full(path, need=len(data)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Write `obj` as JSON, with a final newline, to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def cannot_write_into(directory: str | Path) -> str | None:
    """Why files cannot be created in `directory` (created, with its parents, if missing), or None.

    Looks at the nearest existing ancestor and writes nothing. `os.access` answers for this process: as root
    it reports only a read-only filesystem, which is all that stops root."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"directory {existing} is not writable"
    return None


class OutputRefused(ValueError):
    """A path a command must not write to (see `check_output`); the message names the option, the problem
    and the fix, without the "error: " a command's line starts with."""


def holds_only(names: Iterable[str]) -> Callable[[Path], bool]:
    """`is_ours` for a directory output: it holds nothing but `names` (plain files)."""
    allowed = frozenset(names)
    return lambda directory: all(p.name in allowed and p.is_file() and not p.is_symlink()
                                 for p in directory.iterdir())


def json_with_keys(*keys: str, max_bytes: int = 1 << 26) -> Callable[[Path], bool]:
    """`is_ours` for a JSON file output: a JSON object holding every key in `keys`, or a list of such
    objects (what a command's records look like); larger than `max_bytes`, never ours."""
    def check(path: Path) -> bool:
        if path.stat().st_size > max_bytes:
            return False
        record = json.loads(path.read_bytes())
        records = record if isinstance(record, list) and record else [record]
        return all(isinstance(r, dict) and all(k in r for k in keys) for r in records)
    return check


def _ours(is_ours: Callable[[Path], bool] | None, path: Path) -> bool:
    if is_ours is None:
        return False
    try:
        return bool(is_ours(path))
    except (OSError, ValueError, UnicodeDecodeError):  # unreadable or not what the command writes
        return False


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _places() -> list[tuple[str, Path]]:
    """The directories no output may replace or hold: the current directory and the home directory."""
    places = []
    with contextlib.suppress(OSError):
        places.append(("the current directory", Path(os.getcwd()).resolve()))
    with contextlib.suppress(RuntimeError, OSError, KeyError):
        places.append(("the home directory", Path.home().resolve()))
    return places


def check_output(path: str | Path, option: str, *, kind: str = "dir", what: str = "output",
                 is_ours: Callable[[Path], bool] | None = None,
                 inputs: Iterable[tuple[str, str | Path | None]] = (), overwrite: bool = True) -> Path:
    """The rule for a path the user named for a command to write (`option`, e.g. "--attention_report"),
    checked before any work: `OutputRefused` saying why and what to do, or the path.

    `kind`: "dir" or "file" (what the command renames onto `path`). An existing `path` is accepted only when
    it is an empty directory (kind "dir"), an empty regular file (kind "file") or what `is_ours(path)` says
    this command wrote before (its `what`, e.g. "attention report"; with overwrite=False that too is
    refused: the command has an --overwrite flag). Always refused: a symbolic link, a device, pipe or
    socket, the root directory, a mount point, the current or home directory or a directory holding either,
    and a path equal to, inside, or holding one of `inputs` ((label, path) pairs: what the command reads,
    e.g. ("corpus (--data)", args.data); None paths are skipped). Last, the parent must be writable."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = Path(path)
    where = f"{option} {path}"
    if path.is_symlink():
        raise OutputRefused(f"{where} is a symbolic link (to {os.readlink(path)}): the {what} would replace "
                            "the link, not what it points to; name the real path or a new one")
    resolved = _resolved(path)
    if resolved == Path(resolved.anchor):
        raise OutputRefused(f"{where} is the root directory; name a new {_noun(kind)} for the {what}")
    for label, place in _places():
        if resolved == place or place.is_relative_to(resolved):
            holds = "is" if resolved == place else "holds"
            raise OutputRefused(f"{where} {holds} {label} ({place}), which writing the {what} would replace; "
                                f"name a new {_noun(kind)} for it, e.g. {path / _example(kind)}")
    if resolved.exists() and os.path.ismount(resolved):
        raise OutputRefused(f"{where} is a mount point (the top of a filesystem), which cannot be replaced; "
                            f"name a new {_noun(kind)} inside it, e.g. {path / _example(kind)}")
    inputs = [(label, given, _resolved(given)) for label, given in inputs if given is not None]
    for label, given, source in inputs:  # the most precise reason first: is, then holds, then lies in
        if resolved == source:
            raise OutputRefused(f"{where} is the {label} the command reads; writing the {what} there would "
                                f"destroy it: name another {_noun(kind)}")
    for label, given, source in inputs:
        if source.is_relative_to(resolved):
            raise OutputRefused(f"{where} holds the {label} {given}, which writing the {what} would "
                                f"destroy; name another {_noun(kind)}")
    for label, given, source in inputs:
        if resolved.is_relative_to(source):
            raise OutputRefused(f"{where} lies inside the {label} {given}; write the {what} outside it")
    if os.path.lexists(path):
        mode = path.lstat().st_mode
        if kind == "dir":
            if not stat.S_ISDIR(mode):
                raise OutputRefused(f"{where} is a file, not a directory; name a new directory for the "
                                    f"{what} (it is created)")
            present = sorted(p.name for p in path.iterdir())
            if present and not _ours(is_ours, path):
                shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
                raise OutputRefused(f"{where} already exists and holds what is not {_a(what)} ({shown}); "
                                    f"refusing to replace it: name a new directory, or remove it yourself")
        else:
            if stat.S_ISDIR(mode):
                raise OutputRefused(f"{where} is a directory; name a file for the {what}")
            if not stat.S_ISREG(mode):
                raise OutputRefused(f"{where} is not a regular file (a device, pipe or socket), which the "
                                    f"{what} would replace; name a regular file")
            present = ["x"] if path.stat().st_size else []
            if present and not _ours(is_ours, path):
                raise OutputRefused(f"{where} already exists and is not {_a(what)}; refusing to replace it: "
                                    "name a new file, or remove it yourself")
        if present and not overwrite:
            raise OutputRefused(f"{where} holds an earlier {what}; pass --overwrite to replace it, or name "
                                f"a new {_noun(kind)}")
    if problem := cannot_write_into(resolved.parent):
        raise OutputRefused(f"{where}: cannot write there ({problem}); choose another path")
    return path


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def _noun(kind: str) -> str:
    return "directory" if kind == "dir" else "file"


def _example(kind: str) -> str:
    return "new-dir" if kind == "dir" else "out.json"


# ------------------------------------------------------------------------------------------- full disks
class DiskFull(OSError):
    """No space left for an output: the message names the filesystem, its free space and the space needed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _existing(path: str | Path) -> Path:
    path = _resolved(path)
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes this process may still write on the filesystem holding `path` (or its nearest existing
    ancestor)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing ancestor)."""
    path = _existing(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def tree_bytes(path: str | Path) -> int:
    """Bytes held by the files under `path` (a file: its size); links not followed, missing: 0."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if os.path.lexists(path) else 0
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def size_text(n: int) -> str:
    """Bytes for a message: 1.2 GB, 340 MB, 12 kB, 17 bytes (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.{1 if n < 100 * scale else 0}f} {unit}"
    return f"{n} bytes"


NEARLY_FULL_BYTES = 16 << 20
"""A writer's error with no errno (torch's zip writer: 'unexpected pos', 'file write failed',
'basic_ios::clear: iostream error') counts as a full disk when less than this is free where it wrote."""
WRITER_FAILURES = ("unexpected pos", "file write failed", "iostream error")


def out_of_space(e: BaseException, where: str | Path | None = None) -> bool:
    """Whether `e` (or an exception it was raised from) is a write that failed for lack of space: ENOSPC or
    EDQUOT, safetensors' "No space left" / "os error 28", or torch's zip writer failing (no errno) with less
    than NEARLY_FULL_BYTES free at `where` (measured while the failed write's temporary is still there)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        if where is not None and any(failure in text for failure in WRITER_FAILURES):
            with contextlib.suppress(OSError):
                if free_bytes(where) < NEARLY_FULL_BYTES:
                    return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(path: str | Path, need: int | None = None, written: int | None = None,
              what: str | None = None) -> DiskFull:
    """The DiskFull for writing `path` (`what` it is): the filesystem and its free space, and the space
    `need`ed (or, not known, more than the bytes `written` before the disk filled)."""
    disk = f"the disk holding {path}"
    with contextlib.suppress(OSError):
        disk += f" (the filesystem mounted at {mount_point(path)}, {size_text(free_bytes(path))} free)"
    needs = (f"needs {size_text(need)}" if need is not None else
             f"needs more than the {size_text(written)} written before the disk filled" if written else
             "needs more space")
    return DiskFull(f"no space left on {disk}: {what or 'writing it'} {needs}; nothing was left "
                    "half-written. Free space there, or write to another disk")


def require_space(path: str | Path, need: int, what: str | None = None) -> None:
    """DiskFull (before anything is written) when the filesystem holding `path` has less than `need` bytes
    free."""
    with contextlib.suppress(OSError):
        if free_bytes(path) < need:
            raise disk_full(path, need=need, what=what)


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(directory: str | Path) -> None:
    """Give `directory` and the files directly in it the modes a plain mkdir/open would: safetensors writes
    its files 0600 and mkdtemp makes its directory private; an output should be as shareable as any file."""
    directory = Path(directory)
    mask = umask()
    directory.chmod(0o777 & ~mask)
    for p in directory.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Rename the finished directory `tmp` to `out`. A previous `out` is replaced; if the rename fails, it is
    put back (even on Ctrl-C) and `tmp` is left for the caller to remove."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(out: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` (with the umask's modes), removed when the block ends: to
    keep what was built, call `replace_dir(tmp, out)` inside the block. Parent directories created for `out`
    are removed again if they stayed empty. A full disk in the block raises `DiskFull` (naming `need`, the
    bytes the output needs, when the caller knows them)."""
    out = Path(out)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out)  # what a killed writer of `out` left (its pid and host in the name)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_name(out) + "@", dir=out.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the output gets the modes of a plain mkdir
    try:
        yield tmp
    except Exception as e:
        if out_of_space(e, tmp) and not isinstance(e, DiskFull):  # judged before the cleanup frees space
            written = tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # first: the message tells the space free without it
            raise disk_full(out, need=need, written=written) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace_dir
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only succeeds while empty, i.e. when nothing was written


@contextlib.contextmanager
def build_dir(out: str | Path, need: int | None = None) -> Iterator[Path]:
    """`staging_dir` that renames the temporary directory to `out` when the block ends without an exception;
    on an exception it is removed and `out` is left as it was."""
    with staging_dir(out, need) as tmp:
        yield tmp
        replace_dir(tmp, out)
