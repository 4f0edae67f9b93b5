"""Errors that name the file and the problem."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class NdaError(Exception):
    """Base class: a problem a user can act on, with the path it concerns."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        """Pickled as (path, problem), so the error crosses processes (pools, Ray workers) as itself."""
        return type(self), (self.path, self.problem)


class StoreError(NdaError):
    """A corpus store is missing, incomplete, from another version, or does not fit."""


class IndexError_(NdaError):
    """An index folder is missing, incomplete, from another version, or does not fit."""


class InputError(NdaError):
    """An input image, array or table cannot be used."""


def os_error_message(err: OSError, target: str | Path | None = None) -> str:
    """One line for a failed read or write: the file, the cause and its errno name.

    ``target`` is what the command was making (a store, an index, a results folder); it is
    named when the error does not say which file failed, and the line says it was not changed.
    E.g. '/data/.out.staging-1a2b: No space left on device [ENOSPC]; nothing was written to
    /data/out (an earlier version stays complete): free space and run the command again'.
    """
    code = err.errno
    if code is None:  # pyarrow's OSError carries the errno only in its text
        found = re.search(r"errno (\d+)", str(err), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    cause = os.strerror(code) if code else (err.strerror or str(err) or type(err).__name__)
    name = f" [{errno.errorcode[code]}]" if code in errno.errorcode else ""
    path = err.filename or err.filename2 or target
    line = f"{path}: {cause}{name}" if path else f"{cause}{name}"
    if target is not None and str(path) != str(target):
        line += f"; nothing was written to {target} (an earlier version stays complete)"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        line += ": free space and run the command again"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        line += ": choose a writable location or fix the permissions"
    return line
