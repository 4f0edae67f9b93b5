"""Errors that name the file and the problem."""
from __future__ import annotations

from pathlib import Path


class NdaError(Exception):
    """Base class: a problem a user can act on, with the path it concerns."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class StoreError(NdaError):
    """A corpus store is missing, incomplete, from another version, or does not fit."""


class IndexError_(NdaError):
    """An index folder is missing, incomplete, from another version, or does not fit."""


class InputError(NdaError):
    """An input image, array or table cannot be used."""
