"""Filesystem rules every writer follows: writes are atomic, and nothing a user had is deleted.

A file or folder appears under its final name only once it is complete (temp name + os.replace), so a
run killed with `kill -9` leaves either the old state or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dreambooth.errors import UserError

MANIFEST = "manifest.jsonl"  # beside a folder of images (generate, class images): one JSON line per image


# atomic_file's temporary names (".NAME.<8 hex>.tmp.SUFFIX"): what a writer killed mid-write leaves behind.
PARTIAL_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.\w+)?$")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` in one rename, on failure
    it is removed. The one way a file is written (text, PNGs, plots, checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The real suffix last: writers such as PIL and matplotlib pick the format from it.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as error:
        full = as_disk_full(error, tmp)  # judged before the partial file goes (below) and frees its space
        if full is not error:
            raise full from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


DISK_NEARLY_FULL = 64 * 2**20  # bytes: a write that fails with less than this left is taken for a full disk


def as_disk_full(error: Exception, path: Path) -> Exception:
    """`error`, or, if it is a library's own wording of a full disk (torch's zip writer raises RuntimeError, and
    safetensors its own error) and the disk holding `path` has almost no space left, an OSError(ENOSPC) naming
    `path`: every command turns that one into one line."""
    if isinstance(error, OSError):
        return error
    try:
        free = shutil.disk_usage(next(parent for parent in (path, *path.parents) if parent.exists())).free
    except (OSError, StopIteration):
        return error
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if free < DISK_NEARLY_FULL else error


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the whole new one."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a crash can lose at most this line, never corrupt earlier ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as handle:  # append mode: every write goes to the end, whatever was read
        # A crash may have left a torn last line without its newline: start a new line, so this record
        # is not glued onto the torn one (read_jsonl would skip both).
        size = handle.seek(0, os.SEEK_END)
        torn = False
        if size:
            handle.seek(size - 1)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + json.dumps(record) + "\n").encode("utf-8"))
        handle.flush()


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with these JSON lines in one rename: for files rewritten whole (trials, metric rows)."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines, skipping a torn last line left by a crash."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                records.append(json.loads(line))
    return records


def partial_files(folder: Path) -> list[Path]:
    """The temporary files in `folder` named as files.atomic_file names them (a writer's, or one killed mid-write)."""
    if not folder.is_dir():
        return []
    return [path for path in folder.iterdir()
            if PARTIAL_FILE.match(path.name) and path.is_file() and not path.is_symlink()]


def remove_partial_files(folder: Path) -> int:
    """Remove what writers killed mid-write left in `folder` (only temp names, never anything else); return how many.
    Call it only holding the folder's lock: a live writer's temp files are not left over."""
    partial = partial_files(folder)
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    with removed_on_failure(tmp):
        yield tmp
    replace_dir(tmp, final)


@contextlib.contextmanager
def removed_on_failure(folder: Path) -> Iterator[None]:
    """Remove the partly written `folder` if the block fails (a full disk gets its space back), raising a full disk
    that a library words its own way as ENOSPC (judged before the folder goes)."""
    try:
        yield
    except BaseException as error:
        full = as_disk_full(error, folder) if isinstance(error, Exception) else error
        shutil.rmtree(folder, ignore_errors=True)
        if full is not error:
            raise full from error
        raise


def replace_dir(complete: Path, final: Path) -> None:
    """Give the finished folder `complete` the name `final`, replacing an older `final` if there is one."""
    if final.exists():
        # A folder cannot be os.replace()d onto a non-empty one: swap via a second rename.
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
        os.replace(complete, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, final)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing): for read-modify-write by several processes."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


LOCK_FILE = ".dreambooth.lock"  # in a folder being written (a run, a generation, class images, a sweep): its writer


@contextlib.contextmanager
def folder_lock(root: Path, flag: str = "--output") -> Iterator[None]:
    """Make this process the one writer of the folder `root` (given by `flag`) for the block, or fail in one line
    naming the process that is. An advisory lock (flock) that the system drops when its holder dies, even by
    kill -9: a lock left behind by a dead run (its file still names it) is taken over with a note. The lock file
    goes when the block ends, and a folder created for it goes too if nothing else was written."""
    import fcntl
    import socket

    if root.exists() and not root.is_dir():
        raise UserError(f"{flag} {root}: exists and is not a folder")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILE, "a+")  # writes append: the file is emptied before each one
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{flag} {root}: {owner} is writing it; wait for it to end or pick another {flag}"
                        ) from None
    try:
        handle.seek(0)
        if previous := handle.read().strip():
            print(f"{flag} {root}: {previous} stopped without releasing it; taking over", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        # Removed while still held: a process that opened it meanwhile was refused, one that opens the path
        # now makes a new file. A run refused before writing anything leaves the folder as it found it.
        (root / LOCK_FILE).unlink(missing_ok=True)
        if created and not any(root.iterdir()):
            root.rmdir()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def move_aside(folder: Path, names: list[str]) -> Path | None:
    """Move the named entries of `folder` into `folder/replaced-<time>/`; return that folder if anything moved."""
    present = [name for name in names if (folder / name).exists()]
    if not present:
        return None
    target = folder / time.strftime("replaced-%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "-1")
    target.mkdir(parents=True)
    for name in present:
        os.replace(folder / name, target / name)
    return target
