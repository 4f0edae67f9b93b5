"""Choice of the FAISS index of each layout class: ``auto`` rules or an explicit factory string.

``auto``, per scale (n = vectors of a class, N = vectors of the scale, d = dimension, B = budget):

1. exact ``Flat``: when the scale in float32 (4 d N) fits in B/2, every class of n <= 65,536; else
   the smallest such classes, whole groups of equal size smallest first, while their float32 fits
   in B/4. Past 65,536 vectors exhaustive search is what a query pays for: at 5,000 images of
   32 x 32, p = 7, the 12 edge classes (130k vectors each) searched exactly took 0.3 s of a
   1.2 s query, while an IVF probing 32 of its 1,024 lists scans 1/32 of them;
2. other classes with n <= 20M: at a pixel-grid scale (f = 1) ``IVF{nlist},SQ8pixel``: 8-bit
   codes whose 256 levels are the 256 pixel values u / 127.5 - 1 (and 0 on out-of-image and padded
   dims), so coding is lossless and distances are exact to float rounding, at 168 bytes per
   vector against IVF-Flat's 596 (``set_pixel_ranges``). At 5,000 images (3.4M interior vectors, IVF8192,
   nprobe 32, 676 queries, k = 1,024) one SQ8pixel shard searched in 0.157 s where IVF-Flat took
   0.234 s in the two shards its 3.5x larger codes need (0.182 s as one shard). At f > 1 entries
   are sums of pixels (1,021 levels): ``IVF{nlist},Flat`` when 4 d N fits in B/2, else lossy
   ``IVF{nlist},SQ8``. SQ codes are on vectors zero-padded to a multiple of 16 dims (``Pad160`` at
   d = 147; distances unchanged): FAISS scans SQ codes with SIMD only when d is a multiple of 8 or
   16, and at d = 147 its scalar fallback took 1.07 s where Pad160 took 0.21 s (676 queries,
   k = 1,024, nprobe 32 of 1,024 lists over 400k vectors, 2 cores; IVF-Flat: 0.31 s);
3. above 20M, ``PCA64,IVF{nlist},PQ32np``: PCA to 64 dims (147 = 3 x 7 x 7 splits badly into
   sub-vectors), 8-bit PQ with 2 dims per sub-quantizer, 32 bytes + the 8-byte IVF label.

Measured on 406k real 7x7 patches with noisy (t = 100) queries, 100-recall@100 against Flat
(tools/bench_build.py --recall):
IVF-Flat 0.996 (nprobe 32 of 2048), SQ8 0.94, PCA64+PQ32 0.81, PCA96+PQ48 0.86, while 4-bit
fast-scan PQ (OPQ32_128 or PCA64, PQ32x4fs or PQ64x4fs) stayed at 0.10-0.27: its quantised
look-up tables cannot separate the near-equal distances of noisy queries, so auto never picks it.

nlist is the power of two nearest 4 * sqrt(n) (at most n / 39), with an HNSW32 coarse quantizer
from 4096 lists on; k-means trains on 64 points per centroid (bounded to [39, 256] and by B/8).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import faiss
import numpy as np

from ..errors import InputError

FLAT_MAX = 65_536
IVF_MAX = 20_000_000
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below 39
POINTS_PER_CENTROID = 64
MAX_POINTS_PER_CENTROID = 256
HNSW_FROM = 4096
IVF_ID_BYTES = 8  # FAISS inverted lists store an int64 label next to every code
SIMD_DIMS = 16  # FAISS scans SQ codes with SIMD only when d is a multiple of 8 (AVX2) / 16 (AVX-512)
PIXEL_CODES = "SQ8pixel"  # our factory token: FAISS SQ8, not by residual, levels = pixel values


@dataclass(frozen=True)
class ClassSpec:
    """What one layout class is built with."""

    factory: str       # the FAISS factory string, nlist filled in
    tier: str          # flat | ivf-flat | ivf-sq8-pixel | ivf-sq8 | ivf-pq | ivf-pq-fastscan | explicit
    nlist: int         # 0 when not an IVF index
    nprobe: int        # default lists probed at search time (0 when not IVF)
    code_bytes: int    # bytes stored per vector (codes plus IVF label)
    train_size: int    # training vectors (0 when untrained)
    exact: bool        # exhaustive search on uncompressed vectors

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ClassSpec":
        return cls(**obj)


def parse_memory(value: str | int | float) -> int:
    """'8G', '512M', '1.5GB', '2T' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise InputError(None, f"memory budget must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(value), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise InputError(None, f"not a memory size: {value!r}; write e.g. 8G, 512M or 1.5G")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def auto_nlist(n: int) -> int:
    """Power of two nearest 4 * sqrt(n), at least 1 and at most n / 39."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def default_nprobe(nlist: int) -> int:
    """Lists probed by default: 32 (all of them below 32 lists).

    A constant, so that with nlist ~ 4 sqrt(n) the vectors scanned grow as sqrt(n), not as n: at
    20,000 images (IVF16384 interior) nlist / 256 = 64 lists made a query 4.8 s, 32 lists 3.0 s.
    Attribution needs candidate images, not every neighbour (BENCHMARKS.md
    "bench_attribute_fidelity_5000"): on 5,000 crops (IVF8192 interior) at t = 100, K = 1,024,
    M = 500, nprobe 16 / 32 / 64 gave top-10 overlap 0.98 / 0.98 / 1.00 and subset-sum Spearman
    0.999 / 0.999 / 1.000. Recall (tools/bench_build.py --recall): IVF2048,Flat over 406k real 7x7
    patches, noisy t = 100 queries, 100-recall@100 = 0.93 / 0.98 / 0.996 at nprobe 8 / 16 / 32.
    """
    return int(min(nlist, 32))


def train_size_for(n: int, nlist: int, d: int, budget: int) -> int:
    """Training points: 64 per centroid, at least 39 (FAISS's floor), at most 256 and B/8 bytes, at most n."""
    by_budget = budget // 8 // (4 * d)
    size = min(POINTS_PER_CENTROID * nlist, max(MIN_POINTS_PER_CENTROID * nlist, by_budget))
    return int(min(n, size, MAX_POINTS_PER_CENTROID * nlist))


def pq_factory(d: int) -> str:
    """PCA to 64 dims, then 8-bit PQ with 2 dims per sub-quantizer (32 bytes + 8-byte label).

    ``np``: no polysemous training (it only serves Hamming filtering, and costs minutes).
    """
    if d <= 64:
        return sq8_factory(d)
    return "PCA64,IVF{nlist},PQ32np"


def sq8_factory(d: int, codes: str = "SQ8") -> str:
    """IVF with SQ8 (or ``PIXEL_CODES``) codes, the vectors zero-padded to a multiple of SIMD_DIMS
    (rule 2 of the module docstring): the padded dims are 0 in every vector and query, so distances
    are unchanged."""
    padded = -(-d // SIMD_DIMS) * SIMD_DIMS
    return f"IVF{{nlist}},{codes}" if padded == d else f"Pad{padded},IVF{{nlist}},{codes}"


def pixel_codes(factory: str) -> bool:
    """Whether a factory string asks for lossless pixel-level codes (``PIXEL_CODES``)."""
    return factory.split(",")[-1] == PIXEL_CODES


def set_pixel_ranges(index: faiss.Index, zero_dims: np.ndarray) -> None:
    """Make the SQ8 codes of a ``PIXEL_CODES`` index lossless (call after ``train``).

    FAISS's 8-bit SQ decodes code c of dim j as vmin_j + (c + 0.5) / 255 * vdiff_j. With
    vmin = -1 - 1/255 and vdiff = 2, code u decodes to u / 127.5 - 1: the stored pixel u itself
    (to one float32 ulp), and encoding x = u / 127.5 - 1 gives back u. Dims that are 0 in every
    vector (``zero_dims``, indices into the index's input dims: out-of-image pixels of the layout
    class) and the padded dims get vmin = -1/255, where code 0 decodes to 0.
    """
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if not isinstance(ivf, faiss.IndexIVFScalarQuantizer) or ivf.sq.qtype != faiss.ScalarQuantizer.QT_8bit:
        raise InputError(None, f"{PIXEL_CODES} needs an IVF index with SQ8 codes, got {type(ivf).__name__}")
    d = ivf.d
    vmin = np.full(d, -1.0 - 1.0 / 255.0, dtype=np.float32)
    vdiff = np.full(d, 2.0, dtype=np.float32)
    zero = np.zeros(d, dtype=bool)
    zero[np.asarray(zero_dims, dtype=np.int64)] = True
    zero[index.d:] = True  # padding (Pad{d'}): inputs have index.d dims, codes ivf.d
    vmin[zero] = -1.0 / 255.0
    faiss.copy_array_to_vector(np.concatenate([vmin, vdiff]), ivf.sq.trained)


def check_pixel_grid(x: np.ndarray, what: str) -> np.ndarray:
    """Dims of ``x`` (n, d) that are 0 in every row; raises unless every other entry is a pixel value
    u / 127.5 - 1 (u in 0..255), the only values ``PIXEL_CODES`` code losslessly."""
    zero = ~np.any(x != 0, axis=0)
    level = (x[:, ~zero].astype(np.float64) + 1.0) * 127.5
    off = np.abs(level - np.rint(level))
    if off.size and (off.max() > 1e-3 or level.min() < -1e-3 or level.max() > 255 + 1e-3):
        raise InputError(None, f"{what}: {PIXEL_CODES} codes only pixel values u / 127.5 - 1 (scales with "
                               "factor 1 of a uint8 store); use an IVF,Flat or IVF,SQ8 factory for these vectors")
    return np.nonzero(zero)[0]


def with_quantizer(factory: str, nlist: int) -> str:
    """Fill in nlist; use an HNSW32 coarse quantizer from 4096 lists on (flat assignment costs nlist * d)."""
    return factory.replace("{nlist}", f"{nlist}_HNSW32" if nlist >= HNSW_FROM else str(nlist))


def flat_classes(sizes: Sequence[int], d: int, budget: int) -> list[bool]:
    """Which classes of a scale ``auto`` keeps exact (rule 1 of the module docstring)."""
    if 4 * d * sum(sizes) <= budget // 2:
        return [n <= FLAT_MAX for n in sizes]
    out, used = [False] * len(sizes), 0
    for n in sorted(set(sizes)):
        group = [i for i, m in enumerate(sizes) if m == n]
        used += 4 * d * n * len(group)
        if n > FLAT_MAX or used > budget // 4:
            break
        for i in group:
            out[i] = True
    return out


def auto_factory(n: int, d: int, flat: bool, raw_fits: bool, pixel_grid: bool = False) -> str:
    """The ``auto`` factory template (with a ``{nlist}`` field when IVF) of one class;
    ``pixel_grid``: the scale's vectors are pixel values (f = 1), so SQ8 codes can be lossless."""
    if flat:
        return "Flat"
    if n <= IVF_MAX:
        if pixel_grid:
            return sq8_factory(d, PIXEL_CODES)
        return "IVF{nlist},Flat" if raw_fits else sq8_factory(d)
    return pq_factory(d)


def make_index(factory: str, d: int) -> faiss.Index:
    """faiss.index_factory with a clear error for a string FAISS does not know."""
    pixel = pixel_codes(factory)
    if pixel and not re.fullmatch(rf"(Pad\d+,)?IVF[^,]*,{PIXEL_CODES}", factory):
        raise InputError(None, f"factory {factory!r}: {PIXEL_CODES} codes the pixel values themselves, so it takes an IVF index "
                               f"with at most zero padding before it (IVF...,{PIXEL_CODES} or Pad160,IVF...,{PIXEL_CODES}); "
                               "a PCA or rotation would code other values")
    try:
        index = faiss.index_factory(d, factory[: -len(PIXEL_CODES)] + "SQ8" if pixel else factory, faiss.METRIC_L2)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise InputError(None, f"unknown or unusable FAISS factory string {factory!r} for dimension {d} ({first}); "
                         "see https://github.com/facebookresearch/faiss/wiki/The-index-factory or use --factory auto") from err
    if pixel:
        faiss.extract_index_ivf(index).by_residual = False  # code the vectors themselves, not residuals
    return index


def code_bytes(index: faiss.Index) -> int:
    """Bytes stored per vector: codes, plus the int64 label inverted lists keep."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.code_size) + IVF_ID_BYTES
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "code_size"):
        return int(inner.code_size)
    try:
        return int(index.sa_code_size())
    except RuntimeError:
        return 4 * index.d


def tier_of(factory: str) -> str:
    """A short name for what a factory string builds."""
    last = factory.split(",")[-1]
    if "IVF" not in factory:
        return "flat" if factory == "Flat" else "explicit"
    if last == "Flat":
        return "ivf-flat"
    if last == PIXEL_CODES:
        return "ivf-sq8-pixel"
    if last == "SQ8":
        return "ivf-sq8"
    if last.endswith("fs"):
        return "ivf-pq-fastscan"
    if last.startswith("PQ"):
        return "ivf-pq"
    return "explicit"


def class_specs(sizes: Sequence[int], d: int, budget: int, factory: str = "auto", pixel_grid: bool = False) -> list[ClassSpec]:
    """The specs of the classes of one scale, of ``sizes[i]`` vectors of dimension ``d`` each;
    ``pixel_grid``: the scale's vector entries are pixel values (factor 1)."""
    if pixel_codes(factory) and not pixel_grid:
        raise InputError(None, f"factory {factory!r}: {PIXEL_CODES} codes only pixel values, i.e. scales with factor 1; "
                               "a downscaled (f > 1) scale's entries are sums of pixels: use IVF...,SQ8 or IVF...,Flat")
    flat = flat_classes(sizes, d, budget)
    raw_fits = 4 * d * sum(sizes) <= budget // 2
    return [class_spec(n, d, budget, factory, f, raw_fits, pixel_grid) for n, f in zip(sizes, flat)]


def class_spec(n: int, d: int, budget: int, factory: str = "auto", flat: bool = False,
               raw_fits: bool = False, pixel_grid: bool = False) -> ClassSpec:
    """The spec of one class of ``n`` vectors; ``flat``, ``raw_fits`` and ``pixel_grid`` are the
    scale-level choices."""
    explicit = factory != "auto"
    template = auto_factory(n, d, flat, raw_fits, pixel_grid) if not explicit else factory
    if "IDMap" in template:
        raise InputError(None, f"factory {template!r}: IDMap is not needed (ids are layout-coded) and not supported")
    nlist = auto_nlist(n) if "{nlist}" in template else 0
    text = with_quantizer(template, nlist) if not explicit else template.replace("{nlist}", str(nlist))
    index = make_index(text, d)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nlist = int(ivf.nlist)
        if n < MIN_POINTS_PER_CENTROID * nlist:
            # Too few vectors to train this many lists: an exact index is both cheaper and better.
            return class_spec(n, d, budget, "Flat")
    train = 0
    if not index.is_trained:
        train = train_size_for(n, nlist, d, budget) if nlist else min(n, 256 * 256)
    tier = tier_of(text) if not explicit or text == "Flat" else "explicit"
    exact = text == "Flat"
    return ClassSpec(text, tier, nlist, default_nprobe(nlist) if nlist else 0, code_bytes(index), train, exact)
