#!/usr/bin/env python
"""LDS evaluation end to end: data, subsets, models, queries, measured losses, scores, LDS, report.

    nice -n 19 python -m tools.lds.run                       # cpu-small, ~40-60 min on 2 CPU cores
    python -m tools.lds.run --config gpu-cifar --device cuda  # CIFAR-sized, for one GPU
    python -m tools.lds.run --config toy --set steps=20       # overrides go into a separate folder

Results go to OUT/<config>[-<fingerprint of overrides>]/ and every stage is cached there, so an
interrupted run resumes where it stopped:

    config.json            every setting, its fingerprint, checked when the folder is reopened
    subsets.npy            (M, N) bool masks of the random subsets
    models/full.pt         the model trained on all N images; models/subset_XXX.pt for subset XXX
    queries.pt             generated samples of the full model (DDIM) + held-out real images
    losses/<model>.npy     (Q,) measured diffusion loss of that model on every query
    scores/<method>.npy    (Q, N) attribution scores; scores/<method>.json their settings and time
    lds.json               LDS per method with intervals, per-query values, timings, versions
    table.md, lds_sweep.png
Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

if __package__ in (None, ""):  # `python tools/lds/run.py`: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nda_ann.atomic import write_json_atomic  # noqa: E402
from nda_ann.device import describe_device, resolve_device  # noqa: E402

from tools.lds import methods as M  # noqa: E402
from tools.lds.config import CONFIGS, LdsConfig, get_config  # noqa: E402
from tools.lds.data import Dataset, load_dataset, quantize, sample_subsets  # noqa: E402
from tools.lds.lds import lds_with_intervals  # noqa: E402
from tools.lds.losses import diffusion_losses, fixed_noise, loss_timesteps  # noqa: E402
from tools.lds.train import ddim_sample, load_checkpoint, save_checkpoint, train_model  # noqa: E402

__all__ = ["LdsRun", "run_folder", "main"]

log = logging.getLogger("tools.lds.run")


def run_folder(out: Path, config: LdsConfig) -> Path:
    """OUT/<name> for a named configuration as shipped, OUT/<name>-<fingerprint> when overridden."""
    base = CONFIGS.get(config.name)
    return Path(out) / (config.name if base == config else f"{config.name}-{config.fingerprint()}")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


class LdsRun:
    """One evaluation folder. ``run()`` does every stage not yet cached; ``evaluate()`` the LDS."""

    def __init__(self, config: LdsConfig, out: Path, *, device: str = "auto", threads: int | None = 1, echo: Callable[[str], None] = print):
        self.config = config.validate()
        self.folder = run_folder(out, config)
        self.device = resolve_device(device)
        if threads and self.device.type == "cpu":
            # one thread: on a loaded 2-core machine two threads were ~5x slower per training step
            torch.set_num_threads(threads)
        self.echo = echo
        self._data: Dataset | None = None
        self._full = None
        self._queries: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self._open()

    # --- folder -----------------------------------------------------------------------------
    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "config.json"
        mine = {"config": self.config.to_dict(), "fingerprint": self.config.fingerprint()}
        if meta.exists():
            stored = json.loads(meta.read_text())
            if stored.get("fingerprint") != mine["fingerprint"]:
                raise ValueError(
                    f"{self.folder} holds results of different settings (fingerprint {stored.get('fingerprint')}, "
                    f"now {mine['fingerprint']}); pick another --out or delete the folder")
        else:
            write_json_atomic(meta, mine)
        tfile = self.folder / "timings.json"
        if tfile.exists():
            self.timings = json.loads(tfile.read_text())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; the seconds add up over resumed runs in timings.json."""
        start = time.time()
        self.echo(f"[lds] {name} ...")
        try:
            yield
        finally:
            took = time.time() - start
            self.timings[name] = self.timings.get(name, 0.0) + took
            write_json_atomic(self.folder / "timings.json", self.timings)
            self.echo(f"[lds] {name}: {took:.1f} s")

    @property
    def data(self) -> Dataset:
        if self._data is None:
            self._data = load_dataset(self.config)
        return self._data

    @property
    def masks(self) -> np.ndarray:
        path = self.folder / "subsets.npy"
        cfg = self.config
        masks = sample_subsets(cfg.n_train, cfg.n_subsets, cfg.subset_fraction, cfg.subset_seed)
        if not path.exists():
            save_npy_atomic(path, masks)
        elif not np.array_equal(np.load(path), masks):
            raise ValueError(f"{path} differs from the subsets the seed draws; the folder is stale")
        return masks

    # --- models -----------------------------------------------------------------------------
    def _model(self, name: str, subset: np.ndarray | None, index: int):
        path = self.folder / "models" / f"{name}.pt"
        channels = self.data.train.shape[1]
        if path.exists():
            return load_checkpoint(path, self.config, channels, subset, self.device)
        images = self.data.train if subset is None else self.data.train[torch.as_tensor(np.flatnonzero(subset))]
        model, record = train_model(images, self.config, index, self.device)
        save_checkpoint(path, model, record, subset)
        return model, record

    def full_model(self):
        if self._full is None:
            self._full = self._model("full", None, -1)[0]
        return self._full

    @property
    def queries(self) -> dict[str, Any]:
        """{'images': (Q, C, H, W), 'kinds': ['generated'|'heldout'] * Q, 'names': [...]}."""
        if self._queries is None:
            path = self.folder / "queries.pt"
            if path.exists():
                self._queries = torch.load(path, weights_only=False)
            else:
                cfg = self.config
                shape = tuple(self.data.train.shape[1:])
                gen = quantize(ddim_sample(self.full_model(), cfg.n_generated, shape, cfg, self.device)) if cfg.n_generated else torch.empty((0,) + shape)
                images = torch.cat([gen, self.data.heldout])
                q = {
                    "images": images,
                    "kinds": ["generated"] * len(gen) + ["heldout"] * len(self.data.heldout),
                    "names": [f"sample[{i}] seed={cfg.sample_seed}" for i in range(len(gen))] + list(self.data.heldout_sources),
                }
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
                torch.save(q, tmp)
                os.replace(tmp, path)
                self._queries = q
        return self._queries

    def _losses(self, name: str, model) -> np.ndarray:
        path = self.folder / "losses" / f"{name}.npy"
        if path.exists():
            return np.load(path)
        cfg = self.config
        images = self.queries["images"]
        ts = loss_timesteps(cfg.loss_timesteps)
        noise = fixed_noise(len(images), len(ts), cfg.loss_draws, tuple(images.shape[1:]), cfg.loss_seed)
        out = diffusion_losses(model, images, ts, noise, cfg.schedule)
        save_npy_atomic(path, out)
        return out

    def train_all(self) -> np.ndarray:
        """Train (or load) every model and measure its losses: returns (M, Q)."""
        cfg = self.config
        masks = self.masks
        with self.phase("train full model + sample queries"):
            model = self.full_model()
            self._losses("full", model)
        rows = []
        with self.phase(f"train {cfg.n_subsets} subset models + losses"):
            for j in range(cfg.n_subsets):
                name = f"subset_{j:03d}"
                cached = (self.folder / "losses" / f"{name}.npy").exists() and (self.folder / "models" / f"{name}.pt").exists()
                if cached:
                    rows.append(np.load(self.folder / "losses" / f"{name}.npy"))
                    continue
                start = time.time()
                model, record = self._model(name, masks[j], j)
                rows.append(self._losses(name, model))
                left = sum(1 for i in range(j + 1, cfg.n_subsets) if not (self.folder / "models" / f"subset_{i:03d}.pt").exists())
                self.echo(f"[lds]   {name}: train loss {record['final_train_loss']:.4f}, {time.time() - start:.0f} s; "
                          f"~{left * (time.time() - start) / 60:.0f} min for the {left} left")
        return np.stack(rows)

    # --- scores -----------------------------------------------------------------------------
    def _cached_scores(self, key: str) -> np.ndarray | None:
        path = self.folder / "scores" / f"{key}.npy"
        return np.load(path) if path.exists() else None

    def scores(self, spec: M.MethodSpec) -> np.ndarray:
        got = self._cached_scores(spec.key)
        if got is not None:
            return got
        start = time.time()
        ctx = _Context(self)
        out = np.asarray(M.compute(spec, ctx, self._cached_scores), dtype=np.float64)
        q, n = len(self.queries["images"]), self.config.n_train
        if out.shape != (q, n) or not np.isfinite(out).all():
            raise RuntimeError(f"method {spec.key} returned scores of shape {out.shape} (finite: {np.isfinite(out).all()}), expected ({q}, {n})")
        save_npy_atomic(self.folder / "scores" / f"{spec.key}.npy", out)
        write_json_atomic(self.folder / "scores" / f"{spec.key}.json",
                          {"key": spec.key, "label": spec.label, "family": spec.family, "params": spec.params, "seconds": time.time() - start})
        self.echo(f"[lds]   {spec.key}: {time.time() - start:.1f} s")
        return out

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, losses: np.ndarray) -> dict[str, Any]:
        cfg = self.config
        masks = self.masks
        kinds = np.asarray(self.queries["kinds"])
        specs = M.method_specs(cfg)
        with self.phase("attribution scores"):
            # means over the sweep last, so they reuse the sweep's cached scores
            all_scores = {s.key: self.scores(s) for s in sorted(specs, key=lambda s: s.family == "nda_mean")}
        results = {}
        with self.phase("LDS + bootstrap"):
            for s in specs:
                row: dict[str, Any] = {"label": s.label, "family": s.family, "params": s.params, "table": s.table}
                for group in ("all", "generated", "heldout"):
                    sel = np.ones(len(kinds), bool) if group == "all" else kinds == group
                    if not sel.any():
                        continue
                    res = lds_with_intervals(losses[:, sel], masks, all_scores[s.key][sel], bootstrap=cfg.bootstrap, seed=cfg.bootstrap_seed)
                    row[group] = res.to_dict()
                meta = self.folder / "scores" / f"{s.key}.json"
                row["score_seconds"] = json.loads(meta.read_text()).get("seconds") if meta.exists() else None
                results[s.key] = row
        full_losses = np.load(self.folder / "losses" / "full.npy")
        report = {
            "config": cfg.to_dict(),
            "fingerprint": cfg.fingerprint(),
            "folder": str(self.folder),
            "device": describe_device(self.device),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "queries": {"count": int(len(kinds)), "generated": int((kinds == "generated").sum()), "heldout": int((kinds == "heldout").sum())},
            "losses": {
                "full_model_mean": {k: float(full_losses[kinds == k].mean()) for k in ("generated", "heldout") if (kinds == k).any()},
                "subset_models_mean": {k: float(losses[:, kinds == k].mean()) for k in ("generated", "heldout") if (kinds == k).any()},
                "across_subsets_std_mean": float(losses.std(0).mean()),
            },
            "models": self._model_records(),
            "timings_s": self.timings,
            "methods": results,
        }
        write_json_atomic(self.folder / "lds.json", report)
        return report

    def _model_records(self) -> dict[str, Any]:
        recs = {}
        for path in sorted((self.folder / "models").glob("*.pt")):
            recs[path.stem] = torch.load(path, map_location="cpu", weights_only=False)["record"]
        return recs

    def run(self) -> dict[str, Any]:
        start = time.time()
        self.echo(f"[lds] {self.config.name} ({self.config.fingerprint()}) in {self.folder} on {describe_device(self.device)}")
        losses = self.train_all()
        report = self.evaluate(losses)
        from tools.lds.report import write_outputs

        write_outputs(report, self.folder)
        self.echo(f"[lds] done in {time.time() - start:.0f} s this session; total {sum(self.timings.values()):.0f} s over all sessions")
        return report


