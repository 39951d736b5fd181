"""Parsing of ABID metadata JSON (one file per bin photo).

A metadata file looks like::

    {"BIN_FCSKU_DATA": {"B00CFQWRPS": {"asin": "...", "name": "...", "quantity": 1,
                                       "length": {"unit": "IN", "value": 8.2}, ...}},
     "EXPECTED_QUANTITY": 2, "image_fname": "523.jpg"}

The label is EXPECTED_QUANTITY. It should equal the sum of the items' quantities; where it does not,
the record is kept (EXPECTED_QUANTITY is what the warehouse recorded) and the disagreement reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from binsight.utils.text import MAX_COUNT, whole_number


class MetadataError(ValueError):
    """A metadata document that cannot give a count."""


@dataclass(frozen=True)
class Item:
    asin: str
    name: str
    quantity: int
    length_in: float | None
    width_in: float | None
    height_in: float | None
    weight_lb: float | None


@dataclass(frozen=True)
class BinRecord:
    image_id: str
    count: int
    quantity_sum: int
    items: tuple[Item, ...] = field(default_factory=tuple)

    @property
    def quantity_mismatch(self) -> bool:
        return self.count != self.quantity_sum

    @property
    def total_weight_lb(self) -> float | None:
        weights = [it.weight_lb * it.quantity for it in self.items if it.weight_lb is not None]
        return round(sum(weights), 4) if weights else None

    @property
    def max_dimension_in(self) -> float | None:
        dims = [d for it in self.items for d in (it.length_in, it.width_in, it.height_in) if d is not None]
        return round(max(dims), 4) if dims else None


_INCH = {"in": 1.0, "inch": 1.0, "inches": 1.0, "cm": 1 / 2.54, "mm": 1 / 25.4, "m": 100 / 2.54}
_POUND = {
    "pounds": 1.0,
    "pound": 1.0,
    "lb": 1.0,
    "lbs": 1.0,
    "kg": 2.20462,
    "g": 0.00220462,
    "ounces": 1 / 16,
    "oz": 1 / 16,
}


def _measure(value: object, units: dict[str, float]) -> float | None:
    """ABID measures are {"unit": ..., "value": ...}; unknown units are dropped, not guessed."""
    if not isinstance(value, dict):
        return None
    number, unit = value.get("value"), str(value.get("unit", "")).strip().lower()
    if not isinstance(number, int | float) or isinstance(number, bool) or unit not in units:
        return None
    converted = float(number) * units[unit]
    return round(converted, 4) if math.isfinite(converted) else None


def _int_quantity(value: object, where: str) -> int:
    # Python's JSON reads NaN and Infinity, which no count is (and `int` refuses).
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise MetadataError(f"{where} is {value!r}, not a whole number")
    if value < 0:
        raise MetadataError(f"{where} is negative ({value})")
    if value > MAX_COUNT:
        raise MetadataError(f"{where} is over {MAX_COUNT:,}, more than any bin holds")
    return int(value)


def parse_metadata(raw: bytes | str, image_id: str) -> BinRecord:
    """Parse one metadata document; raises MetadataError naming what is wrong."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MetadataError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"top level is {type(doc).__name__}, expected an object")

    sku_data = doc.get("BIN_FCSKU_DATA", {})
    if not isinstance(sku_data, dict):
        raise MetadataError("BIN_FCSKU_DATA is not an object")
    items = []
    for key, entry in sku_data.items():
        if not isinstance(entry, dict):
            raise MetadataError(f"item {key!r} is not an object")
        items.append(
            Item(
                asin=str(entry.get("asin", key)),
                name=str(entry.get("name", "")),
                quantity=_int_quantity(entry.get("quantity", 0), f"quantity of item {key!r}"),
                length_in=_measure(entry.get("length"), _INCH),
                width_in=_measure(entry.get("width"), _INCH),
                height_in=_measure(entry.get("height"), _INCH),
                weight_lb=_measure(entry.get("weight"), _POUND),
            )
        )
    quantity_sum = sum(item.quantity for item in items)
    if "EXPECTED_QUANTITY" in doc:
        count = _int_quantity(doc["EXPECTED_QUANTITY"], "EXPECTED_QUANTITY")
    elif items:
        count = quantity_sum
    else:
        raise MetadataError("no EXPECTED_QUANTITY and no items to count")
    return BinRecord(image_id=image_id, count=count, quantity_sum=quantity_sum, items=tuple(items))


def image_id_order(image_id: str) -> tuple[int, int | str]:
    """ABID ids are integers; sort them as numbers (2 before 10), and any other ids after them."""
    number = whole_number(image_id, max_digits=18)  # longer digit strings sort as text, after
    return (0, number) if number is not None else (1, image_id)


def item_to_metadata(item: Item) -> dict[str, object]:
    """The inverse of the per-item parsing, used by the synthetic generator to write ABID-shaped files."""
    entry: dict[str, object] = {"asin": item.asin, "name": item.name, "quantity": item.quantity}
    for key, value, unit in (
        ("length", item.length_in, "IN"),
        ("width", item.width_in, "IN"),
        ("height", item.height_in, "IN"),
        ("weight", item.weight_lb, "pounds"),
    ):
        if value is not None:
            entry[key] = {"unit": unit, "value": value}
    return entry
