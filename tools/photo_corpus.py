"""The photo corpus: 32x32 crops of hundreds of distinct photographs, with held-out photos and regions.

A corpus folder (written by tools/make_photo_corpus.py) holds ``photos/`` (every photograph at its
working resolution, as lossless PNG), ``corpus.json`` (the photo list with package, file, licence,
SHA-256s, training and held-out boxes, and which photos are held out) and the Parquet shards.
Queries are regenerated from the folder alone:

    import sys; sys.path.insert(0, "tools")
    from photo_corpus import photo_queries
    images, names, kinds = photo_queries(8, 8, seed=0, corpus="data/photo-corpus")

Two kinds of held-out query:

- ``unseen``: crops of whole photographs that no training crop comes from (``HOLDOUT_PHOTOS`` of
  the photos of every package, picked by a hash of the seed and the name);
- ``seen``: crops of the held-out strip (``HELDOUT_FRACTION`` of the right side, or of the bottom
  of a portrait photo) of the training photographs; training crops read only the rest.

A training crop takes an s x s window (s from ``SCALES``, in working pixels: the working image has
a 256-pixel short side, so a window covers an eighth to three eighths of it) inside the training
box, resizes it to the output size with Lanczos antialiasing (reading only the window's pixels),
flips it half the time and jitters brightness, contrast and saturation mildly.

Which photo a training crop comes from (``package_shares``, ``train_weights``): every training
photo is equally likely, whatever its size, except that no package supplies more than
``PACKAGE_CAP`` of the crops (stellarium-data's deep-sky images, 206 of the 332 training photos
on Debian 12, would otherwise supply 62% of them); what a capped package gives up goes to the
others in proportion to their photo counts (there, opencv-doc is then capped too), and a capped
package's photos stay equally likely among themselves. A flat crop or a repeat is redrawn
from the same photo, so the shares hold for the crops written, not only for the draws.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
from PIL import Image

from photo_finder import file_sha256

try:
    from nda_ann.corpus.demo_corpus import Box, Crop, finish_crop  # Box: a half-open pixel box, here in working-image coordinates
except ModuleNotFoundError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nda_ann.corpus.demo_corpus import Box, Crop, finish_crop

GENERATOR = "nda-ann make_photo_corpus v2"  # bump when the crop recipe changes: old shards then mismatch
HOLDOUT_PHOTOS = 0.1
HELDOUT_FRACTION = 0.2
SCALES: tuple[int, ...] = (32, 48, 64, 96)
PACKAGE_CAP = 0.25  # the largest share of the training crops one package may supply
MIN_STD = 3.0  # crops flatter than this (uint8 levels, mean per-channel std) are redrawn
QUERY_MIN_STD = 16.0  # queries are textured, so their attributions are worth a look
JITTER = ((0.9, 1.1), (0.9, 1.1), (0.85, 1.15))  # brightness, contrast, saturation factor ranges
PHOTO_TRIES = 100  # flat or repeated crops redrawn from one photo before another photo is drawn
DEFAULT_CORPUS = Path(os.environ.get("NDA_ANN_PHOTO_CORPUS", Path(__file__).resolve().parents[1] / "data" / "photo-corpus"))

Kind = Literal["seen", "unseen"]


@dataclass(frozen=True, eq=False)
class CorpusPhoto:
    """A photograph of the corpus at its working resolution, with its training and held-out boxes."""

    name: str
    package: str
    pixels: np.ndarray  # (H, W, 3) uint8
    train: Box | None  # None for a held-out (unseen) photo
    heldout: Box  # the held-out strip, or the whole photo when unseen

    @property
    def unseen(self) -> bool:
        return self.train is None

    def region(self, which: Literal["train", "heldout"]) -> Box:
        box = self.train if which == "train" else self.heldout
        if box is None:
            raise ValueError(f"{self.name} is held out whole: it has no training region")
        return box


def _hash01(*parts: object) -> float:
    """A uniform number in [0, 1) from a hash of ``parts`` (stable across runs and machines)."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def choose_unseen(photos: Sequence[tuple[str, str]], seed: int, fraction: float = HOLDOUT_PHOTOS) -> list[str]:
    """Names of the photos held out whole: ``fraction`` of each package's (name, package) photos, at
    least one of any package with 3 or more and never all of one, picked by a hash of (seed, name)."""
    by_pkg: dict[str, list[str]] = {}
    for name, pkg in photos:
        by_pkg.setdefault(pkg, []).append(name)
    out: list[str] = []
    for pkg in sorted(by_pkg):
        names = sorted(by_pkg[pkg], key=lambda n: _hash01(seed, "unseen", n))
        k = round(fraction * len(names))
        if len(names) >= 3:
            k = max(1, k)
        out += names[: min(k, len(names) - 1)]
    return sorted(out)


