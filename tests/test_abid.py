import json

import pytest

from binsight.data.abid import MetadataError, parse_metadata

REAL_SHAPED = {
    "BIN_FCSKU_DATA": {
        "B00CFQWRPS": {
            "asin": "B00CFQWRPS",
            "height": {"unit": "IN", "value": 2.4},
            "length": {"unit": "IN", "value": 8.2},
            "name": "Fleet Saline Enema, 7.8 Ounce (Pack of 3)",
            "quantity": 1,
            "weight": {"unit": "pounds", "value": 1.9},
            "width": {"unit": "IN", "value": 7.2},
        },
        "ZZXI0WUSIB": {
            "asin": "B004O0TREE",
            "height": {"unit": "cm", "value": 2.54},
            "name": "Sock",
            "quantity": 2,
            "weight": {"unit": "kg", "value": 1.0},
        },
    },
    "EXPECTED_QUANTITY": 3,
    "image_fname": "523.jpg",
}


def test_parses_count_items_and_units() -> None:
    record = parse_metadata(json.dumps(REAL_SHAPED), "523")
    assert record.count == 3
    assert record.quantity_sum == 3
    assert not record.quantity_mismatch
    sock = record.items[1]
    assert sock.asin == "B004O0TREE"
    assert sock.height_in == pytest.approx(1.0)
    assert sock.weight_lb == pytest.approx(2.20462, abs=1e-4)
    assert sock.length_in is None
    assert record.total_weight_lb == pytest.approx(1.9 + 2 * 2.20462, abs=1e-3)
    assert record.max_dimension_in == pytest.approx(8.2)


def test_expected_quantity_disagreeing_with_items_is_kept_and_flagged() -> None:
    doc = dict(REAL_SHAPED, EXPECTED_QUANTITY=5)
    record = parse_metadata(json.dumps(doc), "523")
    assert (record.count, record.quantity_sum, record.quantity_mismatch) == (5, 3, True)


def test_empty_bin_and_missing_expected_quantity() -> None:
    assert parse_metadata('{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 0}', "1").count == 0
    doc = {"BIN_FCSKU_DATA": REAL_SHAPED["BIN_FCSKU_DATA"]}
    assert parse_metadata(json.dumps(doc), "2").count == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"EXPECTED_QUANTITY": -1}', "negative"),
        ('{"EXPECTED_QUANTITY": 2.5}', "not a whole number"),
        ('{"EXPECTED_QUANTITY": "3"}', "not a whole number"),
        ('{"BIN_FCSKU_DATA": {}}', "no EXPECTED_QUANTITY"),
        ('{"BIN_FCSKU_DATA": {"A": {"quantity": true}}, "EXPECTED_QUANTITY": 1}', "whole number"),
        (b"\xff\xfe\x00", "not valid JSON"),
    ],
)
def test_bad_metadata_names_the_problem(raw: str | bytes, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        parse_metadata(raw, "x")
