"""Memory sizes: parse what people type, print what they can compare.

Cards are sold in decimal gigabytes (an "A10G 24 GB" is 23,028 MiB = 24.1 GB) while NVML reports MiB,
so the catalog's floors are decimal GB and every comparison is done in bytes. A bare number is read as
decimal GB, the way cards are labelled; binary units must be spelled out (``GiB``, ``MiB``).
"""

from __future__ import annotations

import math
import re

KB = 1000
MB = 1000**2
GB = 1000**3
TB = 1000**4
KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

# Lower-cased unit spellings. Single letters (``g``, ``m``) are decimal like the bare number;
# ``gi``/``mi`` (Kubernetes style) are binary.
_UNITS: dict[str, int] = {
    "": GB,
    "b": 1,
    "byte": 1,
    "bytes": 1,
    "k": KB,
    "kb": KB,
    "m": MB,
    "mb": MB,
    "g": GB,
    "gb": GB,
    "t": TB,
    "tb": TB,
    "ki": KIB,
    "kib": KIB,
    "mi": MIB,
    "mib": MIB,
    "gi": GIB,
    "gib": GIB,
    "ti": TIB,
    "tib": TIB,
}

_SIZE_RE = re.compile(r"^\s*(?P<num>[0-9][0-9_,]*(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse a memory size into bytes.

    Args:
        text: e.g. ``"24GB"`` (decimal, 24 * 10**9), ``"24GiB"`` (binary), ``"16384MiB"``,
            ``"23028 MiB"``, ``"1.5 tb"``. Case-insensitive, spaces allowed, thousands separators
            (``"23,028 MiB"``) accepted. A bare number, or an int/float, is decimal gigabytes.

    Returns:
        The size in bytes (rounded down to a whole byte).

    Raises:
        ValueError: the text is not a size; the message shows the accepted forms.
    """
    if isinstance(text, bool):  # bool is an int subclass; True GB is never meant
        raise ValueError(f"invalid size {text!r}: expected e.g. '24GB', '24GiB' or '16384MiB'")
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise ValueError(
                f"invalid size {text!r}: expected a number with an optional unit, e.g. '24GB' "
                "(decimal), '24GiB' or '16384MiB' (binary); a bare number means GB"
            )
        value = float(match["num"].replace("_", "").replace(",", ""))
        unit = match["unit"].lower()
        if unit not in _UNITS:
            raise ValueError(
                f"invalid size {text!r}: unknown unit {match['unit']!r}; use B, KB, MB, GB, TB "
                "(decimal) or KiB, MiB, GiB, TiB (binary)"
            )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid size {text!r}: must be a finite, non-negative amount")
    return int(value * _UNITS[unit])


def mib(n: float) -> int:
    """Bytes in ``n`` mebibytes (what NVML reports), e.g. ``mib(23028)`` for an A10G."""
    return int(n * MIB)


def gb(n: float) -> int:
    """Bytes in ``n`` decimal gigabytes (what floors are written in)."""
    return int(n * GB)


def fmt_gb(n_bytes: int | float, digits: int = 1) -> str:
    """Format bytes as decimal gigabytes, e.g. ``fmt_gb(mib(23028)) == "24.1 GB"``.

    Args:
        n_bytes: the size in bytes.
        digits: decimals to show.

    Returns:
        The size with its ``GB`` unit.
    """
    return f"{n_bytes / GB:,.{digits}f} GB"


def fmt_mib(n_bytes: int | float) -> str:
    """Format bytes as whole MiB with thousands separators, e.g. ``"23,028 MiB"`` (NVML's unit)."""
    return f"{n_bytes / MIB:,.0f} MiB"
