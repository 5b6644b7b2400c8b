"""The rules an item must meet, in UTF-8 bytes, at their exact limits; the ingest checks
and the store's are the same functions, so these hold for both."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from clipsearch.server import limits
from clipsearch.server.errors import InvalidInput
from clipsearch.server.ingest import IngestItem, checked_fields
from clipsearch.server.store import StoredItem, validation
from clipsearch.server.store.indexing import check_window

CJK = "字"  # three bytes in UTF-8


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` levels deep: the object and depth - 1 arrays inside it."""
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {"a": value}


@pytest.mark.parametrize(
    ("field", "limit"),
    [("id", limits.MAX_ID_BYTES), ("uri", limits.MAX_URI_BYTES)],
)
def test_text_fields_are_capped_in_bytes_not_characters(field: str, limit: int) -> None:
    fitting = CJK * (limit // 3)
    over = CJK * (limit // 3 + 1)
    item = {"id": "x", field: fitting}
    validation.check_fields(StoredItem(**item))
    with pytest.raises(InvalidInput, match=f"{len(over.encode())} bytes"):
        validation.check_fields(StoredItem(**{**item, field: over}))


def test_the_ingest_checks_are_the_stores() -> None:
    image = b"\xff\xd8 not decoded here"
    fields = checked_fields(IngestItem(seq=1, image=image, caption="c" * 8192))
    assert len(fields.id) == 32  # the content hash
    with pytest.raises(InvalidInput, match="caption is 8193 bytes"):
        checked_fields(IngestItem(seq=1, image=image, caption="c" * 8193))
    with pytest.raises(InvalidInput, match="600 bytes"):
        checked_fields(IngestItem(seq=1, image=image, id=CJK * 200))
    with pytest.raises(InvalidInput, match="no image"):
        checked_fields(IngestItem(seq=1, image=b"", id="x"))


def test_control_characters() -> None:
    validation.check_fields(StoredItem("x", caption="tab\tline\nreturn\r"))
    for bad in ("a\x00b", "bell\x07", "del\x7f"):
        with pytest.raises(InvalidInput, match="control character"):
            validation.check_fields(StoredItem("x", caption=bad))
        with pytest.raises(InvalidInput, match="control character"):
            validation.check_id(bad)
    with pytest.raises(InvalidInput, match="control character"):
        validation.check_id("line\nbreak")  # ids go into filter expressions


def test_metadata_depth_size_and_numbers() -> None:
    depth = limits.MAX_METADATA_DEPTH
    validation.check_metadata(nested(depth), "x")
    with pytest.raises(InvalidInput, match=f"nested more than {depth} levels deep"):
        validation.check_metadata(nested(depth + 1), "x")
    deep_text = "[" * 30_000 + "]" * 30_000
    with pytest.raises(InvalidInput, match="not valid JSON"):
        validation.parse_metadata('{"a": ' + deep_text + "}", "x")
    with pytest.raises(InvalidInput, match="NaN"):
        validation.parse_metadata('{"x": NaN}', "x")
    with pytest.raises(InvalidInput, match="JSON object"):
        validation.parse_metadata("[1]", "x")
    assert validation.parse_metadata('{"k": [1, {"n": null}]}', "x") == {"k": [1, {"n": None}]}
    # 11,000 CJK characters: 33 KB as UTF-8, 66 KB as the escaped JSON Milvus measures.
    wide = {"text": CJK * 11_000}
    assert len(json.dumps(wide, ensure_ascii=False).encode()) < limits.MAX_METADATA_BYTES
    parsed = validation.parse_metadata(json.dumps(wide, ensure_ascii=False), "x")
    assert parsed == wide  # it fits as text...
    with pytest.raises(InvalidInput, match="larger than 65536 bytes"):
        validation.check_metadata(parsed, "x")  # ...not as Milvus stores it


def test_check_item_normalizes_vectors_and_refuses_non_finite_ones() -> None:
    item = StoredItem("x", image_vector=np.array([3.0, 4.0]), caption_vector=None)
    checked = validation.check_item(item, 2)
    assert checked.image_vector is not None
    assert checked.image_vector.dtype == np.float32
    assert np.allclose(checked.image_vector, [0.6, 0.8])
    with pytest.raises(InvalidInput, match="NaN"):
        validation.check_item(
            StoredItem("x", image_vector=np.ones(2), caption_vector=np.array([np.inf, 1.0])), 2
        )


def test_output_fields_and_the_result_window_have_one_definition() -> None:
    assert validation.output_fields(()) == limits.OUTPUT_FIELDS
    assert validation.output_fields(["uri", "uri"]) == ("uri",)
    with pytest.raises(InvalidInput, match="unknown output field 'vector' in output_fields"):
        validation.output_fields(["vector"])
    check_window(1, limits.MAX_RESULT_WINDOW - 1)
    with pytest.raises(InvalidInput, match=f"at most {limits.MAX_RESULT_WINDOW}"):
        check_window(1, limits.MAX_RESULT_WINDOW)


def test_checking_many_items_at_once_is_checking_each() -> None:
    rng = np.random.default_rng(3)
    unit = rng.standard_normal((4, 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    items = [
        StoredItem("fine", image_vector=unit[0], caption_vector=unit[1]),
        StoredItem("long", image_vector=unit[2] * 3),  # normalized, as one at a time
        StoredItem("nan", image_vector=np.full(8, np.nan, np.float32)),
        StoredItem("short", image_vector=unit[3][:4]),
        StoredItem("no-image", caption_vector=unit[3]),
        StoredItem("bad-caption", image_vector=unit[3], caption_vector=np.zeros(8, np.float32)),
        StoredItem("float64", image_vector=unit[3].astype(np.float64)),
    ]
    together = validation.check_vectors_each(items, 8)
    for item, result in zip(items, together, strict=True):
        try:
            alone: StoredItem | InvalidInput = validation.check_vectors(item, 8)
        except InvalidInput as exc:
            alone = exc
        assert type(result) is type(alone), item.id
        if isinstance(alone, InvalidInput):
            assert str(result) == str(alone)
        else:
            assert isinstance(result, StoredItem)
            assert result.image_vector is not None and alone.image_vector is not None
            np.testing.assert_array_equal(result.image_vector, alone.image_vector)
            assert result.image_vector.dtype == np.float32
    assert [type(r).__name__ for r in together] == ["StoredItem"] * 2 + ["InvalidInput"] * 4 + [
        "StoredItem"
    ]
    with pytest.raises(InvalidInput, match="'nan'"):
        validation.check_items(items, 8)
    assert validation.check_items(items[:2], 8)[1].image_vector == pytest.approx(unit[2])
