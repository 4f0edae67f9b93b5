"""Command-line interface: a thin click layer over the public API. One module per command family."""
from .group import main

# Each module registers its commands on ``main`` when imported.
from . import attribute_cmd, demo_cmd, index_cmd, ingest_cmd, serve_cmd  # noqa: F401,E402

__all__ = ["main"]
