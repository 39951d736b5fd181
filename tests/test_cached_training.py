"""The DINOv2 backbone from its packaged weights, training on cached features (the frozen part runs
once per photo and view), class-balanced loss and distillation from teachers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from binsight.errors import BinsightError
from binsight.export.onnx import ExportConfig, export
from binsight.inference.runtime import load_counter
from binsight.models import dinov2
from binsight.models.dinov2 import Dinov2Backbone, build_dinov2_small, packaged_file
from binsight.models.heads import CountHead
from binsight.training.cached import CACHE_CHUNK
from binsight.training.checkpoint import load_checkpoint
from binsight.training.config import TrainConfig
from binsight.training.engine import train
from binsight.training.objective import Objective, class_weights, ranked_probability_score


def _packaged_encoder_output(images: np.ndarray) -> np.ndarray:
    """The packaged saliency model's encoder output (its final layer norm), as ONNX Runtime computes it."""
    proto = onnx.load(str(packaged_file()))
    norm = [n for n in proto.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(norm.output[0], onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([norm.output[0]], {"input_image": images})[0])


def test_the_packaged_dinov2_loads_strictly_and_matches_its_onnx_encoder() -> None:
    images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    model = build_dinov2_small((224, 224)).eval()
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(images)).numpy()
    assert np.abs(ours - _packaged_encoder_output(images)).max() < 1e-4
    # Any input size with sides that are multiples of the patch: the grid is resized the upstream way.
    backbone = Dinov2Backbone((56, 70)).eval()
    with torch.no_grad():
        tokens = backbone.prefix(torch.zeros(1, 3, 56, 70), 5)
        assert tokens.shape == (1, 1 + 4 * 5, 384)
        assert torch.allclose(backbone.tail(tokens, 5), backbone(torch.zeros(1, 3, 56, 70)), atol=1e-5)
    with pytest.raises(BinsightError, match="multiples of 14"):
        Dinov2Backbone((50, 70))


def test_a_substituted_weight_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "vit_s_focus.onnx"
    shutil.copy(packaged_file(), copy)
    with copy.open("r+b") as handle:  # one byte changed, deep inside the weights
        handle.seek(50_000_000)
        byte = handle.read(1)
        handle.seek(50_000_000)
        handle.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(dinov2, "packaged_file", lambda: copy)
    dinov2._packaged_state.cache_clear()
    try:
        with pytest.raises(BinsightError, match="not the published"):
            build_dinov2_small((56, 56))
    finally:
        dinov2._packaged_state.cache_clear()


def _config(trained: dict[str, Path], out: Path, **settings: object) -> TrainConfig:
    values: dict[str, object] = {
        "epochs": 2,
        "batch_size": 16,
        "workers": 0,
        "tensorboard": False,
        **settings,
    }
    return TrainConfig(data=trained["data"], out=out, **values)  # type: ignore[arg-type]


def test_dinov2_trains_on_cached_tokens_and_exports(trained: dict[str, Path], tmp_path: Path) -> None:
    config = _config(
        trained,
        tmp_path / "run",
        arch="dinov2_small",
        image_size=56,
        image_width=70,
        train_on_cache=True,
        frozen_blocks=10,
        cache_views=["o", "hv"],
        lr=1e-3,
    )
    before = Dinov2Backbone((56, 70)).state_dict()
    summary = train(config)
    assert summary.epochs_run == 2 and summary.best.value is not None
    after = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    # The frozen blocks are the packaged weights, untouched; the blocks after them trained.
    for key in ("vit.blocks.0.attn.qkv.weight", "vit.blocks.9.mlp.fc2.weight", "vit.patch_embed.proj.weight"):
        assert torch.equal(after[f"backbone.{key}"], before[key]), key
    assert not torch.equal(
        after["backbone.vit.blocks.11.mlp.fc2.weight"], before["vit.blocks.11.mlp.fc2.weight"]
    )
    caches = list((trained["data"] / ".cache").glob("features-*/hv.npy"))
    assert caches and np.load(caches[0], mmap_mode="r").dtype == np.float16
    report = export(ExportConfig(checkpoint=tmp_path / "run" / "best.pt", out=tmp_path / "dino.onnx"))
    assert report.max_abs_diff_vs_pytorch < 1e-4
    counter = load_counter(report.onnx, backend="onnxruntime")
    assert counter.check is not None and counter.check.passed and counter.info.arch == "dinov2_small"


