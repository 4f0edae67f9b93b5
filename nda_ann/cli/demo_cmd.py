"""`nda-ann demo`: exact attribution of held-out photo crops on the embedded corpus (no download)."""
from __future__ import annotations

from pathlib import Path

import click

from .group import main


@main.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/demo"),
              show_default=True, help="Folder for the store, scores.parquet and figures.")
@click.option("--n-train", type=click.IntRange(1, 1_000_000), default=3000, show_default=True, help="Training crops in the corpus (at most 1,000,000: 2.9 GiB).")
@click.option("--queries", "n_queries", type=click.IntRange(min=1), default=6, show_default=True, help="Held-out query crops.")
@click.option("--timestep", type=click.IntRange(0, 999), default=100, show_default=True, help="Diffusion timestep t.")
@click.option("--scale", default="7", show_default=True, help="Patch scale P or P:F, e.g. 7 or 14:2.")
@click.option("--topk", type=click.IntRange(min=1), default=100, show_default=True, help="Patches kept per image (docs/scores.md 2).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:<i>.")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Arithmetic of the exact scorer: float32 is faster, float64 the reference.")
def demo(out_dir: Path, n_train: int, n_queries: int, timestep: int, scale: str, topk: int, device: str, precision: str) -> None:
    """Cut a corpus from the photographs scikit-image and scikit-learn ship, attribute held-out
    crops with the exact scorer, print the top 5 per query and write figures."""
    from ..demo import run_demo  # imported here so `nda-ann --help` stays fast
    from ..scoring.scales import Scale

    try:
        Scale.parse(scale)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--scale") from err
    from ..device import device_line, resolve_device
    from .failures import echo_device, reported

    with reported(out_dir):
        dev = resolve_device(device)
        echo_device(device_line(dev, precision))
        run_demo(out_dir, n_train=n_train, n_queries=n_queries, timestep=timestep, scale=scale, topk=topk,
                 device=str(dev), precision=precision, echo=click.echo)
