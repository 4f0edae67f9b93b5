#!/usr/bin/env python
"""Where the conv re-scoring path's time goes, and what two routes past it give (measured, one run).

    python tools/bench_conv_routes.py --images 600 --repeats 3

On real 32x32 crops (the demo corpus), one noised query, p = 7, t = 100, the interior class only (two
thirds of the positions, most of the work), each stage timed alone over ``--images`` candidates in the
groups the product uses (``masses.CONV_CACHE_BYTES`` of output per convolution):

- ``convolution``: the fp32 product of the candidates by the query patches in each of the two layouts
  ``scoring/conv_layout.py`` chooses between at run time: oneDNN's direct convolution, and the group's
  patches cut into rows times the filters in one MKL sgemm (the cut included), with its GFLOP/s against
  this process's fp32 GEMM rate (4096^3);
- ``+ norms, clamp, exp, sum, count``: what ``masses._interior_conv`` does on each group without topk, in
  each layout (forced through NDA_ANN_CONV_LAYOUT);
- ``+ topk selection``: the same with topk 100 (the rows it must select, gathered and partitioned);
- route 1, ``bfloat16 convolution``: the same convolution in bfloat16 (the stored pixels are exact in
  bfloat16; the query patches are not, and oneDNN writes the output in bfloat16, so its logits are off by
  the deviation shown, far beyond the 1e-4 the scores need);
- route 2, ``compiled output pass``: the norms, clamp, exp, sum and count fused into one loop by
  ``torch.compile`` (inductor's C++ backend; needs a compiler), after the fp32 convolution; its first
  call's compile time is reported apart;
- route 3, ``bfloat16 hi/lo convolution``: the convolution under oneDNN's bfloat16 fpmath mode (AMX tiles
  where the CPU has them, AVX512-BF16 otherwise), kept exact to about 2^-17: the input is the integer
  pixels (exact in bfloat16), each held twice along the channels, and the filters are the query patches
  times s / 127.5 split into a bfloat16 high half and the bfloat16 rest, so the sum over channels adds
  both halves in fp32; the width is unfolded into the channels first (21 x 2 channels, 7 x 1 filters:
  oneDNN's AMX kernel is slow on 3 channels); the -s sum(q) term of the pixel offset goes into the bias.
  A second row splits the filters in three bfloat16 parts (about 2^-25, fp32's own rounding).

Each row runs ``--repeats`` times interleaved; the table keeps the fastest. Deviations are of the
(n, R) full sums, as a share of the largest, against the product's own pass (direct layout).

``--index INDEX``: also end to end for whole queries (the crops queries of tools/scale_corpora.py,
defaults, topk 100), A B C A B C in one process: the product in each layout, and route 2 swapped into
``masses._interior_conv`` (the rows topk must select are recomputed from the kept convolution output).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_md import machine, simd, update_section  # noqa: E402
from nda_ann import demo_corpus  # noqa: E402
from nda_ann.corpus.store import uint8_to_float  # noqa: E402
from nda_ann.scoring import masses  # noqa: E402
from nda_ann.scoring.conv_layout import direct_product, forced_layout, layout_for, unfold_product  # noqa: E402
from nda_ann.scoring.masses import CEIL, CONV_CACHE_BYTES, TOPK_TAU, max_logits  # noqa: E402
from nda_ann.scoring.operands import CandidateOperand, QueryOperand  # noqa: E402
from nda_ann.scoring.patches import extract_patches, layout_groups  # noqa: E402
from nda_ann.scoring.scales import Scale  # noqa: E402
from nda_ann.scoring.schedule import NoiseSchedule, noise_images  # noqa: E402
from bench_rescore import gemm_rate  # noqa: E402

FLOOR = masses.FLOOR[torch.float32]


def output_pass(out: torch.Tensor, norms: torch.Tensor, inv: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (n, R, G, G) convolution output, norms (n, 1, G, G) -> (full (n, R), count above TOPK_TAU (n, R))."""
    w = (out - inv * norms).clamp(FLOOR, CEIL).exp()
    return w.sum((2, 3)), (w > TOPK_TAU).sum((2, 3))


