#!/usr/bin/env python
"""Find the distinct real photographs that installed Debian packages ship (see tools/install_photos.sh).

    python tools/photo_finder.py                       # counts per package, kept and dropped with reasons
    python tools/photo_finder.py --json photos.json --sheet kept.png --dropped-sheet dropped.png

Candidates are the raster images (JPEG, PNG, WebP) that the packages in ``SOURCES`` installed,
read from dpkg's file lists, plus every image under ``--photo-dir`` folders. Each one is decoded
at the working resolution (``load_photo``): an image with transparency is first cut to its largest
fully opaque rectangle (a cut-out photo keeps its interior), then the short side is reduced to
``WORK_SIDE`` pixels. The working image is kept when it passes ``photo_verdict``, a rule on
measured statistics (``photo_stats``):

- ``small``: short side under ``MIN_SIDE`` pixels;
- ``grey``: the channels differ by less than ``MIN_CHROMA`` levels on average (grey-scale);
- ``flat``: under ``MIN_TEXTURED`` of its 16x16 tiles have a luminance std of 8 levels or more
  (gradients, plain backgrounds, mostly empty sky);
- ``vector``: more than ``MAX_FLAT_PIXELS`` of its unclipped pixels sit in exactly constant 3x3
  neighbourhoods, or under ``MIN_DETAIL`` of them have any fine detail (a 4-neighbour Laplacian of
  at least 2 levels): rendered art has flat fills and smooth ramps;
- ``smooth``: its grain (the 10th percentile over unclipped 16x16 tiles of the std of luminance
  minus its 3x3 mean) is under ``MIN_GRAIN`` levels: renders lack the sensor noise and fine texture
  that even the smoothest part of a photograph keeps.

The rule is measured, not judged: some digital art with photographic texture passes it (on the
packages here, a dozen of the wallpapers kept; see the report of ``--sheet``).

Then duplicates go: variants of one picture by path (``variant_key``: one Plasma wallpaper's
resolutions and dark version, a ``-l``/``-d`` pair, ``Name_3840x2160``, the tiles of one
Stellarium panorama, a stereo pair or sequence such as ``aloeL``/``aloeR``, ``rubberwhale1``/``2``),
and any two working images whose detail thumbnails (32x32 grey minus its blur) correlate above
``DUPLICATE_CORRELATION`` at some shift of up to 3 thumbnail pixels (copies at another size or
quality, small shifts). Of each set the largest file stays. Each kept photograph records its
package, file, the package's licence file and the file's SHA-256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

# (package, path prefixes that hold its photographs; empty = all of its images)
SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gnome-backgrounds", ()),
    ("mate-backgrounds", ()),
    ("ukui-wallpapers", ()),
    ("lomiri-wallpapers", ()),
    ("lomiri-wallpapers-16.04", ()),
    ("lomiri-wallpapers-20.04", ()),
    ("plasma-workspace-wallpapers", ()),
    ("sway-backgrounds", ()),
    ("desktop-base", ("/usr/share/desktop-base/",)),
    ("mypaint-data-extras", ("/usr/share/mypaint/backgrounds/",)),
    ("stellarium-data", ("/usr/share/stellarium/nebulae/", "/usr/share/stellarium/landscapes/")),
    ("opencv-doc", ("/usr/share/doc/opencv-doc/examples/",)),
    ("tuxpaint-stamps-default", ("/usr/share/tuxpaint/stamps/",)),
)
LOCAL = "local"  # the package name given to images found under --photo-dir
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# screenshots, previews, logos and boot-loader art are not photographs of their own, and the
# packagers file drawings apart: MATE's abstract/, Tux Paint's cartoon/, symbols/ and alphabets/
EXCLUDE = re.compile(r"screenshot|preview|logo|/grub/|/icons?/|thumbnail|/(abstract|cartoon|symbols|alphabets)/", re.IGNORECASE)
DPKG_INFO = Path("/var/lib/dpkg/info")

WORK_SIDE = 256  # working images have this short side (never upscaled)
MIN_SIDE = 96
MIN_CHROMA = 3.0
MIN_TEXTURED = 0.25
MAX_FLAT_PIXELS = 0.25
MIN_DETAIL = 0.15
MIN_GRAIN = 0.28
DUPLICATE_CORRELATION = 0.85
FINGERPRINT_SIDE = 32
FINGERPRINT_SHIFT = 3
_ALPHA_GRID = 512  # the opaque rectangle is searched on a grid of at most this many cells a side


@dataclass(frozen=True)
class Candidate:
    """An image file a package installed (or one under a --photo-dir), before any decoding."""

    path: str
    package: str
    licence: str | None


@dataclass
class PhotoInfo:
    """A kept photograph: where it came from and the box of its file's pixels that is used."""

    name: str  # unique and stable: package/path-derived id
    package: str
    path: str
    licence: str | None
    sha256: str  # of the file
    width: int  # of the file
    height: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the opaque rectangle used, in file pixels
    work_width: int  # of the working image
    work_height: int
    stats: dict[str, float] = field(default_factory=dict)


