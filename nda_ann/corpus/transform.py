"""The corpus transform: a decoded PIL image -> an (R, R, C) uint8 array.

Steps, in order (the decoder in ``sources.py`` has already applied EXIF orientation):

1. Mode: 16-bit grayscale (I;16*, I) is scaled to 8 bit as round(v * 255 / 65535) (PIL's own
   conversion clips instead); float (F) is clipped to [0, 255]; anything with alpha (RGBA, LA, PA,
   or a transparency key on P/L/RGB) is composited on **white**, the background most viewers show;
   CMYK, YCbCr and the rest go through PIL's conversion (ICC profiles are ignored).
   C = 3 gives RGB (gray replicated); C = 1 gives PIL "L" (ITU-R 601-2 luma).
2. Geometry: the shorter side goes to R and the centre R x R square is kept, in one resampling of
   the centred square (PIL ``resize`` with a ``box``) with LANCZOS and ``reducing_gap`` 3. An image
   already R x R is not resampled; one whose shorter side is already R is only cropped (offset
   rounded down). Images smaller than R are upscaled with the same filter.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

FILTER = Image.Resampling.LANCZOS
FILTER_NAME = "lanczos"
REDUCING_GAP = 3.0
BACKGROUND = 255  # alpha is composited on white
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def describe(resolution: int, channels: int) -> dict[str, Any]:
    """The transform as recorded in the store manifest (also part of the resume signature)."""
    return {
        "kind": "resize_shorter_center_crop",
        "resolution": resolution,
        "channels": channels,
        "mode": "RGB" if channels == 3 else "L",
        "filter": FILTER_NAME,
        "reducing_gap": REDUCING_GAP,
        "geometry": "shorter side to R, centre R x R square, one resampling (PIL resize with box)",
        "exact_size": "R x R inputs are not resampled; shorter side == R is cropped only",
        "exif_orientation": "applied (ImageOps.exif_transpose)",
        "alpha": "composited on white",
        "sixteen_bit": "round(v * 255 / 65535)",
        "float": "clipped to [0, 255]",
        "gray_to_rgb": "replicated",
        "rgb_to_gray": "PIL L (ITU-R 601-2 luma)",
        "color_profiles": "ignored",
        "multi_frame": "first frame",
    }


def has_alpha(img: Image.Image) -> bool:
    """True for modes with an alpha band and for images with a transparency key."""
    return img.mode in ALPHA_MODES or "transparency" in img.info


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit or int32 grayscale (range 0..65535) or float (clipped) -> mode L."""
    arr = np.asarray(img)
    if img.mode == "F":
        u8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        v = np.clip(arr.astype(np.int64), 0, 65535)
        u8 = ((v * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(u8)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> mode "RGB" (channels 3) or "L" (channels 1), as described above."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        img = _scale_to_8bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "RGB" if channels == 3 else "L"
    if img.mode != target:
        if target == "L" and img.mode != "RGB":
            img = img.convert("RGB")
        img = img.convert(target)
    return img


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution``, centre square kept: a (w, h) image -> (R, R)."""
    w, h = img.size
    r = resolution
    if (w, h) == (r, r):
        return img
    side = min(w, h)
    if side == r:
        left, top = (w - r) // 2, (h - r) // 2
        return img.crop((left, top, left + r, top + r))
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return img.resize((r, r), FILTER, box=box, reducing_gap=REDUCING_GAP)


def to_array(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """A decoded image -> (R, R, C) uint8, C = ``channels``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    out = np.asarray(resize_center_crop(to_mode(img, channels), resolution), dtype=np.uint8)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out)
