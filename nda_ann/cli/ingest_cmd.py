"""`nda-ann ingest` and `nda-ann store-info`: parse, call the API, report."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import NdaError
from ..corpus.ingest import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PIXELS, ingest
from ..corpus.store import Store
from .group import main


@main.command("ingest")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("store", type=click.Path(path_type=Path))
@click.option("-r", "--resolution", type=click.IntRange(min=1), required=True, help="Side R of the stored R x R images.")
@click.option("--channels", type=click.Choice(["3", "1"]), default="3", show_default=True, help="3 = RGB, 1 = grayscale.")
@click.option("--on-error", type=click.Choice(["skip", "raise"]), default="skip", show_default=True,
              help="skip: record unusable inputs in the manifest; raise: stop at the first one.")
@click.option("--image-column", default=None, help="Parquet: the image column (default: 'image', 'img', or the first binary/struct{bytes} column).")
@click.option("--source-column", default=None, help="Parquet: a column naming each row (default: FILE#ROW).")
@click.option("--overwrite", is_flag=True, help="Replace an existing STORE (atomically).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes (default min(4, cpus); 0 or 1 = in process).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True, help="Images per batch and checkpoint.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Skip larger images (decompression-bomb guard).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: decode batches in Ray tasks (--workers batches at once; pip install 'nda-ann[ray]'); the store is the same.")
@click.option("--address", default=None, help="--engine ray: the Ray cluster (auto, HOST:PORT; default: a new local one).")
def ingest_command(source: Path, store: Path, resolution: int, channels: str, on_error: str, image_column: str | None,
                   source_column: str | None, overwrite: bool, workers: int | None, batch_size: int, max_pixels: int,
                   progress: bool, engine: str = "local", address: str | None = None) -> None:
    """Ingest SOURCE (image folder, Parquet file or folder, or .npy array) into the corpus store STORE.

    Images are converted to RGB (or grayscale), resized on the shorter side and centre-cropped to
    R x R. An interrupted ingest continues where it stopped when the same command is run again.
    """
    from ..device import device_line
    from .failures import echo_device, reported

    with reported(store):
        echo_device(device_line(None, "uint8 pixels"))
        st = ingest(source, store, resolution, channels=int(channels), on_error=on_error,  # type: ignore[arg-type]
                    image_column=image_column, source_column=source_column, overwrite=overwrite, workers=workers,
                    batch_size=batch_size, progress=progress, max_pixels=max_pixels, engine=engine, address=address)
    skipped = len(st.manifest.get("skipped", []))
    note = f"; skipped {skipped} (reasons in manifest.json, or `nda-ann store-info --skipped`)" if skipped else ""
    click.echo(f"{st.path}: {st.count} images of {st.resolution}x{st.resolution}x{st.channels}{note}")


@main.command("store-info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also re-hash the pixels against the manifest.")
@click.option("--skipped", "show_skipped", is_flag=True, help="List every skipped input with its reason.")
def store_info_command(store: Path, verify: bool, show_skipped: bool) -> None:
    """Print a summary of the manifest of STORE."""
    try:
        st = Store.open(store, verify=verify)
    except NdaError as err:
        raise click.ClickException(str(err)) from err
    m = st.manifest
    source = m.get("source", {})
    dup = m.get("duplicates", {})
    lines = [
        f"store:           {st.path}",
        f"images:          {st.count}",
        f"resolution:      {st.resolution} x {st.resolution}",
        f"channels:        {st.channels}",
        f"bytes per image: {st.resolution * st.resolution * st.channels}",
        f"pixel bytes:     {st.count * st.resolution * st.resolution * st.channels}",
        f"skipped inputs:  {len(m.get('skipped', []))}",
    ]
    if source:
        lines.append(f"source:          {source.get('kind')} {source.get('path')}")
    if "upscaled" in m:
        lines.append(f"upscaled:        {m['upscaled']}")
    if dup:
        lines.append(f"duplicates:      {dup.get('extra_copies', 0)} extra copies in {dup.get('groups', 0)} groups (kept)")
    lines += [
        f"filter:          {m.get('transform', {}).get('filter', m.get('transform', {}).get('kind'))}",
        f"fingerprint:     {m.get('fingerprint')}",
        f"created:         {m.get('created')} by nda-ann {m.get('nda_ann_version')}",
    ]
    if verify:
        lines.append("verified:        pixels match the manifest checksum")
    click.echo("\n".join(lines))
    if show_skipped:
        for s in m.get("skipped", []):
            click.echo(f"skipped  {s.get('source')}: {s.get('reason')}")
