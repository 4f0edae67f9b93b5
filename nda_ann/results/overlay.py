"""One heatmap as a PNG: the query with a training image's contribution map over it, and a colour bar.

The map a(u) (H, W) of one training image sums to that image's score; the picture shows each
pixel's share of that score, a(u) / sum(a), on the viridis-like ramp of ``figures.colormap`` with
a square-root scale (small shares stay visible), over the dimmed query. A colour bar on the right
is labelled in percent of the image's score per pixel, so the colours can be read off.
Used by the server (``nda_ann.serve``) and the HTML report (``results.html_report``).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .figures import DIM, GAMMA, colormap
from .figures import font as _font
from .figures import rgb as as_rgb

TILE = 192          # side of the drawn query, in pixels
BAR_WIDTH = 12
LABEL_WIDTH = 44    # room for the tick labels right of the bar
CAPTION_HEIGHT = 30
PAD = 6
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)


def png_bytes(image: Image.Image | np.ndarray, scale: int = 1) -> bytes:
    """Encode a PIL image or an (H, W[, C]) uint8 array as PNG bytes, enlarged ``scale`` x (NEAREST)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(as_rgb(image)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixel_shares(heat: np.ndarray) -> np.ndarray:
    """(H, W) contribution map -> (H, W) share of its sum per pixel (negative values clipped; all
    zeros where the map sums to 0)."""
    h = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64)), 0, None)
    total = h.sum()
    return h / total if total > 0 else np.zeros_like(h)


def _overlay(query_rgb: np.ndarray, share: np.ndarray, vmax: float) -> Image.Image:
    """TILE x TILE: the share map on the sqrt ramp over the dimmed query."""
    level = (share / vmax) ** GAMMA if vmax > 0 else np.zeros_like(share)
    colour = Image.fromarray(colormap(level)).resize((TILE, TILE), Image.Resampling.NEAREST)
    base = Image.fromarray(np.ascontiguousarray(query_rgb)).resize((TILE, TILE), Image.Resampling.NEAREST)
    mixed = DIM * np.asarray(base, dtype=np.float32) + (1 - DIM) * np.asarray(colour, dtype=np.float32)
    return Image.fromarray(np.rint(mixed).astype(np.uint8))


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, vmax: float, font) -> None:
    """A vertical bar, top = vmax, with ticks at 0, vmax / 4 and vmax (where the sqrt scale puts them)."""
    ramp = np.linspace(1.0, 0.0, TILE)[:, None].repeat(BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(colormap(ramp)), (x, y))
    draw.rectangle((x - 1, y - 1, x + BAR_WIDTH, y + TILE), outline=INK)
    for frac in (1.0, 0.5, 0.0):  # bar height fraction; the value there is vmax * frac ** (1 / GAMMA)
        value = vmax * frac ** (1 / GAMMA)
        ty = y + round((1 - frac) * (TILE - 1))
        draw.line((x + BAR_WIDTH, ty, x + BAR_WIDTH + 3, ty), fill=INK)
        draw.text((x + BAR_WIDTH + 5, min(max(ty - 6, y - 2), y + TILE - 12)), f"{100 * value:.2g}%", fill=INK, font=font)


def render_heatmap(query: np.ndarray, heat: np.ndarray) -> Image.Image:
    """The query (H, W, C) uint8 with ``heat`` (H, W) over it as shares of its sum, a colour bar in
    percent per pixel and a caption saying what the colours mean."""
    q = as_rgb(query)
    share = pixel_shares(heat)
    if share.shape != q.shape[:2]:
        raise ValueError(f"heatmap {share.shape} does not match the query {q.shape[:2]}")
    vmax = float(share.max())
    width = PAD + TILE + PAD + BAR_WIDTH + LABEL_WIDTH
    canvas = Image.new("RGB", (width, PAD + TILE + CAPTION_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    canvas.paste(_overlay(q, share, vmax), (PAD, PAD))
    _colour_bar(canvas, draw, PAD + TILE + PAD, PAD, vmax, font)
    draw.text((PAD, PAD + TILE + 3), "colour: share of this image's", fill=INK, font=font)
    draw.text((PAD, PAD + TILE + 16), "score per pixel (sqrt scale)", fill=INK, font=font)
    return canvas


def heatmap_png(query: np.ndarray, heat: np.ndarray) -> bytes:
    """``render_heatmap`` encoded as PNG bytes."""
    return png_bytes(render_heatmap(query, heat))