def route2_interior(compiled):
    """masses._interior_conv with route 2's output pass (same arguments and result)."""

    def interior(query, cand, topk):
        c = cand.conv
        weight, bias = query.conv_filters(c.pooled.shape[1])
        r, g = weight.shape[0], c.norms.shape[-1]
        step = max(1, CONV_CACHE_BYTES // (r * g * g * c.pooled.element_size()))
        full = torch.empty((cand.n, r), dtype=c.pooled.dtype)
        agg = full if topk is None or topk >= g * g else torch.empty_like(full)
        for lo in range(0, cand.n, step):
            hi = min(lo + step, cand.n)
            out = F.conv2d(c.pooled[lo:hi], weight, bias, dilation=c.factor)  # (n', R, G, G)
            f, count = compiled(out, c.norms[lo:hi], query.inv)
            full[lo:hi] = f
            if agg is full:
                continue
            agg[lo:hi] = f
            rows = ((f > topk * TOPK_TAU) & (count > topk)).nonzero(as_tuple=True)
            if len(rows[0]):
                w = (out[rows] - query.inv * c.norms[lo + rows[0], 0]).clamp_(FLOOR, CEIL).exp_()
                agg[lo + rows[0], rows[1]] = masses._topk_of(w.reshape(len(rows[0]), -1), topk)
        return full.T, agg.T

    return interior


def widen(x: torch.Tensor, m: int) -> torch.Tensor:
    """x (n, C, H, W) -> (n, C m, H, W - m + 1): channel c m + j holds x[c, :, w + j] (route 3's input)."""
    n, ch, h, w = x.shape
    return x.unfold(3, m, 1).permute(0, 1, 4, 2, 3).reshape(n, ch * m, h, w - m + 1)


def route3_operands(images: torch.Tensor, s: float, weight: torch.Tensor, bias: torch.Tensor, parts: int = 2
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (n, C, H, W) of s y with y = u / 127.5 - 1, filters (R, C, m, m) and bias (R,) of the product
    -> (input (n, k C m, H, W - m + 1) of the integer pixels u k times, filters (R, k C m, m, 1) of the k
    bfloat16 parts of the scaled filters, bias (R,)); k = ``parts``."""
    m = weight.shape[-1]
    pixels = torch.round((images / s + 1.0) * 127.5)
    rest, split = weight * (s / 127.5), []
    for _ in range(parts):
        split.append(rest.bfloat16().float())
        rest = rest - split[-1]
    flat = [w.permute(0, 1, 3, 2).reshape(w.shape[0], -1, m, 1) for w in split]
    wide = widen(pixels, m)
    return (torch.cat([wide] * parts, 1).contiguous(memory_format=torch.channels_last), torch.cat(flat, 1).contiguous(),
            bias - s * weight.sum((1, 2, 3)))


def end_to_end(index: Path, compiled, queries_n: int, repeats: int) -> dict[str, float]:
    """Fastest mean seconds per query of the product in each layout and of route 2 on ``index`` (A B C A B C ...)."""
    from bench_scale import open_warm
    from scale_corpora import queries

    att = open_warm(index)
    images, _, _ = queries(None, "crops")
    product = masses._interior_conv
    paths = {"product, direct layout": (product, "direct"), "product, unfold layout": (product, "unfold"),
             "route 2 (compiled output pass, direct layout)": (route2_interior(compiled), "direct")}
    best = {name: float("inf") for name in paths}
    try:
        for name, (fn, layout) in paths.items():  # warm-up (and route 2's compile)
            masses._interior_conv = fn
            with forced_layout(layout):
                att.attribute(images[:1], 100, topk=100)
        for _ in range(repeats):
            for name, (fn, layout) in paths.items():
                masses._interior_conv = fn
                with forced_layout(layout):
                    t0 = time.perf_counter()
                    for q in range(1, 1 + queries_n):
                        att.attribute(images[q : q + 1], 100, topk=100)
                    best[name] = min(best[name], (time.perf_counter() - t0) / queries_n)
                print(name, best[name], flush=True)
    finally:
        masses._interior_conv = product
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--index", type=Path, default=None, help="also time route 2 end to end on this index")
    ap.add_argument("--queries", type=int, default=3, help="end to end: queries per timed run")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tag", default="", help="a section of its own for this run (e.g. another machine's), beside the earlier one")
    args = ap.parse_args()

    dc = demo_corpus(n_train=args.images, n_queries=1, seed=0)
    sched = NoiseSchedule("linear")
    s, sigma2 = sched.signal_and_noise(args.t)
    inv = 1.0 / (2.0 * sigma2)
    images = uint8_to_float(dc.train) * s
    sc = Scale.parse("7")
    groups = layout_groups(32, sc)
    qp = extract_patches(noise_images(uint8_to_float(dc.queries), args.t, sched, 0, 0), sc)  # (1, L, D)
    query = QueryOperand(qp, groups, inv, max_logits(qp, images[:16], sc, groups, inv))
    cand = CandidateOperand.build(images, sc, groups, inv, 1, conv=True)
    c = cand.conv
    weight, bias = query.conv_filters(c.pooled.shape[1])
    r, g = weight.shape[0], c.norms.shape[-1]
    step = max(1, CONV_CACHE_BYTES // (r * g * g * 4))
    spans = [(lo, min(lo + step, cand.n)) for lo in range(0, cand.n, step)]
    pooled16, weight16, bias16 = c.pooled.bfloat16(), weight.bfloat16(), bias.bfloat16()
    compiled = torch.compile(output_pass, dynamic=False)

    def conv_split(parts: int):
        wide, weight3, bias3 = route3_operands(c.pooled, s, weight, bias, parts)

        def run():
            previous = torch.backends.mkldnn.conv.fp32_precision
            torch.backends.mkldnn.conv.fp32_precision = "bf16"
            try:
                return torch.cat([F.conv2d(wide[lo:hi], weight3, bias3).sub_(inv * c.norms[lo:hi]).clamp_(FLOOR, CEIL)
                                  .exp_().sum((2, 3)) for lo, hi in spans])
            finally:
                torch.backends.mkldnn.conv.fp32_precision = previous

        return run

    def product_only(layout_product):
        def run():
            for lo, hi in spans:
                layout_product(c.pooled[lo:hi], weight, bias, c.factor)
        return run

    def conv_bf16():
        return torch.cat([F.conv2d(pooled16[lo:hi], weight16, bias16).float().sub_(inv * c.norms[lo:hi]).clamp_(FLOOR, CEIL)
                          .exp_().sum((2, 3)) for lo, hi in spans])

    def product(topk, layout):
        def run():
            with forced_layout(layout):
                return masses._interior_conv(query, cand, topk)[0].T
        return run

    def fused():
        return torch.cat([compiled(F.conv2d(c.pooled[lo:hi], weight, bias), c.norms[lo:hi], inv)[0] for lo, hi in spans])

    t0 = time.perf_counter()
    fused()
    compile_s = time.perf_counter() - t0
    base_name = "+ norms, clamp, exp, sum, count (the product, no topk), direct layout"
    stages = {"convolution (fp32, oneDNN direct)": product_only(direct_product),
              "convolution as unfold + one fp32 GEMM (MKL sgemm, the cut included)": product_only(unfold_product),
              base_name: product(None, "direct"),
              "+ norms, clamp, exp, sum, count (the product, no topk), unfold layout": product(None, "unfold"),
              "+ topk 100 selection (the product), direct layout": product(100, "direct"),
              "+ topk 100 selection (the product), unfold layout": product(100, "unfold"),
              "route 1: bfloat16 convolution, then the same passes": conv_bf16,
              "route 2: fp32 convolution + compiled output pass": fused,
              "route 3: bfloat16 hi/lo convolution (oneDNN bf16 fpmath), then the same passes": conv_split(2),
              "route 3 with three bfloat16 parts": conv_split(3)}
    best = {name: float("inf") for name in stages}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in stages.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = outs[base_name].double()
    base = best[base_name]
    peak = gemm_rate(torch.float32, 4096)
    flops = 2.0 * args.images * g * g * r * c.pooled.shape[1] * weight.shape[-1] ** 2  # the product alone
    with forced_layout("auto"):
        auto = layout_for(c.pooled[: spans[0][1]], weight, c.factor)
    rows = []
    for name in stages:
        out = outs[name]
        dev = "" if out is None else f"{float((out.double() - ref).abs().max() / ref.abs().max()):.1e}"
        gflops = f"{flops / best[name] / 1e9:.0f} ({flops / best[name] / peak:.2f})" if name.startswith("convolution") else ""
        rows.append((name, args.images / best[name], best[name] / args.images * 1e3, base / best[name], gflops, dev))
        print(rows[-1], flush=True)
    lines = [f"## Routes past the conv path{', ' + args.tag if args.tag else ''} (tools/bench_conv_routes.py)", "",
             f"`python tools/bench_conv_routes.py --images {args.images} --repeats {args.repeats}"
             f"{f' --tag {args.tag!r}' if args.tag else ''}` on {machine()}; {simd()}.",
             f"One query, t = {args.t}, p = 7, {args.images} real 32x32 crops, the interior class ({r} query rows x "
             f"{g * g} positions per image), {step} images per convolution; fastest of {args.repeats} interleaved runs. "
             f"Compile time of route 2's first call: {compile_s:.1f} s. This process's fp32 GEMM rate (4096^3): "
             f"{peak / 1e9:.0f} GFLOP/s; the layout `auto` chose here: **{auto}**.", "",
             "| stage | images / s per query | ms per image | speed against the product without topk, direct | "
             "product GFLOP/s (share of the GEMM rate) | max deviation of the full sums |",
             "|---|---|---|---|---|---|"]
    for name, rate, ms, speed, gflops, dev in rows:
        lines.append(f"| {name} | {rate:,.0f} | {ms:.3f} | {speed:.2f}x | {gflops} | {dev} |")
    if args.index is not None:
        e2e = end_to_end(args.index, torch.compile(output_pass), args.queries, 2)  # shapes vary: dynamic after the first recompile
        lines += ["", f"End to end on `{args.index.name}` (`--index`; crops queries 1-{args.queries}, defaults, topk 100, "
                  "fastest of 2 interleaved runs), seconds per query: "
                  + "; ".join(f"{name} {sec:.2f}" for name, sec in e2e.items()) + "."]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        update_section("conv_routes" + ("_" + args.tag.replace(" ", "_") if args.tag else ""), body)


if __name__ == "__main__":
    main()
