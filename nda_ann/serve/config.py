"""Limits and defaults of the attribution server (``nda-ann serve``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20


@dataclass
class ServeConfig:
    """What one server accepts and how much it keeps.

    Requests: at most ``max_files`` images of at most ``max_file_bytes`` bytes and ``max_pixels``
    pixels each, ``max_timesteps`` timesteps, ``top`` up to ``max_top``; ``queue_size`` requests
    wait for the single attribution worker (one more runs), later ones get 503. Heatmaps and query
    pictures of recent requests are kept up to ``cache_bytes`` (oldest dropped first).
    ``attribute_kwargs`` go to every ``Attributor.attribute`` call (e.g. ``k``, ``nprobe``).
    """

    max_files: int = 16
    max_file_bytes: int = 20 * MiB
    max_pixels: int = 1 << 26
    max_timesteps: int = 8
    max_top: int = 50
    max_candidates: int = 100_000
    default_timesteps: tuple[int, ...] = (100,)
    default_top: int = 10
    queue_size: int = 8
    cache_bytes: int = 64 * MiB
    warm: bool = True
    attribute_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: every file at its limit plus room for the form fields."""
        return self.max_files * self.max_file_bytes + MiB