def split_box(width: int, height: int, fraction: float = HELDOUT_FRACTION) -> tuple[Box, Box]:
    """(train, heldout): the held-out strip is ``fraction`` of the right side (bottom if portrait)."""
    if width >= height:
        k = round(width * fraction)
        return Box(0, 0, width - k, height), Box(width - k, 0, width, height)
    k = round(height * fraction)
    return Box(0, 0, width, height - k), Box(0, height - k, width, height)


def photo_file(name: str) -> str:
    """The file under ``photos/`` that holds photo ``name``'s working image."""
    return name.replace("/", "__") + ".png"


def photo_digest(entries: Sequence[dict]) -> str:
    """What the crops depend on besides the seed: every photo's name, pixels and boxes (16 hex digits)."""
    keys = [(e["name"], e["png_sha256"], e["train"], e["heldout"]) for e in entries]
    return hashlib.blake2b(json.dumps(keys).encode(), digest_size=8).hexdigest()


def load_corpus(corpus: str | Path | None = None) -> tuple[dict, list[CorpusPhoto]]:
    """(corpus.json, its photographs) of a corpus folder; refuses a photo whose PNG changed."""
    folder = Path(corpus) if corpus is not None else DEFAULT_CORPUS
    mpath = folder / "corpus.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} not found: make the corpus with tools/make_photo_corpus.py {folder} --count N")
    manifest = json.loads(mpath.read_text())
    photos = []
    for e in manifest["photos"]:
        path = folder / "photos" / e["file"]
        if file_sha256(path) != e["png_sha256"]:
            raise ValueError(f"{path} differs from the photo recorded in {mpath}")
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        train = Box(*e["train"]) if e["train"] is not None else None
        photos.append(CorpusPhoto(e["name"], e["package"], pixels, train, Box(*e["heldout"])))
    return manifest, photos


def cut(photo: CorpusPhoto, crop: Crop, region: Literal["train", "heldout"], size: int) -> np.ndarray:
    """Pixels of one crop, (size, size, 3) uint8, read from ``region`` of ``photo`` only."""
    box = photo.region(region)
    lx, ly, s = crop.x - box.x0, crop.y - box.y0, crop.scale
    if lx < 0 or ly < 0 or lx + s > box.width or ly + s > box.height:
        raise ValueError(f"{crop.source} leaves the {region} region {box} of {photo.name}")
    return finish_crop(Image.fromarray(np.ascontiguousarray(photo.pixels[crop.y : crop.y + s, crop.x : crop.x + s])), crop, size)


def _spatial_std(img: np.ndarray) -> float:
    return float(img.reshape(-1, img.shape[-1]).std(axis=0).mean())


def _draw(rng: np.random.Generator, photo: CorpusPhoto, region: Literal["train", "heldout"], augment: bool) -> Crop | None:
    """One crop's parameters inside ``region`` of ``photo``; None if no scale fits."""
    box = photo.region(region)
    fits = [s for s in SCALES if s <= box.width and s <= box.height]
    if not fits:
        return None
    s = int(fits[rng.integers(len(fits))])
    x = int(rng.integers(box.x0, box.x1 - s + 1))
    y = int(rng.integers(box.y0, box.y1 - s + 1))
    if not augment:
        return Crop(photo.name, x, y, s)
    flip = bool(rng.integers(2))
    jit = tuple(float(rng.uniform(lo, hi)) for lo, hi in JITTER)
    return Crop(photo.name, x, y, s, flip=flip, jitter=jit)


def package_shares(packages: Sequence[str], cap: float = PACKAGE_CAP) -> dict[str, float]:
    """Each package's share of the training crops, given the package of every training photo.

    A share is the package's photo count over all of them, except that none exceeds ``cap``: a
    package past it is held to it and the rest is spread over the others in proportion to their
    counts, again until none exceeds it. With fewer than 1 / cap packages the cap cannot hold and
    each package gets an equal share instead (1 / packages, the smallest possible maximum).
    """
    counts: dict[str, int] = {}
    for pkg in packages:
        counts[pkg] = counts.get(pkg, 0) + 1
    if not counts:
        raise ValueError("no training photographs: every photo is held out")
    if not 0 < cap <= 1:
        raise ValueError(f"the package cap must be in (0, 1], not {cap}")
    cap = max(cap, 1 / len(counts))
    capped: set[str] = set()
    while True:
        free = {k: n for k, n in counts.items() if k not in capped}
        left = 1.0 - cap * len(capped)
        total = sum(free.values())
        over = {k for k, n in free.items() if left * n / total > cap}
        if not over or len(over) == len(free):  # all of them only by rounding: cap >= 1 / packages
            break
        capped |= over
    shares = {k: cap if k in capped else left * n / total for k, n in counts.items()}
    return dict(sorted(shares.items()))


