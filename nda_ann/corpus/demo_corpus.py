"""The embedded corpus: crops of the colour photographs scikit-image and scikit-learn ship (no download).

Each photograph is split into a training region and a held-out strip (``HELDOUT_FRACTION`` of one
side). Crops are cut from one region's pixels only, so a training crop never reads a held-out pixel.
A crop takes a window of side ``s`` (optionally rotated), resizes it to ``size`` with Lanczos
antialiasing, optionally flips it and jitters its colour. Everything is deterministic for a seed.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError

Region = Literal["train", "heldout"]

# (package, file, held-out side). The stereo pair holds out the same bottom band in both views:
# rectified stereo shifts content only horizontally, so a side strip of one view would show up in
# the other view's training region.
PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("skimage", "astronaut.png", "right"),
    ("skimage", "chelsea.png", "right"),
    ("skimage", "coffee.png", "right"),
    ("skimage", "rocket.jpg", "left"),
    ("skimage", "motorcycle_left.png", "bottom"),
    ("skimage", "motorcycle_right.png", "bottom"),
    ("skimage", "hubble_deep_field.jpg", "right"),
    ("skimage", "ihc.png", "right"),
    ("skimage", "retina.jpg", "right"),
    ("sklearn", "china.jpg", "right"),
    ("sklearn", "flower.jpg", "right"),
)
_FOLDERS = {"skimage": ("data",), "sklearn": ("datasets", "images")}
HELDOUT_FRACTION = 0.2
SCALES: tuple[int, ...] = (32, 48, 64, 96, 128)
MAX_ANGLE = 25.0  # degrees, with rotate=True
MIN_STD = 3.0  # crops flatter than this (uint8 levels) are rejected: near-constant, near-duplicates
QUERY_MIN_STD = 16.0  # demo queries are textured, so their attributions are worth a look
_BICUBIC_SUPPORT = 2  # pixels a bicubic sample reads beyond its position


@dataclass(frozen=True)
class Box:
    """A half-open pixel box [x0, x1) x [y0, y1) in photo coordinates."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def contains(self, other: "Box") -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and other.x1 <= self.x1 and other.y1 <= self.y1

    def intersects(self, other: "Box") -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


@dataclass(frozen=True, eq=False)
class Photo:
    """A decoded photograph with its training region and held-out strip (complementary boxes)."""

    name: str
    pixels: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    train: Box
    heldout: Box

    def region(self, which: Region) -> Box:
        if which not in ("train", "heldout"):
            raise ValueError(f"region must be 'train' or 'heldout', got {which!r}")
        return self.train if which == "train" else self.heldout

    @functools.cached_property
    def _images(self) -> dict[str, Image.Image]:
        out = {}
        for which in ("train", "heldout"):
            b = self.region(which)  # type: ignore[arg-type]
            out[which] = Image.fromarray(np.ascontiguousarray(self.pixels[b.y0 : b.y1, b.x0 : b.x1]))
        return out

    def region_image(self, which: Region) -> Image.Image:
        """The region's pixels alone, as a PIL image (a crop cannot read outside it)."""
        return self._images[which]


@dataclass(frozen=True)
class Crop:
    """Where a crop came from. (x, y) is the top-left of the s x s window before rotation."""

    photo: str
    x: int
    y: int
    scale: int
    angle: float = 0.0  # degrees, about the window centre
    flip: bool = False
    jitter: tuple[float, float, float] | None = None  # brightness, contrast, saturation factors

    def footprint(self) -> Box:
        """The box of photo pixels this crop's pixels depend on (rotation and filter support included)."""
        if self.angle == 0.0:
            return Box(self.x, self.y, self.x + self.scale, self.y + self.scale)
        h = _half_extent(self.scale, self.angle) + _BICUBIC_SUPPORT
        cx, cy = self.x + self.scale / 2, self.y + self.scale / 2
        return Box(math.floor(cx - h), math.floor(cy - h), math.ceil(cx + h), math.ceil(cy + h))

    @property
    def source(self) -> str:
        """E.g. 'astronaut.png@x=10,y=20,s=64,flip=0' (plus ',rot=12.5' and jitter when used)."""
        s = f"{self.photo}@x={self.x},y={self.y},s={self.scale},flip={int(self.flip)}"
        if self.angle:
            s += f",rot={self.angle:.2f}"
        if self.jitter is not None:
            s += ",jit={:.3f}/{:.3f}/{:.3f}".format(*self.jitter)
        return s


