"""ttl and retention settings: ints in timestamp units or timedeltas converted to the table's
unit, each bad value refused with a ConfigError naming the setting and the value."""

from __future__ import annotations

import datetime

import numpy as np
import pytest

from mmload.errors import ConfigError
from mmload.features.snapshot import check_duration, duration

WHY = "must be None, an int >= 0 in timestamp units, or a timedelta"


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, np.float64(2.0)])
def test_check_duration_refuses(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        check_duration("retention", value)
    assert str(info.value) == f"retention={value!r}: {WHY}"


@pytest.mark.parametrize(
    "value", [None, 0, 5, np.int32(5), datetime.timedelta(0), np.timedelta64(-3, "s")]
)
def test_check_duration_accepts(value: object) -> None:
    check_duration("ttl", value)  # a negative timedelta is refused later, with the unit known


@pytest.mark.parametrize(
    ("value", "unit", "ticks"),
    [
        (None, "ms", None),
        (7, None, 7),
        (np.int64(7), "ns", 7),
        (datetime.timedelta(0), "ms", 0),  # zero is a valid ttl (exact matches only)
        (datetime.timedelta(seconds=1.5), "ms", 1500),
        (datetime.timedelta(days=1), "s", 86_400),
        (np.timedelta64(3, "s"), "us", 3_000_000),
        (np.timedelta64(2500, "ms"), "s", 2),  # truncated to the unit
    ],
)
def test_duration_in_the_tables_unit(value: object, unit: str | None, ticks: int | None) -> None:
    got = duration("ttl", value, unit)  # type: ignore[arg-type]
    assert got == ticks and (got is None or type(got) is int)


def test_duration_refuses() -> None:
    with pytest.raises(ConfigError) as info:
        duration("ttl", datetime.timedelta(seconds=1), None)
    assert str(info.value) == (
        "ttl=datetime.timedelta(seconds=1): a timedelta needs an Arrow timestamp column; "
        "give an int"
    )
    for value in (datetime.timedelta(seconds=-1), np.timedelta64(-1, "ms")):
        with pytest.raises(ConfigError) as info:
            duration("retention", value, "ms")
        assert str(info.value) == f"retention={value!r}: must be >= 0"