def package_files(package: str) -> list[str]:
    """Paths dpkg lists for an installed ``package`` (empty if it is not installed)."""
    lists = [DPKG_INFO / f"{package}.list", *sorted(DPKG_INFO.glob(f"{package}:*.list"))]
    for lst in lists:
        if lst.is_file():
            return [line for line in lst.read_text().splitlines() if line]
    return []


def licence_file(package: str) -> str | None:
    """The package's Debian copyright file, which states the licence of what it ships."""
    path = Path("/usr/share/doc") / package / "copyright"
    return str(path) if path.is_file() else None


def candidates(sources: Sequence[tuple[str, tuple[str, ...]]] = SOURCES, photo_dirs: Iterable[str | Path] = ()) -> list[Candidate]:
    """Image files of the installed ``sources`` packages and under ``photo_dirs``, sorted by path."""
    out: dict[str, Candidate] = {}
    for package, prefixes in sources:
        lic = licence_file(package)
        for p in package_files(package):
            if p.lower().endswith(EXTENSIONS) and not EXCLUDE.search(p) and (not prefixes or p.startswith(prefixes)):
                if Path(p).is_file():
                    out.setdefault(p, Candidate(p, package, lic))
    for folder in photo_dirs:
        for f in sorted(Path(folder).rglob("*")):
            if f.suffix.lower() in EXTENSIONS and f.is_file():
                out.setdefault(str(f), Candidate(str(f), LOCAL, None))
    return [out[k] for k in sorted(out)]


def photo_name(c: Candidate) -> str:
    """A unique id: package plus the path below the package's common folder, without extension."""
    p = Path(c.path)
    if c.package == LOCAL:
        return f"{LOCAL}/{p.stem}"
    parts = [x for x in p.with_suffix("").parts if x not in ("/", "usr", "share", "doc", "contents", "images")]
    return f"{c.package}/" + "/".join(parts[-3:])


def variant_key(c: Candidate) -> str:
    """Files with one key are variants of one picture (resolutions, light/dark, crops, panorama tiles)."""
    p = c.path
    m = re.search(r"^(.*/wallpapers/[^/]+)/contents/", p)  # a Plasma wallpaper package
    if m:
        return m.group(1)
    m = re.search(r"^(.*/stellarium/landscapes/[^/]+)/", p)  # the tiles of one panorama
    if m:
        return m.group(1)
    # a sequence or view suffix after a word: leuvenA/B, aloeL/R, rubberwhale1/2, ela_original/_modified
    stem = re.sub(r"(?<=[A-Za-z]{3})(\d|[A-Z]|_(original|modified|left|right))$", "", Path(p).stem).lower()
    stem = re.sub(r"[_-]?\d{3,5}x\d{3,5}", "", stem)
    stem = re.sub(r"([_-](l|d|light|dark|portrait|landscape|nologo|no-logo))+$", "", stem)
    return f"{Path(p).parent}/{stem.strip('_- ')}"


