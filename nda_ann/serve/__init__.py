"""The attribution server (``nda-ann serve``): one process that opens an index once and answers
POST /attribute, with a page to drop images on. Needs the ``serve`` extra (fastapi, uvicorn,
python-multipart); importing this package does not (``create_app`` and ``run_server`` import them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ServeConfig

SERVE_HINT = "the server needs the 'serve' extra: pip install 'nda-ann[serve]' (fastapi, uvicorn, python-multipart)"


def create_app(index: str | Path | None = None, config: ServeConfig | None = None, **kwargs: Any):
    """The FastAPI app serving ``index`` (see ``nda_ann.serve.app.create_app``)."""
    try:
        from .app import create_app as _create
    except ImportError as err:
        raise ImportError(f"{SERVE_HINT} ({err})") from err
    return _create(index, config, **kwargs)


def run_server(index: str | Path, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
               device: str = "auto", log_level: str = "info") -> None:
    """Open ``index``, then serve it with uvicorn on ``host``:``port`` until interrupted."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError(f"{SERVE_HINT} ({err})") from err
    app = create_app(index, config, device=device)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


__all__ = ["ServeConfig", "create_app", "run_server"]
