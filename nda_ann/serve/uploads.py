"""Checks of one POST /attribute request: its parameters and its uploaded images (no web framework).

Every problem raises ``RequestError`` with the HTTP status and a message a person can act on:
415 not an image, 400 undecodable or empty, 413 too large, 422 a bad parameter.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ..corpus.sources import DecodeError, open_image
from .config import ServeConfig

FIELDS = ("image", "timestep", "topk", "candidates", "top")
# leading bytes of formats Pillow reads: a file that starts so but does not open is corrupt, not "not an image"
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
STEPS = 1000  # timesteps 0..999 of the DDPM schedules


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx or 503) and ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class QueryParams:
    """The parsed form fields of one request."""

    timesteps: list[int]
    topk: int | None
    candidates: int | None
    top: int


def _int(name: str, value: str, lo: int, hi: int) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d{1,12}", text) or not lo <= int(text) <= hi:
        raise RequestError(422, f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return int(text)


def _optional_int(name: str, values: Sequence[str], lo: int, hi: int) -> int | None:
    if len(values) > 1:
        raise RequestError(422, f"{name} given {len(values)} times; give it once")
    if not values or not str(values[0]).strip():
        return None
    return _int(name, values[0], lo, hi)


def parse_params(fields: dict[str, list[str]], config: ServeConfig) -> QueryParams:
    """``fields``: form field name -> its string values (files excluded). Unknown fields are refused."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown form field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    if "image" in fields:
        raise RequestError(422, "the field 'image' must hold uploaded files, not text")
    raw = [v for v in fields.get("timestep", []) for v in str(v).replace(",", " ").split()]
    timesteps = [_int("timestep", v, 0, STEPS - 1) for v in raw] or list(config.default_timesteps)
    if len(timesteps) > config.max_timesteps:
        raise RequestError(422, f"{len(timesteps)} timesteps given; at most {config.max_timesteps} per request")
    top = _optional_int("top", fields.get("top", []), 1, config.max_top)
    return QueryParams(
        timesteps=list(dict.fromkeys(timesteps)),
        topk=_optional_int("topk", fields.get("topk", []), 1, 1 << 20),
        candidates=_optional_int("candidates", fields.get("candidates", []), 1, config.max_candidates),
        top=config.default_top if top is None else top,
    )


def clean_name(filename: str | None, i: int) -> str:
    """A display name for upload ``i``: its file name without folders or control characters, or image{i}."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", (filename or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:120] or f"image{i}"


def decode_upload(data: bytes, name: str, config: ServeConfig) -> Image.Image:
    """The decoded image of one upload (first frame, EXIF orientation applied); RequestError otherwise."""
    if not data:
        raise RequestError(400, f"{name}: the file is empty")
    if len(data) > config.max_file_bytes:
        raise RequestError(413, f"{name}: {len(data):,} bytes; at most {config.max_file_bytes:,} per image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size  # reads the header only
    except UnidentifiedImageError:
        kind = next((k for sig, k in SIGNATURES.items() if data.startswith(sig)), None)
        kind = kind or ("WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None)
        if kind:
            raise RequestError(400, f"{name}: cannot be decoded: it starts like a {kind} file but is corrupt or truncated") from None
        raise RequestError(415, f"{name}: not an image (no format Pillow reads, e.g. PNG, JPEG, WebP, recognises it)") from None
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name}: too many pixels; at most {config.max_pixels:,}") from None
    except Exception as err:
        raise RequestError(400, f"{name}: cannot be decoded: corrupt or truncated header ({type(err).__name__}: {err})") from None
    if width * height > config.max_pixels:
        raise RequestError(413, f"{name}: {width} x {height} pixels; at most {config.max_pixels:,}")
    try:
        return open_image(data, config.max_pixels)
    except DecodeError as err:
        raise RequestError(400, f"{name}: cannot be decoded: {err}") from None


def decode_uploads(files: Sequence[tuple[str | None, bytes]], config: ServeConfig) -> tuple[list[Image.Image], list[str]]:
    """(images, names) of ``files`` [(filename, bytes)]; RequestError for none, too many or a bad one."""
    if not files:
        raise RequestError(400, "no image: send multipart/form-data with one or more files in the field 'image'")
    if len(files) > config.max_files:
        raise RequestError(413, f"{len(files)} images sent; at most {config.max_files} per request")
    names = [clean_name(f, i) for i, (f, _) in enumerate(files)]
    return [decode_upload(data, n, config) for (_, data), n in zip(files, names)], names