def largest_true_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the largest all-True axis-aligned rectangle of a 2-D bool mask (0-area if none)."""
    h, w = mask.shape
    heights = np.zeros(w + 1, dtype=np.int64)  # sentinel column of height 0
    best, best_box = 0, (0, 0, 0, 0)
    for y in range(h):
        heights[:w] = np.where(mask[y], heights[:w] + 1, 0)
        stack: list[int] = []
        for x in range(w + 1):
            while stack and heights[stack[-1]] >= heights[x]:
                top = stack.pop()
                left = stack[-1] + 1 if stack else 0
                area = int(heights[top]) * (x - left)
                if area > best:
                    best, best_box = area, (left, y - int(heights[top]) + 1, x, y + 1)
            stack.append(x)
    return best_box


def opaque_box(im: Image.Image) -> tuple[int, int, int, int]:
    """The largest rectangle of fully opaque pixels of ``im`` (the whole image if it has no alpha)."""
    w, h = im.size
    if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
        return (0, 0, w, h)
    alpha = np.asarray(im.convert("RGBA"))[..., 3]
    if alpha.min() == 255:
        return (0, 0, w, h)
    f = max(1, math.ceil(max(w, h) / _ALPHA_GRID))  # a coarse cell is opaque only if all its pixels are
    gh, gw = -(-h // f), -(-w // f)
    padded = np.zeros((gh * f, gw * f), dtype=np.uint8)
    padded[:h, :w] = alpha
    cells = padded.reshape(gh, f, gw, f).min(axis=(1, 3)) == 255
    x0, y0, x1, y1 = largest_true_rectangle(cells)
    return (x0 * f, y0 * f, min(x1 * f, w), min(y1 * f, h))


def working_image(im: Image.Image, box: tuple[int, int, int, int], side: int = WORK_SIDE) -> np.ndarray:
    """(H, W, 3) uint8: the box of ``im`` with its short side reduced to ``side`` (Lanczos; never enlarged)."""
    rgb = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA", "LA") else im.convert("RGB")
    rgb = rgb.crop(box)
    w, h = rgb.size
    if min(w, h) > side:
        k = side / min(w, h)
        rgb = rgb.resize((max(side, round(w * k)), max(side, round(h * k))), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(rgb))


def load_photo(path: str | Path, side: int = WORK_SIDE) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int]]:
    """(working image, opaque box in file pixels, file (width, height)) of an image file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency and large-image notices
        with Image.open(path) as im:
            im.load()
            box = opaque_box(im)
            return working_image(im, box, side), box, im.size


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def photo_stats(img: np.ndarray) -> dict[str, float]:
    """Measured statistics of an (H, W, 3) uint8 working image (see the module docstring)."""
    h, w = img.shape[:2]
    if min(h, w) < 16:
        return {"short_side": float(min(h, w)), "chroma": 0.0, "textured": 0.0, "flat_pixels": 0.0, "detail": 0.0, "grain": 0.0}
    x = img.astype(np.float32)
    y = _luma(img)
    chroma = float(np.abs(x - x.mean(axis=2, keepdims=True)).mean() * 1.5)
    t = 16
    th, tw = h // t, w // t
    tiles = y[: th * t, : tw * t].reshape(th, t, tw, t).std(axis=(1, 3))
    textured = float((tiles >= 8).mean())
    # grain: the 10th percentile over unclipped tiles of the std of luminance minus its 3x3 mean
    p = np.pad(y, 1, mode="edge")
    resid = y - sum(p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    rt = resid[: th * t, : tw * t].reshape(th, t, tw, t).std(axis=(1, 3))
    mt = y[: th * t, : tw * t].reshape(th, t, tw, t).mean(axis=(1, 3))
    ok = (mt > 10) & (mt < 245)
    grain = float(np.percentile(rt[ok] if ok.any() else rt, 10))
    # exactly constant 3x3 neighbourhoods, among pixels that are not clipped to black or white
    core = img[1:-1, 1:-1].astype(np.int16)
    same = np.ones(core.shape[:2], dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                nb = img[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx].astype(np.int16)
                same &= (nb == core).all(axis=2)
    ly = y[1:-1, 1:-1]
    unclipped = (ly > 8) & (ly < 247)
    flat = float((same & unclipped).sum() / max(1, unclipped.sum()))
    lap = np.abs(4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:])
    detail = float(((lap >= 2) & unclipped).sum() / max(1, unclipped.sum()))
    return {"short_side": float(min(h, w)), "chroma": chroma, "textured": textured, "flat_pixels": flat, "detail": detail,
            "grain": grain}


def photo_verdict(stats: dict[str, float]) -> str | None:
    """None for a photograph, else the reason it is dropped: small, grey, flat or vector."""
    if stats["short_side"] < MIN_SIDE:
        return "small"
    if stats["chroma"] < MIN_CHROMA:
        return "grey"
    if stats["textured"] < MIN_TEXTURED:
        return "flat"
    if stats["flat_pixels"] > MAX_FLAT_PIXELS or stats["detail"] < MIN_DETAIL:
        return "vector"
    if stats["grain"] < MIN_GRAIN:
        return "smooth"
    return None


def is_photo(img: np.ndarray) -> bool:
    """True if an (H, W, 3) uint8 working image passes ``photo_verdict``."""
    return photo_verdict(photo_stats(img)) is None


def fingerprint(img: np.ndarray, n: int = FINGERPRINT_SIDE) -> np.ndarray:
    """(n, n) float: the detail of an n x n grey thumbnail of the whole image (aspect ignored), minus its blur."""
    from PIL import ImageFilter

    g = Image.fromarray(img).convert("L").resize((n, n), Image.Resampling.BOX)
    return np.asarray(g, dtype=np.float64) - np.asarray(g.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)


def similarity(a: np.ndarray, b: np.ndarray, shift: int = FINGERPRINT_SHIFT) -> np.ndarray:
    """(len(a), len(b)) best correlation of fingerprints over relative shifts of up to ``shift`` thumbnail pixels."""
    n = a.shape[-1]
    best = np.full((len(a), len(b)), -1.0)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1)
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)

    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            ua = unit(a[:, max(0, dy) : n + min(0, dy), max(0, dx) : n + min(0, dx)])
            ub = unit(b[:, max(0, -dy) : n + min(0, -dy), max(0, -dx) : n + min(0, -dx)])
            best = np.maximum(best, ua @ ub.T)
    return best


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assess(c: Candidate, side: int = WORK_SIDE) -> tuple[np.ndarray | None, PhotoInfo | None, str | None]:
    """Decode and measure one candidate: (working image, its PhotoInfo, None) or (image or None, None, reason)."""
    try:
        img, box, (fw, fh) = load_photo(c.path, side)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return None, None, f"unreadable: {err}"
    stats = photo_stats(img)
    reason = photo_verdict(stats)
    if reason:
        return img, None, reason
    info = PhotoInfo(photo_name(c), c.package, c.path, c.licence, "", fw, fh, box, img.shape[1], img.shape[0],
                     {k: round(v, 4) for k, v in stats.items()})
    return img, info, None