@dataclass
class DemoCorpus:
    """Training crops and held-out queries, with their provenance."""

    train: np.ndarray  # (N, size, size, 3) uint8
    train_sources: list[str]
    queries: np.ndarray  # (Q, size, size, 3) uint8
    query_sources: list[str]
    train_crops: list[Crop]
    query_crops: list[Crop]


def _half_extent(s: int, angle: float) -> float:
    """Half the side of the axis-aligned box around an s x s square rotated by ``angle`` degrees."""
    a = math.radians(angle)
    return s / 2 * (abs(math.cos(a)) + abs(math.sin(a)))


def _package_dir(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (imports are slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _split(width: int, height: int, side: str) -> tuple[Box, Box]:
    """(train, heldout) boxes: the held-out strip is HELDOUT_FRACTION of the photo on ``side``."""
    if side in ("left", "right"):
        k = round(width * HELDOUT_FRACTION)
        if side == "right":
            return Box(0, 0, width - k, height), Box(width - k, 0, width, height)
        return Box(k, 0, width, height), Box(0, 0, k, height)
    k = round(height * HELDOUT_FRACTION)
    if side == "bottom":
        return Box(0, 0, width, height - k), Box(0, height - k, width, height)
    return Box(0, k, width, height), Box(0, 0, width, k)


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Photo, ...]:
    """Decode the shipped photographs (cached). Missing ones are skipped with a warning."""
    photos = []
    missing = []
    for package, name, side in PHOTOS:
        base = _package_dir(package)
        path = None if base is None else base.joinpath(*_FOLDERS[package], name)
        if path is None or not path.is_file():
            missing.append(f"{package}:{name}")
            continue
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError as err:
            missing.append(f"{package}:{name} ({err})")
            continue
        train, heldout = _split(pixels.shape[1], pixels.shape[0], side)
        photos.append(Photo(name, pixels, train, heldout))
    if missing:
        warnings.warn(f"demo corpus: {len(missing)} photograph(s) not found, skipped: {', '.join(missing)}", stacklevel=2)
    if not photos:
        raise InputError(
            None,
            "none of the demo photographs were found; they ship inside scikit-image and scikit-learn: "
            "pip install 'nda-ann[demo]' (or scikit-image scikit-learn)",
        )
    return tuple(photos)


def _cut(photo: Photo, crop: Crop, region: Region, size: int) -> np.ndarray:
    """Pixels of one crop: (size, size, 3) uint8."""
    box = photo.region(region)
    img = photo.region_image(region)
    lx, ly = crop.x - box.x0, crop.y - box.y0  # window position in region coordinates
    s = crop.scale
    if crop.angle == 0.0:
        win = img.crop((lx, ly, lx + s, ly + s))
    else:
        # Output pixel (u, v) of the s x s window reads region point centre + R (u - s/2, v - s/2).
        a = math.radians(crop.angle)
        c, si = math.cos(a), math.sin(a)
        cx, cy = lx + s / 2, ly + s / 2
        coeffs = (c, -si, cx - c * s / 2 + si * s / 2, si, c, cy - si * s / 2 - c * s / 2)
        win = img.transform((s, s), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
    return finish_crop(win, crop, size)


def finish_crop(win: Image.Image, crop: Crop, size: int) -> np.ndarray:
    """A crop's s x s window (already cut and rotated) to its (size, size, 3) uint8 pixels: resized
    (LANCZOS), flipped and colour-jittered as ``crop`` says."""
    if win.size != (size, size):
        win = win.resize((size, size), Image.Resampling.LANCZOS)
    out = np.asarray(win)
    if crop.flip:
        out = out[:, ::-1]
    if crop.jitter is not None:
        out = colour_jitter(out, *crop.jitter)
    return np.ascontiguousarray(out)


def colour_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """(H, W, 3) uint8 -> uint8: scale brightness, contrast about the mean, saturation about grey."""
    x = img.astype(np.float32) * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = grey[..., None] + (x - grey[..., None]) * saturation
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _draw(rng: np.random.Generator, photo: Photo, region: Region, size: int, scales: Sequence[int], rotate: bool, jitter: bool) -> Crop | None:
    """Draw one crop's parameters inside ``region`` of ``photo``; None if no scale fits."""
    box = photo.region(region)
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)) if rotate else 0.0
    flip = bool(rng.integers(2))
    fits = [s for s in scales if _fits(s, angle, box)]
    if not fits:
        return None
    s = int(fits[rng.integers(len(fits))])
    if angle == 0.0:
        x = int(rng.integers(box.x0, box.x1 - s + 1))
        y = int(rng.integers(box.y0, box.y1 - s + 1))
    else:
        # The window centre (x + s/2) must keep the rotated footprint inside the box.
        h = _half_extent(s, angle) + _BICUBIC_SUPPORT
        x = int(rng.integers(math.ceil(box.x0 + h - s / 2), math.floor(box.x1 - h - s / 2) + 1))
        y = int(rng.integers(math.ceil(box.y0 + h - s / 2), math.floor(box.y1 - h - s / 2) + 1))
    jit = None
    if jitter:
        jit = (float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.7, 1.3)))
    return Crop(photo.name, x, y, s, angle, flip, jit)


