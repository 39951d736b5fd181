import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from binsight.data.abid import parse_metadata
from binsight.data.synth import SynthConfig, generate_dataset, render_example


def test_examples_are_a_pure_function_of_seed_and_index() -> None:
    config = SynthConfig(n_images=10, image_size=96)
    first, meta = render_example(5, 3, config)
    again, meta_again = render_example(5, 3, config)
    other, _ = render_example(6, 3, config)
    assert first == again and meta == meta_again
    assert first != other


def test_labels_are_consistent_and_images_decode() -> None:
    config = SynthConfig(n_images=10, image_size=128)
    for index in range(40):
        jpeg, meta = render_example(0, index, config)
        record = parse_metadata(json.dumps(meta), str(index))
        assert record.count == record.quantity_sum
        assert 0 <= record.count <= config.max_count
        image = Image.open(io.BytesIO(jpeg))
        assert image.size == (128, 128) and image.format == "JPEG"


def test_count_distribution_follows_class_weights() -> None:
    config = SynthConfig(n_images=10, image_size=64, max_count=2, class_weights=(0.0, 1.0, 3.0))
    counts = Counter(render_example(1, i, config)[1]["EXPECTED_QUANTITY"] for i in range(200))
    assert counts[0] == 0
    assert 2.0 < counts[2] / counts[1] < 4.5


def test_more_objects_change_more_of_the_picture() -> None:
    """The label must be visible in the pixels: fuller bins differ more from their empty fabric."""
    config = SynthConfig(n_images=10, image_size=96)
    spread: dict[int, list[float]] = {}
    for index in range(150):
        jpeg, meta = render_example(2, index, config)
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=float)
        spread.setdefault(meta["EXPECTED_QUANTITY"], []).append(float(pixels.std(axis=(0, 1)).mean()))
    assert np.mean(spread[5]) > np.mean(spread[0]) + 3


def test_generation_resumes_and_is_worker_count_independent(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert generate_dataset(one, SynthConfig(n_images=6, image_size=64, workers=1)) == 6
    assert generate_dataset(one, SynthConfig(n_images=9, image_size=64, workers=1)) == 3
    generate_dataset(two, SynthConfig(n_images=9, image_size=64, workers=2))
    for image in sorted((one / "images").iterdir()):
        assert image.read_bytes() == (two / "images" / image.name).read_bytes()
    assert not list(one.rglob("*.part"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_images": 0},
        {"image_size": 8},
        {"max_count": 2, "class_weights": (1.0, 1.0)},
        {"class_weights": (0, 0, 0, 0, 0, 0)},
        {"unknown": 1},
    ],
)
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        SynthConfig(**kwargs)
