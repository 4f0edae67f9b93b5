"""`nda-ann attribute` (index or --exact) and `nda-ann compare`: parse, call the API, print."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from .group import main


TAIL_MODES = {"scaled": "scaled", "retrieved": True, "off": False}  # --tail -> Attributor.attribute(tail=)


class ScaleParam(click.ParamType):
    """P or P:F, e.g. 7 or 14:2."""

    name = "scale"

    def convert(self, value, param, ctx):
        from ..scoring.scales import Scale

        try:
            return Scale.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _common(f):
    opts = [
        click.option("-t", "--timestep", "timesteps", type=int, multiple=True, default=(100,), show_default=True, callback=_unique_timesteps, help="Diffusion timestep; repeat for several (their mean is reported too; a repeated one is dropped with a warning)."),
        click.option("--scale", "scales", type=ScaleParam(), multiple=True, help="Patch scale P or P:F (repeat for two). Index mode: defaults to the index's scales."),
        click.option("--alpha", type=float, default=None, help="Weight of the first of two scales (default 0.5)."),
        click.option("--topk", type=click.IntRange(min=1), default=None, help="Sum only the K largest patch weights per image (docs/scores.md 2)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (docs/scores.md 1)."),
        click.option("--noise-draws", type=click.IntRange(min=1), default=1, show_default=True, help="Average the scores of this many noise draws."),
        click.option("--schedule", type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"]), default="linear", show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:<i>."),
        click.option("--k", type=click.IntRange(min=1), default=1024, show_default=True, help="Patches retrieved per query patch."),
        click.option("--candidates", "-m", type=click.IntRange(min=1), default=None, help="Candidate images re-scored exactly (M). Default: sized by the outside mass, in rounds until 30% of the softmax mass is estimated outside them, at most 1,000; a number fixes M (or caps the rounds of --max-outside / --time-budget)."),
        click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF lists probed (default: the index's)."),
        click.option("--mode", type=click.Choice(["rescore", "fast"]), default="rescore", show_default=True, help="fast: truncated softmax over the K retrieved patches only."),
        click.option("--rerank", type=click.IntRange(min=1), default=None, help="Re-rank a pool of RERANK x M images by exact mass at a subset of query positions (default 1 = off; measured in BENCHMARKS.md)."),
        click.option("--outside-sample", type=click.IntRange(min=0), default=None, help="Non-candidate images sampled, each scored at every position, to estimate the mass outside the M (default 128; 0: only the retrieved patches count)."),
        click.option("--outside-smoothing", type=click.FloatRange(min=0), default=None, help="The outside share reads the sampled mass smoothed over neighbouring query positions, by a Gaussian of this many positions where few draws carry it (default 1.0; 0: plain; docs/scores.md, step 3)."),
        click.option("--outside-topup", type=click.IntRange(min=0), default=None, help="In each later round of the rounds, draw this many more non-candidate images against that round's candidates and pool them with the outside sample (default 64; 0: the first sample only)."),
        click.option("--max-outside", type=click.FloatRange(0, 1, min_open=True), default=None, help="Re-score candidates in rounds until the estimated share of the softmax mass outside them is below this (the default 0.3 when --candidates is not given); --candidates then caps M (default 1,000)."),
        click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds per query image (all timesteps) for those rounds: stop when the next round would not fit."),
        click.option("--tail", "tail_mode", type=click.Choice(list(TAIL_MODES)), default=None, help="How non-candidates score: scaled (default): the weights of their retrieved patches, scaled up to the estimated outside mass at each query position (at most 10x); retrieved: those weights unscaled (a lower bound); off: 0, as docs/scores.md section 5."),
        click.option("--tail-retrieved", type=click.Choice(["all", "remeasured"]), default="all", show_default=True, help="Indexes with approximate distances (PCA, lossy codes): all: the tail takes every retrieved patch, those past the 32 re-measured from the pixels at their index distance corrected per query position; remeasured: the 32 re-measured only (slightly faster, a lower bound with --tail retrieved)."),
        click.option("--no-tail", is_flag=True, default=False, help="Same as --tail off."),
        click.option("--resize/--no-resize", "allow_resize", default=True, show_default=True, help="Resize query images of another size than the corpus as the training images were (shorter side, centre crop), with a warning and a record in summary.json; --no-resize refuses them."),
    ]

    @functools.wraps(f)
    def merged(*args, tail_mode: str | None = None, no_tail: bool = False, **kw):
        if no_tail and tail_mode not in (None, "off"):
            raise click.UsageError(f"--tail {tail_mode} and --no-tail contradict each other")
        mode = "off" if no_tail else tail_mode
        return f(*args, tail=None if mode is None else TAIL_MODES[mode], **kw)

    for opt in reversed(opts):
        merged = opt(merged)
    return merged


def _fail(err: Exception):
    raise click.ClickException(str(err)) from err


def _unique_timesteps(ctx, param, value: tuple[int, ...]) -> tuple[int, ...]:
    """Drop repeated timesteps (in order) with a warning: a repeat adds the same scores again and
    would only weigh that timestep twice in the mean."""
    unique = tuple(dict.fromkeys(value))
    if len(unique) < len(value):
        click.echo(f"warning: timestep(s) {', '.join(str(t) for t in sorted({t for t in value if value.count(t) > 1}))} "
                   f"given more than once; each is used once: {' '.join(f'-t {t}' for t in unique)}", err=True)
    return unique


def _device(device: str, precision: str) -> str:
    """Resolve --device (a clear error for an unknown or absent one), print the device line, return it."""
    from ..device import device_line, resolve_device
    from .failures import echo_device

    dev = resolve_device(device)
    echo_device(device_line(dev, precision))
    return str(dev)


@main.command("attribute")
@click.argument("source", type=click.Path())
@click.argument("queries", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--exact", is_flag=True, help="SOURCE is a store: score every patch of every image (no index).")
@_common
@click.option("--precision", type=click.Choice(["float32", "float64"]), default=None, help="Dense arithmetic (default: float32 for the index path, float64 for --exact).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Results folder.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Rows printed per query.")
@click.option("--html", "html", is_flag=True, help="Also write OUT/report.html (self-contained; `nda-ann report OUT` does the same later).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: search the index through Ray shard actors and fetch pixels from them (pip install 'nda-ann[ray]'); the scores are the same.")
@click.option("--address", default=None, help="--engine ray: the Ray cluster (auto, HOST:PORT; default: a new local one).")
@click.option("--actors", type=click.IntRange(min=1), default=None, help="--engine ray: shard actors (default: one per node, at most one per shard).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--engine ray: seconds an actor may take to answer before the query fails (default 120).")
def attribute(source, queries, exact, timesteps, scales, alpha, topk, seed, noise_draws, schedule, device, k, candidates, nprobe, mode, rerank, outside_sample, outside_smoothing, outside_topup, max_outside, time_budget, tail, tail_retrieved, allow_resize, precision, out_dir, top, html,
              engine="local", address=None, actors=None, timeout_s=None):
    """Say which training images QUERY images draw on: SOURCE is an index (or a store with --exact)."""
    from .. import api
    from ..errors import NdaError
    from .failures import reported

    with reported(out_dir):
        device = _device(device, precision or ("float64" if exact else "float32"))
        text = api.attribute_to_folder(
            source, list(queries), out_dir, exact=exact, timesteps=list(timesteps), scales=list(scales) or None,
            alpha=alpha, topk=topk, seed=seed, noise_draws=noise_draws, schedule=schedule, device=device, k=k,
            candidates=candidates, nprobe=nprobe, mode=mode, rerank=rerank, outside_sample=outside_sample, outside_smoothing=outside_smoothing, outside_topup=outside_topup, tail=tail, tail_retrieved=tail_retrieved, precision=precision, top=top,
            max_outside=max_outside, time_budget=time_budget, allow_resize=allow_resize, engine=engine, address=address, actors=actors, timeout_s=timeout_s,
        )
    click.echo(text)
    click.echo(f"wrote {out_dir}/scores.parquet, summary.json and one PNG per query")
    if html:
        from ..results.html_report import write_html_report

        try:
            click.echo(f"wrote {write_html_report(out_dir)}")
        except NdaError as err:
            _fail(err)


@main.command("compare")
@click.argument("index", type=click.Path())
@click.argument("queries", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_common
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the metrics here.")
def compare(index, queries, timesteps, scales, alpha, topk, seed, noise_draws, schedule, device, k, candidates, nprobe, mode, rerank, outside_sample, outside_smoothing, outside_topup, max_outside, time_budget, tail, tail_retrieved, allow_resize, json_out):
    """Fidelity of the index path against the exact scorer on the same queries and noise (docs/scores.md 7)."""
    from .. import api
    from .failures import reported

    with reported(json_out):
        device = _device(device, "float32 (index path), float64 (exact)")
        text = api.compare_to_exact(
            index, list(queries), timesteps=list(timesteps), alpha=alpha, topk=topk, seed=seed, noise_draws=noise_draws,
            schedule=schedule, device=device, k=k, candidates=candidates, nprobe=nprobe, mode=mode, rerank=rerank, outside_sample=outside_sample, outside_smoothing=outside_smoothing, outside_topup=outside_topup, tail=tail, tail_retrieved=tail_retrieved, json_path=json_out,
            max_outside=max_outside, time_budget=time_budget,
            allow_resize=allow_resize,
        )
    click.echo(text)
