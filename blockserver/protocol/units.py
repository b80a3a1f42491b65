"""Human sizes, as both commands take them: `4096`, `64KiB`, `1MiB`, `2GiB` (also
KB/MB/GB = 1000^n)."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
          "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40,
          "tib": 1 << 40, "tb": 10**12}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*\Z")


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError with a readable message when it is not a size."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 4096, 64KiB, 1MiB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def size_argument(text: str) -> int:
    """`parse_size` as an argparse type: a bad size is a usage error, not a traceback."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: float) -> str:
    """`n` bytes for a person: `512 B`, `1.5 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