def dedupe(passing: Sequence[tuple[Candidate, np.ndarray, PhotoInfo]]) -> tuple[list[PhotoInfo], list[dict[str, str]], dict[str, np.ndarray]]:
    """Drop variants by path, then content duplicates; of each set the largest file stays (ties: first path)."""
    dropped: list[dict[str, str]] = []
    best: dict[str, tuple[Candidate, np.ndarray, PhotoInfo]] = {}
    for c, img, info in passing:
        key = variant_key(c)
        old = best.get(key)
        if old is None or info.width * info.height > old[2].width * old[2].height:  # ties: the first path
            if old is not None:
                dropped.append({"path": old[0].path, "package": old[0].package, "reason": f"variant of {c.path}"})
            best[key] = (c, img, info)
        else:
            dropped.append({"path": c.path, "package": c.package, "reason": f"variant of {old[0].path}"})
    kept: list[PhotoInfo] = []
    images: dict[str, np.ndarray] = {}
    ordered = sorted(best.values(), key=lambda t: (-t[2].width * t[2].height, t[0].path))  # the largest copy stays
    prints = np.array([fingerprint(img) for _, img, _ in ordered]).reshape(len(ordered), FINGERPRINT_SIDE, FINGERPRINT_SIDE)
    sims = similarity(prints, prints)
    kept_rows: list[int] = []
    for i, (c, img, info) in enumerate(ordered):
        twins = [j for j in kept_rows if sims[i, j] > DUPLICATE_CORRELATION]
        if twins:
            dropped.append({"path": c.path, "package": c.package, "reason": f"duplicate of {ordered[twins[0]][0].path}"})
            continue
        if info.name in images:  # the same derived name from two folders: make it unique
            info.name = f"{info.name}-{hashlib.blake2b(c.path.encode(), digest_size=3).hexdigest()}"
        info.sha256 = file_sha256(c.path)
        kept.append(info)
        kept_rows.append(i)
        images[info.name] = img
    kept.sort(key=lambda k: k.path)
    return kept, dropped, images


