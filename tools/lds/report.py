"""Render an lds.json report: markdown tables, the (t, p) sweep plot, the BENCHMARKS.md section."""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "difference_table", "sweep_table", "plot_sweep", "write_outputs", "write_benchmarks_section", "BEGIN", "END"]

BEGIN, END = "<!-- lds -->", "<!-- /lds -->"


def _pct(res: dict | None, ci: str = "ci_queries") -> str:
    if not res:
        return "-"
    lo, hi = res[ci]
    return f"{100 * res['lds']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(report: dict[str, Any]) -> str:
    """Main comparison: LDS in percent with 95% intervals (resampling queries; resampling subsets)."""
    q = report["queries"]
    lines = [
        f"| method | LDS, all {q['count']} queries | interval over subsets | generated ({q['generated']}) | held-out ({q['heldout']}) | scoring time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in report["methods"].items():
        if not row.get("table", True):
            continue
        secs = row.get("score_seconds")
        lines.append(
            f"| {row['label']} | {_pct(row.get('all'))} | {_pct(row.get('all'), 'ci_subsets')} | {_pct(row.get('generated'))} | "
            f"{_pct(row.get('heldout'))} | {'-' if secs is None else f'{secs:.1f}'} |")
    return "\n".join(lines)


def reference_key(report: dict[str, Any]) -> str:
    """The pre-registered exact NDA row (default scale and timestep)."""
    from .methods import method_key

    cfg = report["config"]
    return method_key("nda", cfg["nda_default_t"], cfg["nda_default_scale"])


def difference_table(report: dict[str, Any]) -> str:
    """Paired per-query LDS difference (points) of the default exact NDA row against every other table row."""
    import numpy as np

    from .lds import paired_difference

    ref = reference_key(report)
    methods = report["methods"]
    if ref not in methods:
        return ""
    cfg = report["config"]
    base = np.asarray(methods[ref]["all"]["per_query"])
    lines = [f"| {methods[ref]['label']} minus | LDS difference, all queries [95% paired interval] |", "|---|---|"]
    for key, row in methods.items():
        if key == ref or not row.get("table", True) or "all" not in row:
            continue
        m, lo, hi = paired_difference(base, np.asarray(row["all"]["per_query"]), bootstrap=cfg["bootstrap"], seed=cfg["bootstrap_seed"])
        lines.append(f"| {row['label']} | {100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    return "\n".join(lines)


def _sweep(report: dict[str, Any]) -> tuple[list[int], list[int], dict[tuple[int, int], dict]]:
    ts, ps = report["config"]["nda_sweep_t"], report["config"]["nda_sweep_p"]
    cells = {}
    for key, row in report["methods"].items():
        m = re.fullmatch(r"nda_(\d+)_(\d+)", key)
        if m and row["family"] == "nda":
            cells[(int(m.group(1)), int(m.group(2)))] = row
    return list(ts), list(ps), cells


def sweep_table(report: dict[str, Any], group: str = "all") -> str:
    """Exact NDA single scale: LDS (%) by patch size (rows) and timestep (columns)."""
    ts, ps, cells = _sweep(report)
    lines = ["| p \\ t | " + " | ".join(str(t) for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for p in ps:
        vals = []
        for t in ts:
            r = cells.get((t, p), {}).get(group)
            vals.append("-" if not r else f"{100 * r['lds']:.1f}")
        lines.append(f"| {p} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_sweep(report: dict[str, Any], path: Path) -> None:
    """LDS against timestep (one line per patch size) and against patch size (one line per
    timestep), with the query-bootstrap interval, and the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, ps, cells = _sweep(report)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for p in ps:
        xs = [t for t in ts if (t, p) in cells]
        ys = [100 * cells[(t, p)]["all"]["lds"] for t in xs]
        lo = [100 * cells[(t, p)]["all"]["ci_queries"][0] for t in xs]
        hi = [100 * cells[(t, p)]["all"]["ci_queries"][1] for t in xs]
        line, = axes[0].plot(xs, ys, marker="o", label=f"NDA p={p}")
        axes[0].fill_between(xs, lo, hi, alpha=0.08, color=line.get_color())
    for t in ts:
        xs = [p for p in ps if (t, p) in cells]
        ys = [100 * cells[(t, p)]["all"]["lds"] for p in xs]
        axes[1].plot(xs, ys, marker="s", label=f"NDA t={t}")
    styles = {"random": ("grey", ":"), "pixel_l2": ("black", "--"), "pixel_cos": ("tab:brown", "--"), "trak": ("tab:red", "-."), "dtrak": ("tab:purple", "-.")}
    handles = []
    for key, (colour, ls) in styles.items():
        row = report["methods"].get(key)
        if row and "all" in row:
            for ax in axes:
                h = ax.axhline(100 * row["all"]["lds"], color=colour, ls=ls, lw=1, label=row["label"])
            handles.append(h)
    axes[0].set_xscale("log")
    axes[0].set_xticks(ts)
    axes[0].set_xticklabels([str(t) for t in ts])
    axes[0].minorticks_off()
    axes[0].set_xlabel("timestep t (shaded: 95% interval over queries)")
    axes[1].set_xticks(ps)
    axes[1].set_xlabel("patch size p")
    for ax in axes:
        ax.set_ylabel("LDS (%)")
        ax.grid(alpha=0.3)
    n_nda = len(ps)
    axes[0].legend(axes[0].get_legend_handles_labels()[0][:n_nda], axes[0].get_legend_handles_labels()[1][:n_nda], fontsize=7, loc="lower left", ncol=2)
    h1, l1 = axes[1].get_legend_handles_labels()
    axes[1].legend(h1[: len(ts)], l1[: len(ts)], fontsize=7, loc="lower right", ncol=2)
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=len(handles), fontsize=7)
    cfg = report["config"]
    fig.suptitle(f"LDS of exact NDA (single scale, topk={cfg['nda_topk']}) vs baselines (horizontal lines): {cfg['name']}, "
                 f"N={cfg['n_train']}, {cfg['n_subsets']} subsets, {report['queries']['count']} queries", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(report: dict[str, Any], folder: Path) -> None:
    folder = Path(folder)
    text = "## Methods\n\n" + markdown_table(report) + "\n\n## Paired differences\n\n" + difference_table(report) + "\n\n## Exact NDA sweep (LDS %, all queries)\n\n" + sweep_table(report) + "\n"
    _write_text_atomic(folder / "table.md", text)
    plot_sweep(report, folder / "lds_sweep.png")


def write_benchmarks_section(path: Path, report: dict[str, Any], *, command: str, figure: Path | None = None, notes: str = "") -> None:
    """Replace the text between the ``<!-- lds -->`` markers of ``path`` (append them if absent)."""
    path = Path(path)
    cfg = report["config"]
    timings = report.get("timings_s", {})
    body = [
        BEGIN,
        "## Linear datamodeling score, LDS (tools/lds)",
        "",
        "Reproduce (resumable; every model, loss and score is cached under the results folder):",
        "",
        "```",
        command.strip(),
        "```",
        "",
        f"Configuration `{cfg['name']}` (fingerprint `{report['fingerprint']}`): {cfg['n_train']} real {cfg['size']}x{cfg['size']} photo crops, "
        f"{cfg['n_subsets']} random {int(cfg['subset_fraction'] * 100)}% subsets; {report['queries']['generated']} DDIM samples of the full model "
        f"and {report['queries']['heldout']} held-out real crops as queries; loss averaged over {cfg['loss_timesteps']} timesteps x "
        f"{cfg['loss_draws']} fixed noise draws. LDS in percent, [95% bootstrap interval]. Total wall time "
        f"{sum(timings.values()) / 60:.0f} min on {report['device']}.",
        "",
        markdown_table(report),
        "",
        "Paired differences (same queries resampled for both methods; an interval excluding 0 is a real difference at this size):",
        "",
        difference_table(report),
        "",
        "Exact NDA, single scale, LDS (%) over all queries by patch size p and timestep t:",
        "",
        sweep_table(report),
        "",
    ]
    if figure is not None:
        body += [f"![LDS against timestep and patch size]({os.path.relpath(figure, path.parent)})", ""]
    if notes:
        body += [notes.strip(), ""]
    body.append(END)
    section = "\n".join(body)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = head + section + tail
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    _write_text_atomic(path, new)


def main(argv: list[str] | None = None) -> None:
    """python -m tools.lds.report FOLDER [--benchmarks BENCHMARKS.md] [--figure PATH] [--notes FILE]"""
    import argparse
    import json
    import shutil

    ap = argparse.ArgumentParser(prog="python -m tools.lds.report", description=main.__doc__)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--benchmarks", type=Path)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--notes", type=Path, help="markdown appended to the section")
    ap.add_argument("--command", default=None, help="the command that produced the folder (for the section)")
    args = ap.parse_args(argv)
    report = json.loads((args.folder / "lds.json").read_text())
    write_outputs(report, args.folder)
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.folder / "lds_sweep.png", args.figure)
    if args.benchmarks:
        command = args.command or f"nice -n 19 .venv/bin/python -m tools.lds.run --config {report['config']['name']}"
        again = ["python -m tools.lds.report", report["folder"]]
        if args.figure:
            again += ["--figure", args.figure.as_posix()]
        if args.notes:
            again += ["--notes", args.notes.as_posix()]
        command += "\n" + " ".join(again + ["--benchmarks", args.benchmarks.as_posix()])
        notes = args.notes.read_text() if args.notes else ""
        write_benchmarks_section(args.benchmarks, report, command=command, figure=args.figure, notes=notes)
    print(markdown_table(report))
    print()
    print(difference_table(report))
    print()
    print(sweep_table(report))


if __name__ == "__main__":
    main()
