"""Attribution figures with Pillow alone: the query, its top proponents with scores, and heatmaps.

Layout (all sizes in pixels): a title band, then row 1 with the query and up to ``MAX_PROPONENTS``
proponents, each a ``CELL`` x ``CELL`` tile with text lines under it; when any proponent has a
heatmap, row 2 shows, under each proponent, where on the query it contributes: its map a(u, n)
over query pixels u divided by its sum (the image's score), i.e. the share of that image's score
each pixel gives, drawn over the dimmed query with one square-root colour scale for the whole
row. The first cell of row 2 is that scale's colour bar, labelled in percent per pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_file

CELL = 96
PAD = 8
TEXT_LINES = 4
FONT_SIZE = 11
LINE_HEIGHT = 13
TITLE_HEIGHT = 22
MAX_PROPONENTS = 8
BACKGROUND = (255, 255, 255)
DIM = 0.35  # weight of the query under a heatmap
GAMMA = 0.5  # heatmaps are drawn as (value / max) ** GAMMA so that small contributions stay visible
BAR_WIDTH = 14  # the colour bar in the first cell of the heatmap row
TICK_GAP = 13  # least vertical distance between two colour-bar labels

# Control points of a viridis-like ramp (dark purple -> blue -> teal -> green -> yellow).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


@dataclass
class Proponent:
    """One training image shown next to the query."""

    image: np.ndarray  # (H, W, C) uint8, C in (1, 3)
    label: str  # e.g. "#123 astronaut.png@x=..."
    score: float
    heatmap: np.ndarray | None = None  # (h, w) float: contribution per query position


def colormap(values: np.ndarray) -> np.ndarray:
    """(...) floats in [0, 1] -> (..., 3) uint8 on the viridis-like ramp (values are clipped)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    knots = np.linspace(0.0, 1.0, len(_RAMP))
    rgb = np.stack([np.interp(v, knots, _RAMP[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def figure_size(n_proponents: int, heatmaps: bool, title: bool) -> tuple[int, int]:
    """(width, height) of a figure with ``n_proponents`` shown (capped at MAX_PROPONENTS)."""
    cols = 1 + min(n_proponents, MAX_PROPONENTS)
    width = PAD + cols * (CELL + PAD)
    row = CELL + TEXT_LINES * LINE_HEIGHT + PAD
    height = PAD + (TITLE_HEIGHT if title else 0) + row * (2 if heatmaps else 1)
    return width, height


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) uint8 -> (H, W, 3) uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"images must be (H, W, C) with C in (1, 3), got {a.shape}")
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _tile(rgb: np.ndarray) -> Image.Image:
    """An image scaled to CELL x CELL with NEAREST (pixels stay visible)."""
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((CELL, CELL), Image.Resampling.NEAREST)


def _heat_tile(query_rgb: np.ndarray, heat: np.ndarray, vmax: float) -> Image.Image:
    """The heatmap (h, w) as (heat / vmax) ** GAMMA, stretched over the dimmed query as a CELL tile."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"a heatmap must be (h, w), got {heat.shape}")
    colour = Image.fromarray(colormap((np.clip(heat, 0, None) / vmax) ** GAMMA if vmax > 0 else np.zeros_like(heat)))
    colour = np.asarray(colour.resize((CELL, CELL), Image.Resampling.NEAREST), dtype=np.float32)
    base = np.asarray(_tile(query_rgb), dtype=np.float32)
    return Image.fromarray(np.rint(DIM * base + (1 - DIM) * colour).astype(np.uint8))


def share_maps(heat: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
    """Each (h, w) contribution map as the share of its image's score per pixel: clipped at 0 and
    divided by its sum (so it sums to 1; an all-zero map stays 0)."""
    out: list[np.ndarray | None] = []
    for h in heat:
        if h is None:
            out.append(None)
            continue
        h = np.clip(np.asarray(h, dtype=np.float64), 0, None)
        total = float(h.sum())
        out.append(h / total if total > 0 else h)
    return out


def share_ticks(vmax: float, height: int = CELL) -> list[tuple[float, int]]:
    """Colour-bar labels (share, pixel row from the top of a ``height`` bar) on the square-root
    scale: the maximum at the top, 0 at the bottom, and round shares (1, 2, 5 x 10^k) between them
    at least TICK_GAP rows from any other label."""
    if not vmax > 0:
        return [(0.0, height - 1)]

    def row(v: float) -> int:
        return int(round((1 - (v / vmax) ** GAMMA) * (height - 1)))

    ticks = [(vmax, 0), (0.0, height - 1)]
    exp = int(np.floor(np.log10(vmax)))
    for e in range(exp, exp - 4, -1):
        for m in (5, 2, 1):
            v = m * 10.0**e
            if v < vmax and all(abs(row(v) - r) >= TICK_GAP for _, r in ticks):
                ticks.append((v, row(v)))
    return sorted(ticks, key=lambda t: t[1])


def percent(share: float) -> str:
    """A share as a short percentage: 0.0213 -> '2.1%', 0.0005 -> '0.05%'."""
    return "0" if share == 0 else f"{100 * share:.2g}%"


def _colour_bar(vmax: float, font) -> Image.Image:
    """A CELL x CELL tile: the heatmap colour ramp (bright = vmax at the top, 0 at the bottom, square
    root scale) with its labels in percent of the image's score per pixel."""
    tile = Image.new("RGB", (CELL, CELL), BACKGROUND)
    ramp = 1 - np.linspace(0.0, 1.0, CELL)  # the drawn value (share / vmax) ** GAMMA, top to bottom
    tile.paste(Image.fromarray(np.repeat(colormap(ramp)[:, None], BAR_WIDTH, axis=1)), (2, 0))
    draw = ImageDraw.Draw(tile)
    for share, y in share_ticks(vmax):
        draw.line([(2 + BAR_WIDTH, y), (5 + BAR_WIDTH, y)], fill=(30, 30, 30))
        top = min(max(y - FONT_SIZE // 2 - 1, 0), CELL - FONT_SIZE - 2)
        draw.text((8 + BAR_WIDTH, top), percent(share), fill=(30, 30, 30), font=font)
    return tile


def _fit_lines(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """Break ``text`` into at most ``lines`` lines of ``width`` pixels, preferring '@', ',', ' '."""
    out: list[str] = []
    rest = text
    while rest and len(out) < lines:
        if draw.textlength(rest, font=font) <= width:
            out.append(rest)
            rest = ""
            break
        cut = len(rest)
        while cut > 1 and draw.textlength(rest[:cut], font=font) > width:
            cut -= 1
        brk = max(rest.rfind(c, 0, cut) for c in "@, ")
        if brk > cut // 2:
            cut = brk + 1 if rest[brk] in ", " else brk  # break before '@', after ',' or ' '
        out.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest and out:
        last = out[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        out[-1] = last + "..."
    return out


def render_attribution(
    query: np.ndarray,
    proponents: Sequence[Proponent],
    path: str | Path,
    title: str | None = None,
    *,
    query_label: str = "query",
) -> Path:
    """Draw the query and up to MAX_PROPONENTS proponents (with heatmaps if given); write a PNG atomically.

    ``query`` is (H, W, C) uint8. Returns the path written. The size is ``figure_size(...)``.
    """
    q_rgb = rgb(query)
    shown = list(proponents)[:MAX_PROPONENTS]
    heat = [p.heatmap for p in shown]
    has_heat = any(h is not None for h in heat)
    width, height = figure_size(len(shown), has_heat, title is not None)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_font, bold = font(FONT_SIZE), font(FONT_SIZE + 3)
    y0 = PAD
    if title is not None:
        draw.text((PAD, y0), title, fill=(0, 0, 0), font=bold)
        y0 += TITLE_HEIGHT
    row = CELL + TEXT_LINES * LINE_HEIGHT + PAD

    def cell(col: int, r: int, tile: Image.Image, first: str, rest: str = "") -> None:
        x, y = PAD + col * (CELL + PAD), y0 + r * row
        canvas.paste(tile, (x, y))
        lines = _fit_lines(draw, first, text_font, CELL, TEXT_LINES)
        if rest:
            lines = lines[:1] + _fit_lines(draw, rest, text_font, CELL, TEXT_LINES - 1)
        for i, line in enumerate(lines):
            draw.text((x, y + CELL + 2 + i * LINE_HEIGHT), line, fill=(30, 30, 30), font=text_font)

    cell(0, 0, _tile(q_rgb), query_label)
    for i, p in enumerate(shown):
        cell(1 + i, 0, _tile(rgb(p.image)), f"score {p.score:.4g}", p.label)
    if has_heat:
        shares = share_maps(heat)
        vmax = max(float(np.max(h)) for h in shares if h is not None)
        cell(0, 1, _colour_bar(vmax, text_font), "share of the image's score per pixel (sqrt scale)")
        for i, h in enumerate(shares):
            if h is not None:
                cell(1 + i, 1, _heat_tile(q_rgb, h, vmax), f"peak {percent(float(np.max(h)))} a pixel")
    return _save_png_atomic(canvas, Path(path))


def _save_png_atomic(image: Image.Image, path: Path) -> Path:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
