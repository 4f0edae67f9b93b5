"""`nda-ann serve` (the attribution server) and `nda-ann report` (report.html of a results folder)."""
from __future__ import annotations

from pathlib import Path

import click

from .group import main


@main.command("serve")
@click.argument("index")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (only this machine by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--queue-size", type=click.IntRange(min=1), default=8, show_default=True, help="Requests waiting for the attribution worker; more get 503.")
@click.option("--max-files", type=click.IntRange(min=1), default=16, show_default=True, help="Images per request.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.01), default=20.0, show_default=True, help="Size of one uploaded image.")
@click.option("--cache-mb", type=click.FloatRange(min=0), default=64.0, show_default=True, help="Memory for recent requests' heatmaps and queries (oldest dropped first).")
@click.option("--k", type=click.IntRange(min=1), default=None, help="Patches retrieved per query patch (default: the attributor's).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF lists probed (default: the index's).")
@click.option("--warm/--no-warm", default=True, show_default=True, help="Read the index and store into the page cache and run one query before serving.")
def serve_command(index: str, host: str, port: int, device: str, queue_size: int, max_files: int, max_upload_mb: float,
                  cache_mb: float, k: int | None, nprobe: int | None, warm: bool) -> None:
    """Serve INDEX over HTTP: POST /attribute, GET /health, GET /info, and a page at / to drop images on."""
    from ..errors import NdaError
    from ..serve import ServeConfig, run_server

    kwargs = {key: v for key, v in (("k", k), ("nprobe", nprobe)) if v is not None}
    config = ServeConfig(queue_size=queue_size, max_files=max_files, max_file_bytes=int(max_upload_mb * (1 << 20)),
                         cache_bytes=int(cache_mb * (1 << 20)), warm=warm, attribute_kwargs=kwargs)
    click.echo(f"opening {index} (warm: {warm}); then serving on http://{host}:{port}/", err=True)
    try:
        run_server(index, host=host, port=port, config=config, device=device)
    except (NdaError, ImportError) as err:
        raise click.ClickException(str(err)) from err


@main.command("report")
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Where to write (default RESULTS_DIR/report.html).")
def report_command(results_dir: Path, out_file: Path | None) -> None:
    """Write a self-contained report.html for RESULTS_DIR (written by `nda-ann attribute --out`)."""
    from ..errors import NdaError
    from ..results.html_report import write_html_report

    try:
        path = write_html_report(results_dir, out_file)
    except NdaError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {path}")
