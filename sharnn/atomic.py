"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

    write_text(path, text) / write_bytes(path, data) / write_json(path, obj)
        written to a temporary sibling `.NAME.tmp-PID`, then `os.replace`d onto `path`
    with build_dir(out) as tmp: ...
        a directory built under a temporary sibling `.NAME.tmp-XXXX` and renamed to `out` when the block ends
        without an exception (a previous `out` is replaced, and put back if the rename fails)
    with staging_dir(out) as tmp: ... replace_dir(tmp, out) ...
        the same with the rename left to the caller (who may decide to keep nothing), which `replace_dir`
        also does for directories staged elsewhere (checkpoints: every rank writes into `.tmp-step-N`,
        the main process renames it)

    cannot_write_into(directory)
        why files cannot be created in `directory` (created first if missing), or None: checked before any
        work, so that a command fails at once rather than after its work

A failure, Ctrl-C included, leaves the target as it was and removes the temporary sibling. Readers that list a
directory should skip names starting with "." (temporary siblings are hidden). `apply_umask` gives files and
directories the modes a plain `open`/`mkdir` would have (safetensors and mkdtemp make them private).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary sibling, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
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
def staging_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` (with the umask's modes), removed when the block ends: to
    keep what was built, call `replace_dir(tmp, out)` inside the block. Parent directories created for `out`
    are removed again if they stayed empty."""
    out = Path(out)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the output gets the modes of a plain mkdir
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace_dir
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only succeeds while empty, i.e. when nothing was written


@contextlib.contextmanager
def build_dir(out: str | Path) -> Iterator[Path]:
    """`staging_dir` that renames the temporary directory to `out` when the block ends without an exception;
    on an exception it is removed and `out` is left as it was."""
    with staging_dir(out) as tmp:
        yield tmp
        replace_dir(tmp, out)
