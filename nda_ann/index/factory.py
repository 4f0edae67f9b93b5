"""Choice of the FAISS index of each layout class: ``auto`` rules or an explicit factory string.

``auto`` (n = vectors of the class, N = vectors of the whole scale, d = dimension, B = memory budget):

1. exact ``Flat`` when n <= 100k, or n <= 2M and either the whole scale in float32 fits in B/2 or
   the class alone fits in B/32;
2. ``IVF{nlist},Flat`` when n <= 20M and the scale in float32 fits in B/2, else ``IVF{nlist},SQ8``;
3. above 20M, a rotation to a PQ-friendly width then 4-bit fast-scan PQ:
   ``OPQ32_128,IVF{nlist},PQ32x4fs`` for d >= 128 (147 = 3 x 7 x 7 splits badly into sub-vectors).

nlist is the power of two nearest 4 * sqrt(n) (at most n / 39); k-means trains on 64 points per
centroid (bounded to [39, 256] and by B/8).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import faiss

from ..errors import InputError

FLAT_SMALL = 100_000
FLAT_MAX = 2_000_000
IVF_MAX = 20_000_000
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below 39
POINTS_PER_CENTROID = 64
MAX_POINTS_PER_CENTROID = 256
HNSW_FROM = 4096
IVF_ID_BYTES = 8  # FAISS inverted lists store an int64 label next to every code


@dataclass(frozen=True)
class ClassSpec:
    """What one layout class is built with."""

    factory: str       # the FAISS factory string, nlist filled in
    tier: str          # flat | ivf-flat | ivf-sq8 | ivf-pq-fastscan | explicit
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
    """Lists probed by default: nlist / 64, within [16, 256].

    Measured (BENCHMARKS.md): IVF2048,Flat over 406k real 7x7 patches, noisy t = 100 queries,
    100-recall@100 = 0.93 / 0.98 / 0.996 at nprobe 8 / 16 / 32.
    """
    return int(min(nlist, max(16, min(256, nlist // 64))))


def train_size_for(n: int, nlist: int, d: int, budget: int) -> int:
    """Training points: 64 per centroid, at least 39 (FAISS's floor), at most 256 and B/8 bytes, at most n."""
    by_budget = budget // 8 // (4 * d)
    size = min(POINTS_PER_CENTROID * nlist, max(MIN_POINTS_PER_CENTROID * nlist, by_budget))
    return int(min(n, size, MAX_POINTS_PER_CENTROID * nlist))


def pq_factory(d: int) -> str:
    """PCA to 64 dims, then 8-bit PQ with 2 dims per sub-quantizer (32 bytes + 8-byte label)."""
    if d <= 64:
        return "IVF{nlist},SQ8"
    return "PCA64,IVF{nlist},PQ32"


def with_quantizer(factory: str, nlist: int) -> str:
    """Fill in nlist; use an HNSW32 coarse quantizer from 4096 lists on (flat assignment costs nlist * d)."""
    return factory.replace("{nlist}", f"{nlist}_HNSW32" if nlist >= HNSW_FROM else str(nlist))


def auto_factory(n: int, n_scale: int, d: int, budget: int) -> str:
    """The ``auto`` factory template (with a ``{nlist}`` field when IVF) for one class."""
    raw_scale_fits = 4 * d * n_scale <= budget // 2
    if n <= FLAT_SMALL or (n <= FLAT_MAX and (raw_scale_fits or 4 * d * n <= budget // 32)):
        return "Flat"
    if n <= IVF_MAX:
        return "IVF{nlist},Flat" if raw_scale_fits else "IVF{nlist},SQ8"
    return pq_factory(d)


def make_index(factory: str, d: int) -> faiss.Index:
    """faiss.index_factory with a clear error for a string FAISS does not know."""
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise InputError(None, f"unknown or unusable FAISS factory string {factory!r} for dimension {d} ({first}); "
                         "see https://github.com/facebookresearch/faiss/wiki/The-index-factory or use --factory auto") from err


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
    if last == "SQ8":
        return "ivf-sq8"
    if last.endswith("fs"):
        return "ivf-pq-fastscan"
    return "explicit"


def class_spec(n: int, n_scale: int, d: int, budget: int, factory: str = "auto") -> ClassSpec:
    """The spec of a class of ``n`` vectors (``n_scale`` at the whole scale) of dimension ``d``."""
    explicit = factory != "auto"
    template = auto_factory(n, n_scale, d, budget) if not explicit else factory
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
            return class_spec(n, n_scale, d, budget, "Flat")
    train = 0
    if not index.is_trained:
        train = train_size_for(n, nlist, d, budget) if nlist else min(n, 256 * 256)
    tier = tier_of(text) if not explicit or text == "Flat" else "explicit"
    exact = text == "Flat"
    return ClassSpec(text, tier, nlist, default_nprobe(nlist) if nlist else 0, code_bytes(index), train, exact)
