"""Memory sizes: decimal vs binary units, and what NVML's MiB look like in decimal GB."""

from __future__ import annotations

import pytest

from batchllm.sizes import GB, GIB, MIB, fmt_gb, fmt_mib, gb, mib, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * 10**9),
        ("24 gb", 24 * 10**9),
        ("24", 24 * 10**9),  # bare number: decimal GB, how cards are sold
        ("1.5", 1_500_000_000),
        ("24GiB", 24 * 2**30),
        ("24 gib", 24 * 2**30),
        ("16384MiB", 16384 * 2**20),
        ("23028 MiB", 23028 * 2**20),
        ("23,028 MiB", 23028 * 2**20),
        ("  512mb ", 512 * 10**6),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("8G", 8 * 10**9),
        ("8Gi", 8 * 2**30),
        ("100b", 100),
        ("0", 0),
        (".5GB", 500_000_000),
        (24, 24 * 10**9),
        (0.5, 500_000_000),
    ],
)
def test_parse_size(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "24 GX", "twenty GB", "-1GB", "24 G B", "1e3GB", "nan", True])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)  # type: ignore[arg-type]


def test_unknown_unit_message_lists_units() -> None:
    with pytest.raises(ValueError, match=r"unknown unit 'GX'.*GiB"):
        parse_size("24 GX")


def test_helpers_and_formatting() -> None:
    assert mib(23028) == 23028 * MIB
    assert gb(24) == 24 * GB
    assert GIB == 2**30
    assert fmt_gb(mib(23028)) == "24.1 GB"  # an A10G is a 24 GB card
    assert fmt_gb(mib(16384)) == "17.2 GB"
    assert fmt_gb(24 * GB, 0) == "24 GB"
    assert fmt_mib(mib(23028)) == "23,028 MiB"
    assert mib(23028) >= parse_size("24GB") > mib(16384)