def find_photos(
    sources: Sequence[tuple[str, tuple[str, ...]]] = SOURCES,
    photo_dirs: Iterable[str | Path] = (),
    side: int = WORK_SIDE,
    progress: bool = False,
) -> tuple[list[PhotoInfo], list[dict[str, str]], dict[str, np.ndarray]]:
    """(kept photos, dropped {path, package, reason}, working images of the kept photos by name)."""
    cands = candidates(sources, photo_dirs)
    dropped: list[dict[str, str]] = []
    passing: list[tuple[Candidate, np.ndarray, PhotoInfo]] = []
    for i, c in enumerate(cands):
        if progress and i % 200 == 0:
            print(f"  {i}/{len(cands)} images read", file=sys.stderr)
        img, info, reason = assess(c, side)
        if info is None or img is None:
            dropped.append({"path": c.path, "package": c.package, "reason": reason or "unreadable"})
        else:
            passing.append((c, img, info))
    kept, more, images = dedupe(passing)
    return kept, dropped + more, images


def contact_sheet(paths_or_images: Sequence[str | np.ndarray], labels: Sequence[str], out: str | Path, cols: int = 10, tile: int = 128) -> None:
    """Write a PNG grid of thumbnails with labels (to look at what is kept and what is dropped)."""
    from PIL import ImageDraw

    rows = max(1, math.ceil(len(labels) / cols))
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 12)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (item, label) in enumerate(zip(paths_or_images, labels)):
        try:
            im = Image.fromarray(item) if isinstance(item, np.ndarray) else Image.open(item).convert("RGB")
        except OSError:
            continue
        im.thumbnail((tile, tile))
        x, y = (i % cols) * tile, (i // cols) * (tile + 12)
        sheet.paste(im, (x, y))
        draw.text((x + 1, y + tile), label[:24], fill="black")
    sheet.save(out)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photo-dir", action="append", default=[], help="also search this folder (package 'local')")
    ap.add_argument("--no-packages", action="store_true", help="search only the --photo-dir folders")
    ap.add_argument("--json", type=Path, help="write kept and dropped photos here")
    ap.add_argument("--sheet", type=Path, help="contact sheet of the kept working images (PNG)")
    ap.add_argument("--dropped-sheet", type=Path, help="contact sheet of the dropped files (PNG)")
    args = ap.parse_args(argv)
    kept, dropped, images = find_photos(() if args.no_packages else SOURCES, args.photo_dir, progress=True)
    by_pkg: dict[str, list[int]] = {}
    for k in kept:
        by_pkg.setdefault(k.package, [0, 0])[0] += 1
    for d in dropped:
        by_pkg.setdefault(d["package"], [0, 0])[1] += 1
    reasons: dict[str, int] = {}
    for d in dropped:
        r = d["reason"].split(" ")[0].rstrip(":")
        reasons[r] = reasons.get(r, 0) + 1
    for pkg, (k, d) in sorted(by_pkg.items()):
        print(f"{pkg:32s} kept {k:4d}  dropped {d:4d}")
    print(f"{len(kept)} distinct photographs kept, {len(dropped)} files dropped: "
          + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda t: -t[1])))
    if args.json:
        args.json.write_text(json.dumps({"kept": [asdict(k) for k in kept], "dropped": dropped}, indent=1) + "\n")
    if args.sheet:
        contact_sheet([images[k.name] for k in kept], [k.name.split("/", 1)[1] for k in kept], args.sheet)
    if args.dropped_sheet:
        contact_sheet([d["path"] for d in dropped], [f"{d['reason'].split(' ')[0]}:{Path(d['path']).stem}" for d in dropped], args.dropped_sheet)


if __name__ == "__main__":
    main()