class _Context:
    """What a method needs: training images, queries, settings, device, the full model on demand."""

    def __init__(self, run: LdsRun):
        self.config = run.config
        self.device = run.device
        self.train = run.data.train
        self.queries = run.queries["images"]
        self.full_model = run.full_model


def main(argv: list[str] | None = None) -> None:
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.option("--config", "name", type=click.Choice(sorted(CONFIGS)), default="cpu-small", show_default=True, help="Named configuration.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting (repeatable); tuples comma-separated.")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/lds"), show_default=True, help="Results root.")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
    @click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")
    @click.option("--benchmarks", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Also write the LDS section (between <!-- lds --> markers) into this markdown file.")
    @click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also copy the sweep plot here.")
    @click.option("-v", "--verbose", is_flag=True, help="Log info messages.")
    def cli(name, overrides, out, device, threads, benchmarks, figure, verbose):
        """Evaluate attribution methods by the linear datamodeling score (docs/scores.md section 7)."""
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        try:
            config = get_config(name, overrides)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--set") from err
        command = "python -m tools.lds.run " + " ".join(sys.argv[1:] if argv is None else argv)
        report = LdsRun(config, out, device=device, threads=threads, echo=lambda s: click.echo(s, err=True)).run()
        from tools.lds.report import markdown_table, write_benchmarks_section

        click.echo(markdown_table(report))
        if figure:
            import shutil

            figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(report["folder"]) / "lds_sweep.png", figure)
        if benchmarks:
            write_benchmarks_section(benchmarks, report, command=command, figure=figure)

    cli.main(args=argv, prog_name="python -m tools.lds.run", standalone_mode=argv is None)


if __name__ == "__main__":
    main()
