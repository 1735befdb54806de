"""Field classes: the fixed shape read from an Arrow type string (checked against pyarrow's own
type objects) and the reasons ``conform`` gives for values that do not fit a class."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmload.decode.fields import (
    collate,
    conform,
    field_kind,
    fixed_shape,
    jagged_class,
    kind_class,
)
from mmload.jagged import Jagged

_LEAVES = [
    pa.int8(), pa.int16(), pa.int32(), pa.int64(),
    pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(),
    pa.float16(), pa.float32(), pa.float64(), pa.bool_(),
    pa.string(), pa.binary(), pa.timestamp("us"), pa.date32(), pa.decimal128(5, 2),
]  # fmt: skip


def _pyarrow_shape(t: pa.DataType) -> tuple[int, ...] | None:
    """The oracle: walk pyarrow's type objects, not the type's string."""
    dims: list[int] = []
    while pa.types.is_fixed_size_list(t):
        dims.append(t.list_size)
        t = t.value_type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    return tuple(dims) if dims and numeric else None


def _types() -> list[pa.DataType]:
    out: list[pa.DataType] = []
    for leaf in _LEAVES:
        out.append(leaf)
        for nullable in (True, False):
            inner = pa.list_(pa.field("item", leaf, nullable=nullable), 3)
            out.append(inner)
            out.append(pa.list_(pa.field("element", inner, nullable=nullable), 2))
            out.append(pa.list_(pa.list_(pa.field("x", inner, nullable=nullable), 4), 5))
        out.append(pa.list_(leaf))  # variable length: no fixed shape
        out.append(pa.list_(pa.list_(leaf), 2))  # fixed outside, variable inside
        out.append(pa.large_list(pa.list_(leaf, 2)))
    out.append(pa.struct([("a", pa.int32())]))
    return out


@pytest.mark.parametrize("t", _types(), ids=str)
def test_fixed_shape_agrees_with_pyarrow(t: pa.DataType) -> None:
    assert fixed_shape(str(t)) == _pyarrow_shape(t)


def test_fixed_shape_examples() -> None:
    assert fixed_shape(str(pa.list_(pa.float16(), 4))) == (4,)
    assert fixed_shape(str(pa.list_(pa.field("item", pa.bool_(), nullable=False), 7))) == (7,)
    nested = pa.list_(pa.field("item", pa.list_(pa.uint64(), 2), nullable=False), 3)
    assert str(nested).count("not null") == 1
    assert fixed_shape(str(nested)) == (3, 2)
    assert fixed_shape("fixed_size_list<item: string>[2]") is None
    assert fixed_shape("float") is None  # a scalar has no list shape


@pytest.mark.parametrize(
    ("cls", "value", "reason"),
    [
        ("int", 2**63, f"{2**63} does not fit in int64"),
        ("int", -(2**63) - 1, f"{-(2**63) - 1} does not fit in int64"),
        ("int", True, "a bool is not an integer"),
        ("int", None, "null is not an integer"),
        ("int", 1.0, "a float is not an integer"),
        ("float", "1", "a str is not a number"),
        ("float", np.bool_(True), "a bool is not a number"),
        ("bool", 1, "a int is not a bool"),
        ("str", b"x", "a bytes is not a string"),
        ("bytes", "x", "a str is not bytes"),
        ("array", [1, 2], "a list is not a numeric list (null, or null elements?)"),
        ("array", np.array(["a"]), "a ndarray is not a numeric list (null, or null elements?)"),
        ("jagged_int", [1], "a list is not a list of numbers"),
        ("jagged_int", np.zeros((2, 2), np.int64), "a ndarray is not a list of numbers"),
        (
            "jagged_int",
            np.zeros(2),
            "a list of float64 (null elements?), where the field holds ints",
        ),
        (
            "jagged_bool",
            np.zeros(2, np.int8),
            "a list of int8 (null elements?), where the field holds bools",
        ),
        (
            "jagged_int",
            np.array([2**63], np.uint64),
            f"a list with {2**63}, which does not fit in int64",
        ),
        ("ragged", "abc", "a str is not a list"),
    ],
)
def test_conform_names_why_a_value_does_not_fit(cls: str, value: object, reason: str) -> None:
    assert conform(cls, value) == reason  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "value"),
    [
        ("int", 2**63 - 1),
        ("int", -(2**63)),
        ("int", np.int32(3)),
        ("float", 3),
        ("float", np.float16(1.5)),
        ("bool", np.bool_(False)),
        ("str", None),
        ("bytes", None),
        ("array", np.zeros(3, np.uint8)),
        ("jagged_int", None),
        ("jagged_int", np.array([2**63 - 1], np.uint64)),
        ("jagged_int", np.array([], np.uint64)),
        ("jagged_float", np.zeros(2, np.int16)),
        ("jagged_bool", np.zeros(2, bool)),
        ("ragged", None),
        ("ragged", [1, "a"]),
        ("any", object()),
    ],
)
def test_conform_accepts_values_of_the_class(cls: str, value: object) -> None:
    assert conform(cls, value) is None  # type: ignore[arg-type]


def test_conform_checks_an_array_fields_pinned_shape() -> None:
    assert conform("array", np.zeros((3, 2)), (3, 2)) is None
    assert conform("array", np.zeros((2, 3)), (3, 2)) == (
        "a list of shape (2, 3), where the field's values have shape (3, 2)"
    )
    assert conform("array", np.zeros((2, 3))) is None  # no pinned shape


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("jpg", "image"), ("x.png", "image"), ("left.view.webp", "image"), ("gif", "image"),
        ("flac", "audio"), ("clip.wav", "audio"), ("ogg", "audio"),
        ("mp4", "video"), ("a.b.mov", "video"), ("webm", "video"),
        ("cls", "int"), ("meta.label", "int"), ("id", "int"), ("x.cls2", "int"),
        ("json", "json"), ("meta.json", "json"),
        ("txt", "text"), ("caption.text", "text"),
        ("npy", "bytes"), ("json.gz", "bytes"), ("cls.txt.bin", "bytes"), ("JPG", "bytes"),
        ("jpg.cls", "int"), ("a.b.json", "json"),
    ],
)  # fmt: skip
def test_field_kind_from_the_last_dotted_part(name: str, kind: str) -> None:
    assert field_kind(name, b"raw") == kind
    assert field_kind(name, bytearray(b"raw")) == kind
    assert field_kind(name, memoryview(b"raw")) == kind
    assert field_kind(name, 3) == "value"  # a typed column value, whatever its name


def test_field_kind_with_named_image_fields() -> None:
    images = frozenset({"photo", "thumb.jpg"})
    assert field_kind("photo", b"x", images) == "image"
    assert field_kind("thumb.jpg", b"x", images) == "image"
    assert field_kind("other.jpg", b"x", images) == "bytes"  # named fields only
    assert field_kind("a.flac", b"x", images) == "audio"
    assert field_kind("a.json", b"x", frozenset()) == "json"


def _is_any_list(t: pa.DataType) -> bool:
    kinds = (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view)
    return any(is_list(t) for is_list in (*kinds, pa.types.is_large_list_view))


def _jagged_oracle(t: pa.DataType) -> str | None:
    if not _is_any_list(t):
        return None
    v = t.value_type
    if pa.types.is_integer(v):
        return "jagged_int"
    if pa.types.is_floating(v):
        return "jagged_float"
    return "jagged_bool" if pa.types.is_boolean(v) else None


@pytest.mark.parametrize(
    "t",
    [
        *(pa.list_(leaf) for leaf in _LEAVES),
        *(pa.large_list(pa.field("item", leaf, nullable=False)) for leaf in _LEAVES),
        pa.list_(pa.list_(pa.int32())),
        pa.list_(pa.list_(pa.int32(), 2)),
        pa.list_(pa.int32(), 2),
        pa.int32(),
    ],
    ids=str,
)
def test_jagged_class_agrees_with_pyarrow(t: pa.DataType) -> None:
    assert jagged_class(str(t)) == _jagged_oracle(t)


def test_collate_scalars_to_typed_vectors() -> None:
    narrow = collate([np.int32(3), np.uint8(200)], "int")  # numpy scalars of any width
    assert isinstance(narrow, torch.Tensor)
    assert narrow.dtype == torch.int64 and narrow.tolist() == [3, 200]
    ints = collate([np.int64(3), 2**40, -1], "int")
    assert isinstance(ints, torch.Tensor)
    assert ints.dtype == torch.int64 and ints.tolist() == [3, 2**40, -1]
    floats = collate([1, 0.5, np.float64(2.25)], "float")
    assert isinstance(floats, torch.Tensor)
    assert floats.dtype == torch.float32 and floats.tolist() == [1.0, 0.5, 2.25]
    bools = collate([True, np.bool_(False)], "bool")
    assert isinstance(bools, torch.Tensor)
    assert bools.dtype == torch.bool and bools.tolist() == [True, False]
    for cls in ("int", "float", "bool"):
        one = collate([1], cls)  # type: ignore[arg-type]
        assert isinstance(one, torch.Tensor) and one.shape == (1,), cls


def test_collate_arrays_stack_and_float64_narrows() -> None:
    f = collate([np.ones((2, 3)), np.zeros((2, 3))], "array")
    assert isinstance(f, torch.Tensor)
    assert f.dtype == torch.float32 and f.shape == (2, 2, 3) and f.sum().item() == 6.0
    i = collate([np.arange(3, dtype=np.int16), np.arange(3, dtype=np.int16)], "array")
    assert isinstance(i, torch.Tensor) and i.dtype == torch.int16 and i[1].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"different shapes \[\(2,\), \(3,\)\]"):
        collate([np.zeros(3), np.zeros(2)], "array")


def test_collate_jagged_and_other_values() -> None:
    j = collate([np.array([1, 2]), None, np.array([3])], "jagged_int")
    assert isinstance(j, Jagged)
    assert j.values.dtype == torch.int64 and j.values.tolist() == [1, 2, 3]
    assert j.offsets.tolist() == [0, 2, 2, 3]
    fj = collate([np.array([0.5])], "jagged_float")
    assert isinstance(fj, Jagged) and fj.values.dtype == torch.float32
    values = [{"a": 1}, "b"]
    out = collate(values, "any")
    assert out == values and out is not values


def _class_oracle(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_timestamp(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "str"
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    ):
        return "bytes"
    if pa.types.is_fixed_size_list(t):
        return "array"
    if _is_any_list(t):
        return _jagged_oracle(t) or "ragged"
    return "any"


@pytest.mark.parametrize(
    "t",
    [
        *_LEAVES,
        pa.timestamp("ns", tz="UTC"), pa.large_string(), pa.string_view(), pa.large_binary(),
        pa.binary_view(), pa.binary(16), pa.list_(pa.float32(), 4),
        pa.list_(pa.int8()), pa.large_list(pa.bool_()), pa.list_view(pa.float64()),
        pa.large_list_view(pa.uint8()), pa.list_(pa.string()), pa.list_(pa.list_(pa.int32())),
        pa.dictionary(pa.int32(), pa.string()), pa.dictionary(pa.int8(), pa.int64()),
        pa.struct([("a", pa.int32())]), pa.map_(pa.string(), pa.int32()), pa.null(),
    ],
    ids=str,
)  # fmt: skip
def test_kind_class_of_typed_columns_agrees_with_pyarrow(t: pa.DataType) -> None:
    assert kind_class("value", str(t)) == _class_oracle(t)


def test_kind_class_of_encoded_fields() -> None:
    assert kind_class("int", None) == "int"
    assert kind_class("text", None) == "str"
    assert kind_class("bytes", None) == "bytes"
    for kind in ("json", "image", "audio", "video"):
        assert kind_class(kind, "int64") == "any", kind  # type: ignore[arg-type]
    assert kind_class("value", None) == "any"  # a column of unknown type
