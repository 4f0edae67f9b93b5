"""Atomic publication of files and folders: a reader sees the old version or the new, never a mix."""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PUBLISH_ATTEMPTS = 20


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (no-op where the OS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success fsync it and os.replace it onto ``path``.

    A reader sees the old file or the new one, never a partial one; on error the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def check_writable(target: str | Path) -> None:
    """Raise now the OSError (no permission, read-only file system) that writing ``target``'s hidden
    siblings would meet at the end of a long run: makes the parent folders, creates and removes
    an empty probe file next to ``target``."""
    parent = Path(target).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{Path(target).name}.probe-", dir=parent)
    os.close(fd)
    os.unlink(name)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def publish_dir(staging: Path, final: Path, overwrite: bool = False) -> None:
    """Move a finished ``staging`` folder to ``final`` in one rename.

    With ``overwrite``, an existing ``final`` is first renamed aside and removed only after the new
    one is in place, so a crash leaves either version complete (the aside copy is named
    ``.<name>.old-*``; between the two renames ``final`` is briefly absent, never partial). Asides
    left by such a crash are removed by the next successful publication. Another writer publishing
    the same ``final`` at the same time is retried: the last one wins. Without ``overwrite`` an
    existing ``final`` is an error and nothing changes.
    """
    staging, final = Path(staging), Path(final)
    fsync_dir(staging)
    for _ in range(PUBLISH_ATTEMPTS):
        aside = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists; pass overwrite to replace it")
            aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, aside)
            except FileNotFoundError:  # another writer moved it first
                continue
        try:
            os.rename(staging, final)
        except OSError as err:
            raced = err.errno in (errno.ENOTEMPTY, errno.EEXIST)  # another writer published in between
            if aside is not None and raced:
                shutil.rmtree(aside, ignore_errors=True)
            elif aside is not None:
                try:
                    os.rename(aside, final)  # put the old version back
                except OSError:
                    pass  # it stays complete at the aside name
            if not raced:
                raise
            if not overwrite:
                raise FileExistsError(f"{final} already exists; pass overwrite to replace it") from err
            continue  # another writer published in between: replace its version
        fsync_dir(final.parent)
        for stale in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)  # this one's aside, and any a crash left behind
        return
    raise OSError(errno.EBUSY, f"could not publish {final}: other writers kept replacing it")


def wait_for_folder(path: Path, seconds: float = 1.0) -> bool:
    """Whether folder ``path`` exists, waiting up to ``seconds`` while a replacement is in flight.

    ``publish_dir`` with overwrite leaves ``path`` absent for the instant between its two renames,
    with the old version at ``.<name>.old-*``; a reader arriving then waits for the new one.
    """
    path = Path(path)
    deadline = time.monotonic() + seconds
    while not path.is_dir():
        if time.monotonic() > deadline or not any(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
            return False
        time.sleep(0.02)
    return True


class FolderIdentity:
    """Tells whether ``path`` still leads to the folder it led to when this object was made.

    Readers that load files lazily use it to notice that the folder they opened was replaced
    (``publish_dir`` with overwrite) and so never mix files of two versions. An open descriptor of
    the folder is held so that its inode cannot be reused after the replacement deletes it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # not a folder, or a platform that cannot open one: compare by stat only
            st = os.stat(self.path)
        else:
            st = os.fstat(fd)
            weakref.finalize(self, os.close, fd)
        self.key = (st.st_dev, st.st_ino)

    def replaced(self) -> bool:
        """True when ``path`` is gone or now names another folder."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.key

    def __reduce__(self):  # a copy in another process pins the folder the path names there
        return (FolderIdentity, (self.path,))


@contextmanager
def staging_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; publish it as ``final`` on success, delete it on error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite to replace it")
    staging = final.with_name(f".{final.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        publish_dir(staging, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
