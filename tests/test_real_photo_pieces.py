"""The pieces real ABID photos need: packaged ImageNet backbones, the three dataset layouts, non-square
inputs end to end, and honest metrics for counts beyond the model's classes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from binsight.cli import main
from binsight.data.index import build_index
from binsight.errors import BinsightError
from binsight.imaging import Preprocess
from binsight.models import lite
from binsight.models.backbones import build_backbone, normalisation
from binsight.models.heads import CountHead, neighbour_targets
from binsight.training.config import load_config
from binsight.training.data import eval_transform, train_transform
from binsight.training.metrics import counting_metrics
from binsight.utils.io import read_csv

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet-1k class of the portrait of Rear Admiral Grace Hopper in uniform


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1"])
def test_packaged_lite_weights_classify_a_natural_photo(arch: str) -> None:
    model, features = build_backbone(arch, pretrained=True)
    # Put the ImageNet classifier back from the same file to prove every tensor landed in its place.
    state = lite.load_lite_weights(arch)
    classifier = torch.nn.Linear(features, 1000)
    classifier.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    size = lite.LITE_WEIGHTS[arch].native_size
    mean, std = normalisation(arch)
    image = Preprocess((size, size), mean, std)(GRACE_HOPPER)
    with torch.no_grad():
        probabilities = classifier(model.eval()(torch.from_numpy(image)[None])).softmax(dim=1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities[MILITARY_UNIFORM]) > 0.3


def test_a_corrupted_packaged_weight_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(lite.packaged_weights_path("efficientnet_lite0"), copy)
    with copy.open("r+b") as stream:
        stream.seek(4096)
        stream.write(b"\x00" * 16)
    monkeypatch.setattr(lite, "packaged_weights_path", lambda arch: copy)
    with pytest.raises(BinsightError, match="sha256"):
        lite.load_lite_weights("efficientnet_lite0")


def test_renaming_rejects_names_it_does_not_know() -> None:
    with pytest.raises(BinsightError, match="_mystery"):
        lite.rename_lite_state_dict({"_mystery.weight": torch.zeros(1)}, (1, 2, 2, 3, 3, 4, 1))


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(BinsightError, match="timm:<model name>"):
        build_backbone("resnet19", pretrained=False)
    model, features = build_backbone("timm:resnet10t", pretrained=False)
    assert model(torch.zeros(1, 3, 64, 96)).shape == (1, features)


def write_photos(folder: Path, ids_and_sizes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (image_id, (width, height)) in enumerate(ids_and_sizes.items()):
        (folder / f"{image_id}.jpg").write_bytes(jpeg(width, height, seed))


def test_index_reads_a_labels_csv_with_string_ids(tmp_path: Path) -> None:
    root = tmp_path / "abid"
    write_photos(root / "images", {"121": (90, 60), "00121": (47, 35), "7": (64, 64), "8": (40, 30)})
    (root / "metadata").mkdir()
    (root / "metadata" / "121.json").write_text(
        '{"BIN_FCSKU_DATA": {"A": {"asin": "A", "quantity": 2}}, "EXPECTED_QUANTITY": 2}'
    )
    # Excel's "CSV UTF-8" starts with a byte-order mark; a count that is not a number is reported.
    (root / "labels.csv").write_text("\ufeffid,count\n121,3\n00121,0\n7,12\n8,two\n", encoding="utf-8")
    root.chmod(0o555)  # a read-only photo folder: the index goes elsewhere
    out = tmp_path / "work"
    try:
        result = build_index(root, out=out)
    finally:
        root.chmod(0o755)
    assert result.layout == "labels-csv"
    rows = {r["id"]: r for r in read_csv(out / "index.csv")}
    assert set(rows) == {"121", "00121", "7"}
    assert rows["121"]["count"] == "3" and rows["00121"]["count"] == "0"
    assert rows["121"]["quantity_mismatch"] == "1"  # the CSV says 3, the items add up to 2
    assert (rows["00121"]["width"], rows["00121"]["height"]) == ("47", "35")
    assert (out / rows["00121"]["image"]).resolve() == (root / "images" / "00121.jpg").resolve()
    assert [s["id"] for s in result.skipped] == ["8"]


def test_index_reads_count_folders_and_reports_a_photo_in_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "folders"
    write_photos(root / "1", {"523": (80, 50), "0042": (50, 80)})
    write_photos(root / "3", {"24": (70, 40), "0042": (50, 80)})
    assert main(["data", "index", str(root)]) == 0
    assert "count-folders layout" in capsys.readouterr().out
    rows = {r["id"]: r for r in read_csv(root / "index.csv")}
    assert {k: v["count"] for k, v in rows.items()} == {"24": "3", "523": "1"}
    assert rows["24"]["image"] == "3/24.jpg"


def test_index_says_what_layouts_it_knows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_photos(tmp_path / "photos", {"1": (40, 30)})
    assert main(["data", "index", str(tmp_path / "photos")]) != 0
    assert "labels.csv" in capsys.readouterr().err


def test_counts_beyond_the_classes_are_never_called_correct() -> None:
    probabilities = np.eye(4)[[3, 3, 1]]  # the model answers "3+", "3+", "1"
    metrics = counting_metrics(np.array([3, 12, 1]), probabilities).model_dump(by_alias=True)
    assert metrics["accuracy"] == pytest.approx(2 / 3)  # 12 answered as "3+" is a miss
    assert metrics["mae"] == pytest.approx(9 / 3)
    assert metrics["overflow"] == {"class": "3+", "images_beyond": 1, "recognised_as_overflow": 1.0}
    assert metrics["confusion_matrix"][3][3] == 2  # as classes, 12 is in "3+"


def test_neighbour_smoothing_moves_mass_to_adjacent_counts_only() -> None:
    soft = neighbour_targets(torch.tensor([0, 2, 4]), 5, 0.2)
    assert torch.allclose(soft[0], torch.tensor([0.8, 0.2, 0, 0, 0]))
    assert torch.allclose(soft[1], torch.tensor([0, 0.1, 0.8, 0.1, 0]))
    assert torch.allclose(soft[2], torch.tensor([0, 0, 0, 0.2, 0.8]))
    head = CountHead("classification", 8, 5)
    outputs = torch.randn(3, 5)
    assert head.loss(outputs, torch.tensor([0, 2, 4]), neighbour_smoothing=0.2) > 0


def test_training_evaluation_serving_and_batch_see_the_same_pixels(tmp_path: Path) -> None:
    """One `Preprocess` everywhere: on a non-square photo the four paths agree to float rounding."""
    from binsight.batch.stages import DecodeSettings, fetch_and_decode
    from binsight.monitoring.baseline import observe_photo

    data = jpeg(470, 346, seed=1)  # ABID's median photo shape
    (tmp_path / "bin.jpg").write_bytes(data)
    mean, std = normalisation("efficientnet_lite0")
    preprocess = Preprocess((224, 304), mean, std)
    served = observe_photo(data, preprocess).pixels  # the server's path, signals observed on the way
    evaluated = eval_transform(preprocess)(preprocess.decode(data)).numpy()
    plain = train_transform(preprocess, 0.0, "none")(preprocess.decode(data)).numpy()  # no augmentation
    batch = fetch_and_decode(
        {"row": [0], "image": [str(tmp_path / "bin.jpg")], "recorded": [-1], "record_source": [""]},
        DecodeSettings(preprocess),
    )
    batched = preprocess.normalise(batch["pixels"])[0]
    assert served.shape == evaluated.shape == plain.shape == batched.shape == (3, 224, 304)
    for other in (evaluated, plain, batched, preprocess(data)):
        np.testing.assert_allclose(other, served, atol=1e-6)
    augmented = train_transform(preprocess, 1.0, "hv")(preprocess.decode(data))
    assert augmented.shape == (3, 224, 304)


def test_the_abid_recipe_loads_and_flags_override_it() -> None:
    config = load_config(None, {"data": "d", "epochs": 2}, recipe="abid")
    assert config.arch == "efficientnet_lite0" and config.epochs == 2
    with pytest.raises(BinsightError, match="unknown recipe"):
        load_config(None, {"data": "d"}, recipe="nope")


@pytest.mark.parametrize("kind", ["ordinal", "regression"])
def test_heads_start_at_the_training_base_rates(kind: str) -> None:
    class_counts = torch.tensor([4, 439, 229, 153, 212, 311, 58])  # a real ABID training split
    head = CountHead(kind, 8, 7, dropout=0.0)
    head.start_from_prior(class_counts)
    torch.nn.init.zeros_(head.fc.weight)  # no evidence from the photo: the head answers the prior
    with torch.no_grad():
        probabilities = head.probabilities(head(torch.randn(1, 8)))[0]
    frequency = (class_counts + 1) / (class_counts.sum() + 7)
    if kind == "ordinal":
        assert torch.allclose(probabilities, frequency.float(), atol=1e-4)
    else:  # regression: centred on the mean count
        mean = float((frequency * torch.arange(7)).sum())
        assert float((probabilities * torch.arange(7)).sum()) == pytest.approx(mean, abs=0.15)


def test_train_cli_with_the_abid_recipe_and_a_non_square_input(synth_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    assert main(["data", "index", str(data)]) == 0
    assert main(["data", "split", str(data)]) == 0
    out = tmp_path / "run"
    argv = ["train", "--recipe", "abid", "--data", str(data), "--out", str(out), "--epochs", "1"]
    argv += ["--max-train-batches", "1", "--image-size", "32", "--image-width", "48", "--workers", "0"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["arch"], saved["image_size"], saved["image_width"]) == ("efficientnet_lite0", 32, 48)
    assert list((data / ".cache").glob("train-32x48px-*.npy"))  # the recipe caches decoded photos
