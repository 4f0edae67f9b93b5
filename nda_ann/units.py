"""Parsing of human sizes such as '8G' or '512M'."""
from __future__ import annotations

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """'8G' -> 8 * 2**30; plain integers are bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value}")
        return value
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "")
    try:
        out = int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {value!r}; write e.g. 8G, 512M or a byte count") from None
    if out <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return out
