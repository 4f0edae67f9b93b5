#!/usr/bin/env python
"""Throughput of the exact re-scoring: candidate images re-scored per second for one query.

    python tools/bench_rescore.py --images 600 --repeats 3

Measures, side by side in one process on real 32x32 photo crops (p = 7, and the two-scale 14 and 10:2; topk 100 and none):
- ``log_masses``: the previous kernel (scoring/dense.py): GEMM, then max / subtract / clamp / exp /
  sum / log passes, numpy partition of every row for topk;
- ``shifted``: scoring/masses.py, the product that yields shifted logits, one clamp + exp + sum pass,
  topk selection only on rows that can differ from their full sum; on each path of scoring/operands.py:
  ``dense`` (the interior patches cut by ``unfold``, one GEMM), the ``bfloat16 screen``, and ``conv`` (the
  interior class as one convolution of the candidate images by the query patches, the CPU default), the
  latter in each of its two layouts (scoring/conv_layout.py, forced through NDA_ANN_CONV_LAYOUT: oneDNN's
  direct convolution, or the group's patches cut into rows and one sgemm), and as ``auto`` picks (the default);
and this machine's GEMM rate (fp32, plus bf16 and int8 for reference), so that each path's useful
GEMM work (2 x sum over layout classes of |class|^2 x D per image) reads as a share of the peak.
Each path runs ``--repeats`` times interleaved (A B A B ...); the table keeps the fastest of each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_md import machine, simd, update_section  # noqa: E402
from nda_ann import demo_corpus  # noqa: E402
from nda_ann.corpus.store import uint8_to_float  # noqa: E402
from nda_ann.scoring.conv_layout import forced_layout, layouts_chosen  # noqa: E402
from nda_ann.scoring.dense import chunk_size, log_masses  # noqa: E402
from nda_ann.scoring.masses import MassScan, max_logits  # noqa: E402
from nda_ann.scoring.patches import extract_patches, layout_groups  # noqa: E402
from nda_ann.scoring.scales import Scale  # noqa: E402
from nda_ann.scoring.schedule import NoiseSchedule, noise_images  # noqa: E402


def gemm_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """Best ops/s of a size^3 matrix product in ``dtype`` (int8 through torch._int_mm)."""
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        f = lambda: torch._int_mm(a, a)  # noqa: E731
    else:
        a = torch.randn(size, size).to(dtype)
        f = lambda: a @ a  # noqa: E731
    f()
    best = min(_timed(f) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def old_path(qp, images, sc, groups, s, inv, topk, step):
    """The previous re-scoring kernel: log masses per chunk, then logsumexp."""
    fulls, aggs = [], []
    for lo in range(0, len(images), step):
        full, agg = log_masses(qp, extract_patches(images[lo : lo + step] * s, sc), groups, inv, topk)
        fulls.append(torch.logsumexp(full, -1))
        aggs.append(agg[0])
    log_z = torch.logsumexp(torch.stack(fulls), 0)[0]
    return torch.exp(torch.cat(aggs, -1) - log_z[:, None]).sum(0)


def new_path(qp, images, sc, groups, s, inv, topk, step, path="dense", layout=None):
    """scoring/masses.py: shifted masses per chunk on kernel ``path`` (dense, screened or conv; the conv
    interior ``layout`` direct or unfold forced, None: as chosen at run time)."""
    with forced_layout(layout):
        return _new_path(qp, images, sc, groups, s, inv, topk, step, path)


def _new_path(qp, images, sc, groups, s, inv, topk, step, path):
    scan, z, aggs = None, 0.0, []
    for lo in range(0, len(images), step):
        imgs = images[lo : lo + step] * s
        if scan is None:
            scan = MassScan(qp, groups, inv, max_logits(qp, imgs[:16], sc, groups, inv), topk, sc, path)
        full, agg, rescale = scan.add(imgs)
        if rescale is not None:
            z = z * rescale[0]
            aggs = [a * rescale[0][:, None] for a in aggs]
        z = z + full[0].sum(-1)
        aggs.append(agg[0])
    return (torch.cat(aggs, -1) / z[:, None]).sum(0)


def useful_flops(groups, dim: int) -> int:
    """GEMM flops of one query against one image: 2 x sum over classes of |class|^2 x D."""
    return 2 * sum(len(g) ** 2 for g in groups) * dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="candidate images re-scored per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--budget", default="512M")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tag", default="", help="a section of its own for this run (e.g. another machine's), beside the earlier one")
    args = ap.parse_args()
    os.environ.pop("NDA_ANN_CONV_LAYOUT", None)  # the rows force each layout; auto is what the CPU default picks
    from nda_ann.units import parse_bytes

    dc = demo_corpus(n_train=args.images, n_queries=1, seed=0)
    images, query = uint8_to_float(dc.train), uint8_to_float(dc.queries)
    s, sigma2 = NoiseSchedule("linear").signal_and_noise(args.t)
    inv = 1.0 / (2.0 * sigma2)
    noisy = noise_images(query, args.t, NoiseSchedule("linear"), 0, 0)
    peaks = {name: gemm_rate(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8))}
    rows = []
    for scale in ("7", "14", "10:2"):
        sc = Scale.parse(scale)
        groups = layout_groups(32, sc)
        qp = extract_patches(noisy, sc)
        step = chunk_size(1, groups, torch.float32, parse_bytes(args.budget))
        flops = useful_flops(groups, sc.dim(3))
        for topk in (100, None):
            paths = {"log_masses (previous)": old_path, "shifted, dense (unfold + GEMM)": new_path,
                     "shifted, bfloat16 screen": lambda *a: new_path(*a, path="screened"),
                     "shifted, conv, direct layout": lambda *a: new_path(*a, path="conv", layout="direct"),
                     "shifted, conv, unfold layout": lambda *a: new_path(*a, path="conv", layout="unfold"),
                     "shifted, conv (CPU default: the layout auto picks)": lambda *a: new_path(*a, path="conv")}
            best = {name: float("inf") for name in paths}
            outs = {}
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    outs[name] = fn(qp, images, sc, groups, s, inv, topk, step)
                    best[name] = min(best[name], time.perf_counter() - t0)
            ref = outs["log_masses (previous)"].double()
            for name in paths:
                rate = args.images / best[name]
                err = float((outs[name].double() - ref).abs().max() / ref.abs().max())
                rows.append((scale, topk, name, rate, rate * flops / peaks["fp32"], err, best["log_masses (previous)"] / best[name]))
                print(rows[-1], flush=True)
    auto = ", ".join(layouts_chosen()) or "-"
    if args.no_write:
        return
    lines = [f"## Re-scoring throughput{', ' + args.tag if args.tag else ''} (tools/bench_rescore.py)", "",
             f"`python tools/bench_rescore.py --images {args.images} --repeats {args.repeats}"
             f"{f' --tag {args.tag!r}' if args.tag else ''}` on {machine()}; {simd()}.",
             f"One query, t = {args.t}, {args.images} real 32x32 crops re-scored per call (float32), fastest of {args.repeats} interleaved runs. "
             f"The CPU default is the conv path in the layout `auto` picks here (timed per shape): **{auto}**.",
             f"GEMM rate of this process (2048^3): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, "
             f"int8 {peaks['int8'] / 1e9:.0f} GOP/s. 'Share of fp32 GEMM' = useful GEMM flops per second / the fp32 rate.", "",
             "| scale | topk | kernel | images / s per query | share of fp32 GEMM | max deviation from previous (share of largest score) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for scale, topk, name, rate, share, err, speed in rows:
        lines.append(f"| {scale} | {topk or '-'} | {name} | {rate:,.0f} | {share:.2f} | {err:.1e} | {speed:.2f}x |")
    update_section("bench_rescore" + ("_" + args.tag.replace(" ", "_") if args.tag else ""), "\n".join(lines))


if __name__ == "__main__":
    main()