def _spatial_std(img: np.ndarray) -> float:
    """Mean over channels of the pixel standard deviation of an (H, W, C) image (texture, not colour)."""
    return float(img.reshape(-1, img.shape[-1]).std(axis=0).mean())


def _fits(s: int, angle: float, box: Box) -> bool:
    if angle == 0.0:
        return s <= box.width and s <= box.height
    side = 2 * (_half_extent(s, angle) + _BICUBIC_SUPPORT) + 1
    return side <= box.width and side <= box.height


def iter_photo_crops(
    size: int = 32,
    seed: int | Sequence[int] = 0,
    region: Region = "train",
    rotate: bool = False,
    jitter: bool = False,
    *,
    scales: Sequence[int] = SCALES,
    cycle_photos: bool = False,
    min_std: float = MIN_STD,
) -> Iterator[tuple[np.ndarray, Crop, bytes]]:
    """Endless stream of distinct crops: ((size, size, 3) uint8, Crop, 16-byte blake2b of the pixels).

    ``seed`` may be a sequence (e.g. (seed, shard)) for independent streams. Photos are drawn
    uniformly, or in a seeded round-robin with ``cycle_photos``. Duplicates (same pixels) and flat
    crops (per-channel pixel std < ``min_std``) are rejected and redrawn. Memory grows by one
    digest per crop yielded.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    photos = load_photos()
    rng = np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else seed)
    order = rng.permutation(len(photos))
    seen: set[bytes] = set()
    attempts = 0
    slot, misses = 0, 0  # round-robin position; a photo that keeps failing gives up its turn
    while True:
        attempts += 1
        if attempts > 20 * len(seen) + 1000:
            raise InputError(None, f"could cut only {len(seen)} distinct {region} crops in {attempts - 1} attempts; ask for fewer")
        if misses >= 100:
            slot, misses = slot + 1, 0
        k = order[slot % len(photos)] if cycle_photos else rng.integers(len(photos))
        photo = photos[int(k)]
        crop = _draw(rng, photo, region, size, scales, rotate, jitter)
        img = None if crop is None else _cut(photo, crop, region, size)
        digest = b"" if img is None else hashlib.blake2b(img.tobytes(), digest_size=16).digest()
        if img is None or crop is None or digest in seen or _spatial_std(img) < min_std:
            misses += 1
            continue
        seen.add(digest)
        slot, misses = slot + 1, 0
        yield img, crop, digest


def photo_crops(
    n: int,
    size: int = 32,
    seed: int | Sequence[int] = 0,
    region: Region = "train",
    rotate: bool = False,
    jitter: bool = False,
    **options: Any,
) -> tuple[np.ndarray, list[Crop]]:
    """The first ``n`` crops of ``iter_photo_crops``: ((n, size, size, 3) uint8, their Crop records)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    crops: list[Crop] = []
    stream = iter_photo_crops(size, seed, region, rotate, jitter, **options)
    for i in range(n):
        images[i], crop, _ = next(stream)
        crops.append(crop)
    return images, crops


def demo_corpus(n_train: int = 3000, n_queries: int = 8, size: int = 32, seed: int = 0) -> DemoCorpus:
    """Training crops from the training regions, queries from the held-out strips (one per photo in turn)."""
    train, train_crops = photo_crops(n_train, size, (seed, 0), "train")
    queries, query_crops = photo_crops(n_queries, size, (seed, 1), "heldout", cycle_photos=True, min_std=QUERY_MIN_STD)
    return DemoCorpus(
        train=train,
        train_sources=[c.source for c in train_crops],
        queries=queries,
        query_sources=[c.source for c in query_crops],
        train_crops=train_crops,
        query_crops=query_crops,
    )