def test_an_interrupted_feature_cache_resumes_to_the_same_features(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(
        trained, tmp_path / "a", arch="efficientnet_lite0", image_size=64, train_on_cache=True, epochs=1
    )
    before = set((trained["data"] / ".cache").glob("features-*"))
    train(config)
    # This run's cache of the training photos (they have the mirrored view too), not another test's.
    (folder,) = (
        p
        for p in set((trained["data"] / ".cache").glob("features-*")) - before
        if "h" in json.loads((p / "progress.json").read_text())
    )
    complete = np.array(np.load(folder / "o.npy"))
    progress = json.loads((folder / "progress.json").read_text())
    half = progress["o"] // 2 // CACHE_CHUNK * CACHE_CHUNK  # a killed build's progress ends on a chunk
    corrupted = np.lib.format.open_memmap(folder / "o.npy", mode="r+")
    corrupted[half:] = 0  # as if the build had been killed half way
    corrupted.flush()
    (folder / "progress.json").write_text(json.dumps({**progress, "o": half}))
    train(config.model_copy(update={"out": tmp_path / "b"}))
    np.testing.assert_array_equal(np.load(folder / "o.npy"), complete)


def test_a_cnn_on_the_cache_trains_its_head_only_with_or_without_sam(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    from binsight.models.factory import build_model

    config = _config(
        trained,
        tmp_path / "run",
        arch="mobilenet_v3_small",
        pretrained=False,
        image_size=32,
        train_on_cache=True,
    )
    torch.manual_seed(config.seed)  # as `train` does before it builds the model
    start = build_model(
        config.arch, config.head, 6, False, None, config.dropout, config.input_hw
    ).state_dict()
    train(config)
    end = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(end[k], start[k]) for k in backbone)  # BatchNorm statistics too
    assert not torch.equal(end["head.fc.weight"], start["head.fc.weight"])

    # Sharpness-aware steps reach the tail on the cache too: same run, other weights.
    train(config.model_copy(update={"out": tmp_path / "sam", "sam": 0.05}))
    sam = load_checkpoint(tmp_path / "sam" / "last.pt")["model"]
    assert all(torch.equal(sam[k], start[k]) for k in backbone)
    # (this small net's pooled features are dead, so the weights only decay and the bias learns)
    assert not torch.allclose(sam["head.fc.bias"], end["head.fc.bias"])


def test_class_weights_and_distillation_shape_the_loss() -> None:
    targets = np.array([1] * 8 + [3] * 2)
    weights = class_weights(targets, 5, 1.0)
    assert weights is not None and weights[3] == pytest.approx(4 * weights[1])
    assert class_weights(targets, 5, 0.0) is None
    head = CountHead("classification", 4, 5)
    config = TrainConfig(data=Path("."), distill=0.5)
    teacher = torch.full((10, 5), 0.2)
    objective = Objective(head, config, None, teacher)
    outputs = torch.zeros(2, 5)  # uniform: cross-entropy log 5 against the label and the teacher alike
    loss = objective(outputs, torch.tensor([1, 3]), torch.tensor([0, 9]))
    assert float(loss) == pytest.approx(np.log(5), rel=1e-5)
    confident = torch.tensor(
        [[0.0, 9.0, 0.0, 0.0, 0.0]] * 2
    )  # sure of 1: right by the label, not the teacher
    plain = Objective(head, config.model_copy(update={"distill": 0.0}))(
        confident, torch.tensor([1, 1]), torch.tensor([0, 1])
    )
    mixed = objective(confident, torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert float(mixed) > float(plain) + 1.0


def test_the_ranked_probability_score_charges_mass_by_its_distance_from_the_count() -> None:
    sure = torch.eye(5)[[2, 3, 4, 0]]  # right, one off, two off, two off below
    assert ranked_probability_score(sure, torch.tensor([2, 2, 2, 2])).tolist() == [0.0, 1.0, 2.0, 2.0]
    # Cumulative 0.2/0.4/0.6/0.8 against 0/0/1/1: 0.04 + 0.16 + 0.16 + 0.04.
    uniform = torch.full((1, 5), 0.2)
    assert float(ranked_probability_score(uniform, torch.tensor([2]))) == pytest.approx(0.4)

    head = CountHead("classification", 4, 5)
    config = TrainConfig(data=Path("."))
    outputs = torch.tensor([[0.0, 0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0, 4.0]])  # 3 and 4: 1 and 2 off
    targets = torch.tensor([2, 2])
    plain = float(Objective(head, config)(outputs, targets, torch.tensor([0, 1])))
    scored = float(
        Objective(head, config.model_copy(update={"rps_weight": 2.0}))(outputs, targets, torch.tensor([0, 1]))
    )
    expected = 2.0 * float(ranked_probability_score(outputs.softmax(dim=1), targets).mean())
    assert scored == pytest.approx(plain + expected, rel=1e-5)
    # Cross-entropy charges both answers alike (the count's probability is the same); the score does not.
    per_photo = ranked_probability_score(outputs.softmax(dim=1), targets)
    assert float(per_photo[1]) > float(per_photo[0])


def test_a_student_learns_from_its_teachers(trained: dict[str, Path], tmp_path: Path) -> None:
    config = _config(
        trained,
        tmp_path / "student",
        arch="mobilenet_v3_small",
        pretrained=False,
        image_size=32,
        teachers=[trained["checkpoint_a"], trained["checkpoint_b"]],
        distill=0.7,
        epochs=1,
    )
    train(config)
    cached = list((tmp_path / "student").glob("teachers-*.npy"))
    assert len(cached) == 1
    answers = np.load(cached[0])
    assert answers.shape[0] == len((trained["data"] / "splits" / "train.csv").read_text().splitlines()) - 1
    np.testing.assert_allclose(answers.sum(axis=1), 1.0, atol=1e-4)


def test_pooled_features_of_a_view_are_the_backbone_on_that_view(trained: dict[str, Path]) -> None:
    from binsight.data.split import load_split
    from binsight.models.factory import build_model
    from binsight.training.cached import cache_path, pooled_features, split_backbone
    from binsight.training.data import build_cache
    from binsight.training.hardware import Precision

    config = _config(trained, trained["data"] / "unused", arch="efficientnet_lite0", image_size=64, amp="off")
    torch.manual_seed(0)
    model = build_model(config.arch, config.head, 6, True, None, 0.0, config.input_hw).eval()
    backbone = split_backbone(model.backbone)
    rows = load_split(trained["data"], "val")
    precision = Precision(config, torch.device("cpu"))
    as_is, mirrored = (pooled_features(config, backbone, "val", rows, precision, view=v) for v in ("o", "h"))
    pixels = np.asarray(
        build_cache(
            [str(trained["data"] / r["image"]) for r in rows],
            config.preprocess,
            cache_path(trained["data"], "val", rows, config.input_hw),
        )
    )
    with torch.no_grad():
        flipped = torch.from_numpy(config.preprocess.normalise(np.ascontiguousarray(pixels[:, :, ::-1])))
        expected = torch.flatten(backbone.tail(backbone.prefix(flipped, backbone.depth), backbone.depth), 1)
    assert mirrored.shape == as_is.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0.1
    assert float((mirrored - expected).abs().max()) < 0.01 * scale  # the cache holds fp16
    assert float((mirrored - as_is).abs().max()) > 0.1 * scale  # a mirror is another photo to a CNN
    # Features made under bf16 autocast are cached apart from fp32 ones, not served for them.
    bf16 = Precision(config.model_copy(update={"amp": "on"}), torch.device("cpu"))
    assert bf16.enabled
    assert float((pooled_features(config, backbone, "val", rows, bf16, view="h") - mirrored).abs().max()) > 0