def train_weights(photos: Sequence[CorpusPhoto], cap: float = PACKAGE_CAP) -> np.ndarray:
    """Probability of drawing each photo for a training crop (0 if held out): its package's share
    (``package_shares``) split equally over the package's training photos."""
    train = [p.package for p in photos if p.train is not None]
    shares = package_shares(train, cap)
    counts = {k: train.count(k) for k in shares}
    w = np.array([0.0 if p.train is None else shares[p.package] / counts[p.package] for p in photos])
    return w / w.sum()


def iter_train_crops(photos: Sequence[CorpusPhoto], seed: int | Sequence[int], size: int = 32) -> Iterator[tuple[np.ndarray, Crop, bytes]]:
    """Endless stream of distinct training crops: ((size, size, 3) uint8, Crop, 16-byte blake2b of the pixels).

    ``seed`` may be a sequence, e.g. (seed, shard). Photos are drawn by ``train_weights``; a flat
    crop (std < MIN_STD) or a repeat is redrawn from the same photo (up to PHOTO_TRIES times in a
    row, then another photo is drawn), so rejections do not shift the package shares.
    """
    rng = np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else seed)
    p = train_weights(photos)
    cdf = np.cumsum(p)
    seen: set[bytes] = set()
    attempts = 0
    while True:
        attempts += 1
        if attempts > 20 * len(seen) + 1000:
            raise RuntimeError(f"could cut only {len(seen)} distinct training crops in {attempts - 1} attempts")
        photo = photos[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(photos) - 1)]
        for _ in range(PHOTO_TRIES):
            crop = _draw(rng, photo, "train", augment=True)
            if crop is None:
                break
            img = cut(photo, crop, "train", size)
            digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
            if digest in seen or _spatial_std(img) < MIN_STD:
                attempts += 1
                continue
            seen.add(digest)
            yield img, crop, digest
            break


def _round_robin(photos: Sequence[CorpusPhoto], rng: np.random.Generator) -> list[CorpusPhoto]:
    """Photos in a seeded order that takes one from each package in turn (so queries span packages)."""
    by_pkg: dict[str, list[CorpusPhoto]] = {}
    for p in photos:
        by_pkg.setdefault(p.package, []).append(p)
    queues = [[g[i] for i in rng.permutation(len(g))] for _, g in sorted(by_pkg.items())]
    order = [queues[i] for i in rng.permutation(len(queues))]
    out: list[CorpusPhoto] = []
    while any(order):
        for q in order:
            if q:
                out.append(q.pop(0))
    return out


def query_crops(photos: Sequence[CorpusPhoto], n: int, kind: Kind, seed: int, size: int = 32) -> tuple[np.ndarray, list[Crop]]:
    """``n`` textured crops of the held-out parts: strips of training photos ("seen") or unseen photos."""
    pool = [p for p in photos if p.unseen == (kind == "unseen")]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    crops: list[Crop] = []
    if n == 0:
        return images, crops
    if not pool:
        raise ValueError(f"the corpus has no {kind} photographs to cut queries from")
    rng = np.random.default_rng([seed, 0 if kind == "seen" else 1])
    order = _round_robin(pool, rng)
    seen: set[bytes] = set()
    slot, misses, attempts = 0, 0, 0
    while len(crops) < n:
        attempts += 1
        if attempts > 1000 * n + 1000:
            raise RuntimeError(f"could cut only {len(crops)} textured {kind} queries")
        if misses >= 100:  # a photo without textured windows gives up its turn
            slot, misses = slot + 1, 0
        photo = order[slot % len(order)]
        crop = _draw(rng, photo, "heldout", augment=False)
        img = None if crop is None else cut(photo, crop, "heldout", size)
        digest = b"" if img is None else hashlib.blake2b(img.tobytes(), digest_size=16).digest()
        if img is None or crop is None or digest in seen or _spatial_std(img) < QUERY_MIN_STD:
            misses += 1
            continue
        seen.add(digest)
        images[len(crops)] = img
        crops.append(crop)
        slot, misses = slot + 1, 0
    return images, crops


def photo_queries(n_seen: int, n_unseen: int, seed: int = 0, corpus: str | Path | None = None,
                  size: int | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Held-out queries of a corpus folder: ((Q, size, size, 3) uint8, source names, kinds).

    The first ``n_seen`` come from the held-out strips of training photos (kind "seen"), the next
    ``n_unseen`` from photos no training crop comes from ("unseen"); the same arguments give the
    same queries. ``size`` defaults to the corpus's image size.
    """
    manifest, photos = load_corpus(corpus)
    size = int(manifest["size"]) if size is None else size
    a, ca = query_crops(photos, n_seen, "seen", seed, size)
    b, cb = query_crops(photos, n_unseen, "unseen", seed, size)
    return np.concatenate([a, b]), [c.source for c in ca + cb], ["seen"] * n_seen + ["unseen"] * n_unseen
