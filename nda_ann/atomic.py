"""Atomic publication of files and folders: a reader sees the old version or the new, never a mix."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via ``path.tmp`` + fsync + os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_dir(staging: Path, final: Path, overwrite: bool = False) -> None:
    """Move a finished ``staging`` folder to ``final`` in one rename.

    With ``overwrite``, an existing ``final`` is first renamed aside and removed only after the new
    one is in place, so a crash leaves either version complete (the aside copy is named
    ``.<name>.old-*``). Without it an existing ``final`` is an error and nothing changes.
    """
    staging, final = Path(staging), Path(final)
    fsync_dir(staging)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists; pass overwrite to replace it")
        aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
        os.rename(staging, final)
        fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staging, final)
        fsync_dir(final.parent)


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
