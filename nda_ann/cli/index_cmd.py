"""`nda-ann build`, `nda-ann add`, `nda-ann info`: parse, call nda_ann.index, report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import NdaError
from .group import main

DEFAULTS: dict[str, Any] = {"factory": "auto", "memory_budget": "8G", "candidate_stride": 1, "classes": "all", "gpu": "auto", "seed": 0}


def _device_line(gpu: str) -> None:
    """Print where FAISS trains and adds (the GPUs it sees under --gpu, else the CPU), float32 vectors."""
    import faiss

    from ..device import device_line
    from ..index.gpu import resolve_gpu
    from .failures import echo_device

    echo_device(device_line(None, "float32", faiss.get_num_gpus() if resolve_gpu(gpu) else 0))


@main.command("build")
@click.argument("store", required=False, type=click.Path(path_type=Path))
@click.argument("index", required=False)
@click.option("-s", "--scale", "scales", multiple=True, help="A scale P or P:F, e.g. --scale 7 --scale 14:2 (repeatable).")
@click.option("--factory", default=None, help="auto (default: Flat, IVF with lossless pixel codes (SQ8pixel) at factor-1 scales, IVF-Flat/SQ8 at P:2 scales, or PCA+IVF-PQ, by class size and budget) or a FAISS factory string (SQ8pixel allowed); '{nlist}' is filled in.")
@click.option("--memory-budget", default=None, help="RAM the build may use, e.g. 8G (default); larger scales are sharded.")
@click.option("--candidate-stride", type=click.IntRange(min=1), default=None, help="Index only positions on a stride grid (default 1 = all).")
@click.option("--classes", type=click.Choice(["all", "interior"]), default=None,
              help="Layout classes to index: all (default), or interior only (border query patches then retrieve "
                   "nothing; re-scoring still covers them). For million-image corpora: border classes hold most vectors at stride > 1.")
@click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default=None, help="Train and add on GPUs (auto: when FAISS sees one).")
@click.option("--seed", type=int, default=None, help="Seed of the training sample (default 0).")
@click.option("--recipe", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A TOML/JSON recipe with these settings; command-line values override it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing INDEX (atomically).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: add the shards' image ranges in parallel Ray tasks (pip install 'nda-ann[ray]'); the index is the same.")
@click.option("--address", default=None, help="--engine ray: the Ray cluster (auto, HOST:PORT; default: a new local one).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="--engine ray: range tasks at once (default: the cluster's CPUs).")
def build_command(store: Path | None, index: str | None, scales: tuple[str, ...], factory: str | None,
                  memory_budget: str | None, candidate_stride: int | None, classes: str | None, gpu: str | None,
                  seed: int | None, recipe: Path | None, overwrite: bool, progress: bool, engine: str = "local",
                  address: str | None = None, workers: int | None = None) -> None:
    """Build a patch index of STORE at INDEX (a bare name lands in indexes/NAME).

    Rerunning an interrupted build with the same settings resumes from its finished shards.
    """
    from ..index import build_index
    from ..index.recipe import load_recipe
    from .failures import reported

    with reported(index):
        base = load_recipe(recipe) if recipe else {}
        given = {"store": store, "index": index, "scales": list(scales) or None, "factory": factory,
                 "memory_budget": memory_budget, "candidate_stride": candidate_stride, "classes": classes, "gpu": gpu, "seed": seed}
        opts = {k: v if v is not None else base.get(k, DEFAULTS.get(k)) for k, v in given.items()}
        for key, hint in (("store", "STORE"), ("index", "INDEX"), ("scales", "--scale 7")):
            if not opts[key]:
                raise click.UsageError(f"missing {hint} (give it on the command line or in a --recipe)")
        _device_line(opts["gpu"])
        built = build_index(opts.pop("store"), opts.pop("index"), opts.pop("scales"), overwrite=overwrite,
                            progress=progress, engine=engine, address=address, workers=workers, **opts)
    click.echo(f"{built.path}: {built.count} images, scales {', '.join(str(s) for s in built.scales)}")


@main.command("add")
@click.argument("index")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True, help="Add on GPUs.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def add_command(index: str, store: Path, gpu: str, progress: bool) -> None:
    """Append the images of STORE to INDEX; their ids continue after the existing images."""
    from ..index import add_to_index
    from .failures import reported

    with reported(index):
        _device_line(gpu)
        updated = add_to_index(index, store, gpu=gpu, progress=progress)
    click.echo(f"{updated.path}: {updated.count} images in {len(updated.manifest['stores'])} store(s)")


@main.command("info")
@click.argument("index")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info_command(index: str, as_json: bool) -> None:
    """Print a summary of INDEX: stores, scales, index kinds, sizes on disk, bytes per vector."""
    from ..index import PatchIndex
    from ..index.info import index_summary

    try:
        opened = PatchIndex.open(index)
    except NdaError as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(opened.manifest, indent=2) if as_json else index_summary(opened))
