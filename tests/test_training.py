"""Training end to end on synthetic bins: it learns, it resumes exactly, it fails clearly."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from binsight.cli import main
from binsight.data.index import build_index
from binsight.data.split import SplitConfig, fingerprint, load_split, write_splits
from binsight.data.synth import SynthConfig, generate_dataset
from binsight.errors import BinsightError
from binsight.models.backbones import build_backbone, weights_location
from binsight.models.factory import build_model
from binsight.training import engine
from binsight.training import soup as soup_module
from binsight.training.averaging import WeightAverage
from binsight.training.build import Run, build_run, stream_seed
from binsight.training.checkpoint import load_checkpoint, save_checkpoint
from binsight.training.config import TrainConfig, load_config
from binsight.training.data import SumMosaic, build_datasets
from binsight.training.distributed import DistContext
from binsight.training.engine import train
from binsight.training.evaluate import EvaluateConfig, evaluate, photo_probabilities
from binsight.training.hardware import Precision
from binsight.training.loop import optimizer_step, predict
from binsight.training.monitors import Monitors
from binsight.training.optim import build_optimizer
from binsight.training.probe import L2_GRID
from binsight.training.results import EvaluationReport, TrainSummary
from binsight.training.soup import SoupConfig, fit_temperature, soup


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bins") / "data"
    generate_dataset(root, SynthConfig(n_images=600, image_size=64, seed=1, workers=2))
    build_index(root)
    write_splits(root, SplitConfig(val_fraction=0.15, test_fraction=0.15))
    return root


def tiny(bins: Path, out: Path, **changes: object) -> TrainConfig:
    """A run small enough for a test. mobilenet_v3_small: a fifth of resnet18's weights to write at
    every checkpoint; tests that need a model to learn name a stronger one."""
    settings: dict[str, object] = dict(
        data=bins,
        out=out,
        arch="mobilenet_v3_small",
        head="regression",
        pretrained=False,
        image_size=64,
        epochs=6,
        batch_size=32,
        lr=2e-3,
        workers=0,
        tensorboard=False,
        early_stopping=None,
        seed=0,
    )
    settings.update(changes)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_a_small_model_learns_to_count_and_is_reported(bins: Path, tmp_path: Path) -> None:
    # The recipes' backbone from its packaged ImageNet weights: it learns in 3 epochs what resnet18 from
    # scratch needs 6 for (seeds 0 and 1: best val 0.48 and 0.38 against the majority's 0.21).
    lite0 = dict(arch="efficientnet_lite0", pretrained=True, epochs=3)
    summary = train(tiny(bins, tmp_path / "run", tensorboard=True, **lite0))
    baseline = summary.majority_baseline_val_accuracy
    assert (summary.best.value or 0) >= baseline + 0.1, (summary.best, baseline)
    history = summary.history
    assert TrainSummary.read(tmp_path / "run" / "history.json") == summary  # what is written is what is read
    assert history[-1].train_loss < 0.7 * history[0].train_loss
    assert history[-1].val_mae < 1.0
    for name in ("best.pt", "last.pt", "history.json", "curves.png", "config.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    result = evaluate(EvaluateConfig(checkpoint=tmp_path / "run" / "best.pt", split="test", workers=0))
    assert result.n == 90 and result.accuracy > (result.majority_baseline_accuracy or 1.0)
    out = tmp_path / "run" / "eval-test"
    assert EvaluationReport.read(out / "metrics.json") == result  # what is written is what is read
    assert len(result.confusion_matrix) == 6
    report = (out / "report.html").read_text()
    assert "Confusion matrix" in report and "data:image/png;base64," in report
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("average_decay", [None, 0.9])
def test_resume_gives_the_same_state_as_an_uninterrupted_run(
    bins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, average_decay: float | None
) -> None:
    def config(out: Path, epochs: int) -> TrainConfig:
        return tiny(
            bins,
            out,
            head="classification",
            image_size=32,
            epochs=epochs,
            max_train_batches=3,
            optimizer="sgd",
            schedule="cosine",
            augment=1.0,
            average_decay=average_decay,
        )

    train(config(tmp_path / "straight", 2))

    real_epoch = engine.train_one_epoch
    calls = []

    def killed_in_second_epoch(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a preempted node does mid-epoch
        return real_epoch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "resumed", 2))
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1  # epochs finished, as in history
    train(config(tmp_path / "resumed", 2))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    weights = ("model", "trained_model") if average_decay else ("model",)
    for kind in weights:
        for key, tensor in a[kind].items():  # type: ignore[literal-required]
            assert torch.equal(tensor, b[kind][key]), (kind, key)  # type: ignore[literal-required]
    assert a.get("average_updates") == b.get("average_updates") == (6 if average_decay else None)
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6

    with pytest.raises(BinsightError, match=r"different settings.*lr"):
        train(config(tmp_path / "resumed", 3).model_copy(update={"lr": 0.5}))


def test_profile_and_cache(bins: Path, tmp_path: Path) -> None:
    train(
        tiny(bins, tmp_path / "p", image_size=32, epochs=1, max_train_batches=4, profile_steps=2, cache=True)
    )
    summary = (tmp_path / "p" / "profile" / "summary.txt").read_text()
    assert "data loading" in summary and "aten::" in summary
    assert (tmp_path / "p" / "profile" / "trace.json").stat().st_size > 1000
    assert list((bins / ".cache").glob("train-32x32px-*.npy"))


def test_pretrained_weights_load_offline_or_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(BinsightError, match=r"not found at .*resnet18-f37072fd\.pth") as info:
        build_backbone("resnet18", pretrained=True)
    assert "--no-pretrained" in str(info.value)

    reference, _ = build_backbone("resnet18", pretrained=False)
    target = weights_location("resnet18")
    target.parent.mkdir(parents=True)
    state = {k: v for k, v in reference.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # as ImageNet has
    torch.save(state, target)
    loaded, features = build_backbone("resnet18", pretrained=True)
    assert features == 512
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(BinsightError, match="does not match resnet18"):
        build_backbone("resnet18", pretrained=True, weights_path=wrong)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'"),
        ({"lr": -1.0}, "lr"),
        ({"head": "poisson"}, "head 'poisson'"),
        ({"epochs": 0}, "epochs"),
        ({"bogus": 1}, "bogus"),
        ({"mosaic": 0.3, "train_on_cache": True}, "--mosaic pairs photos"),
        ({"mosaic": 0.3, "teachers": ["a/best.pt"], "distill": 0.5}, "--mosaic pairs photos"),
        ({"epochs": 4, "stop_after": 5}, "past the last"),
        ({"head": "ordinal", "rps_weight": 1.0}, "--rps-weight scores a softmax"),
        ({"fit_on": "train+val", "probe_start": True}, "--probe-start chooses its penalty"),
    ],
)
def test_bad_config_is_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(BinsightError, match=message):
        load_config(None, {"data": "x", **overrides})


def test_config_file_and_cli_errors(bins: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{lr: 1}")
    assert main(["train", "--data", str(bins), "--config", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--no-pretrained"]) == 2
    assert "no train split" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    config = tmp_path / "good.json"
    config.write_text(
        json.dumps(
            {
                "arch": "mobilenet_v3_small",
                "image_size": 32,
                "epochs": 1,
                "max_train_batches": 2,
                "workers": 0,
                "tensorboard": False,
            }
        )
    )
    code = main(
        [
            "train",
            "--data",
            str(bins),
            "--out",
            str(tmp_path / "cli"),
            "--config",
            str(config),
            "--no-pretrained",
            "--batch-size",
            "16",
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert saved["arch"] == "mobilenet_v3_small" and saved["batch_size"] == 16
    assert (tmp_path / "cli" / "eval-val" / "report.html").exists()


def test_ddp_with_two_cpu_processes(bins: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(bins, data, ignore=shutil.ignore_patterns(".cache"))
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "binsight",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--arch",
        "mobilenet_v3_small",
        "--no-pretrained",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--max-train-batches",
        "5",
        "--device",
        "cpu",
        "--head",
        "classification",
        "--average-decay",  # each rank keeps the same average of the replicas' identical weights
        "0.9",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", BINSIGHT_PROGRESS="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = TrainSummary.read(out / "history.json")
    assert summary.world_size == 2
    assert summary.replicas_in_sync is True
    assert summary.epochs_run == 2
    # Validation was sharded over both ranks and gathered: every image counted exactly once.
    best = load_checkpoint(out / "best.pt")
    assert best["val_metrics"]["n"] == 90
    assert sum(best["val_metrics"]["per_class"][k]["support"] for k in best["val_metrics"]["per_class"]) == 90
    assert "val report" in done.stdout and done.stdout.count("train: best val") == 1
    assert load_checkpoint(out / "last.pt")["average_updates"] == 2 * 5


def test_run_folder_is_locked_and_stale_parts_are_cleaned(bins: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".last.pt.k3j2h1.part"  # what a kill during a checkpoint write leaves
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom binsight.utils.io import exclusive_folder\n"
            f"with exclusive_folder({str(out)!r}, 'training run'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        stale.write_bytes(b"\0" * 1024)
        config = tiny(bins, out, epochs=1, max_train_batches=1, image_size=32)
        with pytest.raises(BinsightError, match=rf"in use by another training run \(pid {holder.pid}\)"):
            train(config)
    finally:
        holder.kill()
        holder.wait()
    assert stale.exists(), "a part file may belong to the running writer; only the lock holder may clean"
    train(config)  # the holder died without cleaning up: its lock went with it
    assert not stale.exists() and (out / "last.pt").exists()
    assert not list(out.glob(".*.part"))


def test_preempted_run_resumes_from_s3_on_a_new_machine(
    bins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str
) -> None:
    from .conftest import s3_client

    s3_client(moto_endpoint).create_bucket(Bucket="spot-checkpoints")
    # How a user points boto3 at another S3 (MinIO, LocalStack): the standard variables.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    def config(out: Path) -> TrainConfig:
        return tiny(
            bins,
            out,
            head="classification",
            image_size=32,
            epochs=2,
            max_train_batches=3,
            optimizer="sgd",
            augment=1.0,
            checkpoint_dir="s3://spot-checkpoints/runs/r1",
        )

    train(config(tmp_path / "straight").model_copy(update={"checkpoint_dir": None}))

    real_epoch = engine.train_one_epoch
    calls = []

    def preempted_in_second_epoch(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the spot instance is reclaimed
        return real_epoch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "train_one_epoch", preempted_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "machine-a"))
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    first_epoch = load_checkpoint(tmp_path / "machine-a" / "last.pt")["history"][0]
    shutil.rmtree(tmp_path / "machine-a")  # the machine and its disk are gone

    train(config(tmp_path / "machine-b"))  # a new machine, an empty --out
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "machine-b" / "last.pt")
    assert b["history"][0] == first_epoch, "epoch 1 was not redone: its record came back from S3"
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    listed = s3_client(moto_endpoint).list_objects_v2(Bucket="spot-checkpoints", Prefix="runs/r1/")
    assert {o["Key"] for o in listed["Contents"]} >= {"runs/r1/last.pt", "runs/r1/best.pt"}


def test_per_rank_streams_never_collide() -> None:
    seeds = {stream_seed(0, rank, epoch) for rank in range(64) for epoch in range(100)}
    assert len(seeds) == 64 * 100
    assert stream_seed(1, 0) != stream_seed(0, 1000)


def test_checkpoints_written_before_format_2_still_resume_at_the_right_epoch() -> None:
    from binsight.training.checkpoint import epochs_finished

    assert epochs_finished({"epoch": 0}) == 1  # format 1: 0-based index of the last finished epoch
    assert epochs_finished({"epoch": 1, "checkpoint_format": 2}) == 1


def test_the_average_follows_the_warm_up_then_the_decay() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    average = WeightAverage(model, decay=0.5)
    expected = model[0].weight.detach().clone()
    for step in range(1, 6):
        with torch.no_grad():
            model[0].weight.fill_(float(step))
        model.train()(torch.randn(4, 2))  # moves BatchNorm's running statistics and its counter
        decay = min(0.5, (1 + step - 1) / (10 + step - 1))
        average.update(model)
        expected = decay * expected + (1 - decay) * float(step)
        assert torch.allclose(average.module[0].weight, expected), step
    assert average.updates == 5
    # The running mean is averaged like a weight; the batches-seen counter is copied, not averaged.
    assert not torch.equal(average.module[1].running_mean, model[1].running_mean)
    assert int(average.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 5
    assert not average.module.training and not any(p.requires_grad for p in average.module.parameters())


def test_a_run_validates_keeps_and_evaluates_the_average(bins: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(
        tiny(bins, out, head="classification", image_size=32, epochs=3, average_decay=0.8, amp="off")
    )
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    steps_per_epoch = len(load_split(bins, "train")) // 32  # the loader drops the last partial batch
    assert last["average_updates"] == 3 * steps_per_epoch  # every optimiser step folded in
    differs = [
        k
        for k, v in last["model"].items()
        if v.is_floating_point() and not torch.equal(v, last["trained_model"][k])
    ]
    assert differs, "the kept weights are the average, not the trained ones"
    assert "trained_model" not in best  # best.pt holds the model only: the average
    # best.pt's validation metrics are the average's: evaluated again (in fp32 both times, where
    # no near-tie can round the other way) it gives the same accuracy.
    result = evaluate(EvaluateConfig(checkpoint=out / "best.pt", split="val", workers=0))
    assert result.accuracy == pytest.approx(best["val_metrics"]["accuracy"])
    assert summary.best.value == pytest.approx(result.accuracy)


def test_photo_probabilities_keep_photo_order_with_parallel_decoding(bins: Path, tmp_path: Path) -> None:
    # resnet18: a model this little trained still tells photos apart (mobilenet_v3_small's answers are
    # all alike at first).
    settings = dict(arch="resnet18", head="classification", image_size=32, epochs=1, max_train_batches=2)
    train(tiny(bins, tmp_path / "run", amp="off", **settings))  # type: ignore[arg-type]
    checkpoint = tmp_path / "run" / "best.pt"
    serial = photo_probabilities(checkpoint, bins, load_split(bins, "val"), batch_size=16)
    # "auto" is the GPU where there is one (teachers and the accuracy benchmark use it there); here
    # the CPU, so the answers must be the same photo for photo, whichever worker decoded them. In a
    # process of its own: loader workers forked from this long-lived test process crashed it at exit
    # (only in the whole suite, after the serving tests).
    code = (
        "import sys; from pathlib import Path; import numpy as np; "
        "from binsight.data.split import load_split; "
        "from binsight.training.evaluate import photo_probabilities; "
        "checkpoint, data, out = map(Path, sys.argv[1:]); "
        "np.save(out, photo_probabilities(checkpoint, data, load_split(data, 'val'), batch_size=16, "
        "device='auto', workers=2))"
    )
    out = tmp_path / "parallel.npy"
    subprocess.run([sys.executable, "-c", code, checkpoint, bins, out], check=True, timeout=300)
    parallel = np.load(out)
    assert serial.shape[0] == len(load_split(bins, "val")) and np.allclose(serial, parallel)
    assert not np.allclose(serial[0], serial[1:].mean(axis=0)), "not one answer for every photo"


def test_layer_decay_slows_each_block_below_the_one_above_and_misses_no_parameter(
    bins: Path, tmp_path: Path
) -> None:
    config = tiny(
        bins, tmp_path / "run", arch="efficientnet_lite0", head="classification", lr=1e-3,
        backbone_lr_scale=0.5, layer_decay=0.5,
    )  # fmt: skip
    model = build_model(config.arch, config.head, 7)
    optimizer = build_optimizer(model, config)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(rate)  # each in one group
    assert set(rate) == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())

    def lr(name: str) -> float:
        return rate[id(named[name])]

    assert lr("head.fc.weight") == pytest.approx(1e-3)
    # The last block and the final 1x1 convolution after it learn at the backbone's rate.
    assert lr("backbone.conv_head.weight") == lr("backbone.blocks.6.0.conv_pw.weight") == pytest.approx(5e-4)
    assert lr("backbone.blocks.5.3.conv_pw.weight") == pytest.approx(5e-4 * 0.5)
    assert lr("backbone.blocks.5.2.bn1.weight") == pytest.approx(5e-4 * 0.5**2)
    blocks = sum(1 for n in named if n.startswith("backbone.blocks.") and n.endswith("conv_dw.weight"))
    assert lr("backbone.conv_stem.weight") == pytest.approx(5e-4 * 0.5**blocks)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(named["backbone.bn1.weight"]) not in decayed
    assert id(named["backbone.conv_stem.weight"]) in decayed
    with pytest.raises(BinsightError, match="timm backbone"):
        load_config(None, {"data": bins, "arch": "resnet18", "layer_decay": 0.8})


def test_drop_path_skips_blocks_in_training_only(bins: Path, tmp_path: Path) -> None:
    images = torch.rand(4, 3, 48, 64)  # non-square
    for drop_path, differ in ((0.0, False), (0.5, True)):
        backbone, _ = build_backbone("efficientnet_lite0", pretrained=False, drop_path=drop_path)
        torch.manual_seed(0)
        first, second = backbone.train()(images), backbone(images)
        assert (not torch.allclose(first, second)) == differ, drop_path
        backbone.eval()
        assert torch.equal(backbone(images), backbone(images))
    with pytest.raises(BinsightError, match="timm backbone"):
        load_config(None, {"data": bins, "arch": "mobilenet_v3_small", "drop_path": 0.1})
    config = tiny(bins, tmp_path / "run", arch="efficientnet_lite0", drop_path=0.2, image_size=32)
    run = build_run(config, DistContext())
    assert [m.drop_prob for m in run.model.backbone.modules() if hasattr(m, "drop_prob")][-1] > 0.15


def test_runs_sharing_an_init_seed_start_from_one_head_and_see_their_own_batches(
    bins: Path, tmp_path: Path
) -> None:
    def start(**changes: object) -> tuple[torch.Tensor, list[int]]:
        config = tiny(bins, tmp_path / "run", head="classification", image_size=32, **changes)
        run = build_run(config, DistContext())
        assert run.loaders is not None
        first_batch = next(iter(run.loaders[0]))[1].tolist()
        return run.model.head.fc.weight.detach().clone(), first_batch

    (head_a, batch_a), (head_b, batch_b) = start(seed=0, init_seed=0), start(seed=1, init_seed=0)
    assert torch.equal(head_a, head_b) and batch_a != batch_b
    assert not torch.equal(start(seed=0)[0], start(seed=1)[0])  # by default the seed draws the head too


def test_a_probe_start_fits_the_head_on_frozen_features_and_a_resumed_run_keeps_its_own(
    bins: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny(
        bins, tmp_path / "run", arch="efficientnet_lite0", pretrained=True, head="classification",
        image_size=64, image_width=80, epochs=1,
    )  # fmt: skip

    def start(**changes: object) -> tuple[Run, float, np.ndarray]:
        """A run as set up for its first epoch, its untrained model's validation accuracy and mean
        answer (the share of probability given to each count)."""
        run = build_run(config.model_copy(update=changes), DistContext())
        assert run.loaders is not None
        targets, probabilities, _ = predict(
            run.model, run.model.head, run.loaders[1], run.device, run.precision, DistContext()
        )
        return run, float(np.mean(probabilities.argmax(1) == targets)), probabilities.mean(axis=0)

    plain, plain_accuracy, _ = start()
    with caplog.at_level("INFO", logger="binsight.training.probe"):
        probed, probed_accuracy, probed_answer = start(probe_start=True)
    fits = [r.message for r in caplog.records if r.message.startswith("linear probe, L2")]
    assert len(fits) == len(L2_GRID) and "the head starts as the linear probe" in caplog.text
    val_counts = np.array([int(r["count"]) for r in load_split(bins, "val")])
    majority = float(np.mean(val_counts == np.bincount(val_counts).argmax()))
    assert probed_accuracy > max(plain_accuracy, majority) + 0.05, (probed_accuracy, plain_accuracy, majority)
    assert all(map(torch.equal, probed.model.backbone.parameters(), plain.model.backbone.parameters()))
    # The probe fits the run's own objective: class weights move answers from common counts to rare ones.
    frequency = np.bincount([int(r["count"]) for r in load_split(bins, "train")]).astype(float)
    rare = frequency < np.median(frequency)
    balanced_answer = start(probe_start=True, class_balance=1.0)[2]
    assert balanced_answer[rare].sum() > probed_answer[rare].sum() + 0.01
    # A run resuming from its checkpoint starts from the checkpoint's head: no probe is fitted again.
    train(config.model_copy(update={"probe_start": True, "max_train_batches": 2}))
    caplog.clear()
    with caplog.at_level("INFO", logger="binsight.training.probe"):
        start(probe_start=True)
    assert "linear probe" not in caplog.text


def test_sum_mosaics_pair_photos_side_by_side_labelled_with_the_sum(bins: Path, tmp_path: Path) -> None:
    config = tiny(
        bins, tmp_path / "run", head="classification", image_size=32, image_width=48, num_classes=7,
        mosaic=1.0, augment=0.0, flip="none",
    )  # fmt: skip
    splits = load_split(bins, "train"), load_split(bins, "val")
    train_set, _ = build_datasets(config, DistContext(), *splits, 7)
    assert isinstance(train_set, SumMosaic)
    torch.manual_seed(0)
    pairs = 0
    for index in range(len(train_set)):
        image, label, row = train_set[index]
        first = int(train_set.targets[index])
        assert row == index and image.shape == (3, 32, 48)
        if 1 <= first <= 4:  # every such photo gets a partner that keeps the sum an exact class
            assert first < label <= 5, (first, label)
            assert not torch.equal(image, train_set.photos[index][0])
            pairs += 1
        else:
            assert label == first and torch.equal(image, train_set.photos[index][0])
    assert pairs > 0
    middle, _ = build_datasets(config.model_copy(update={"mosaic_max_sum": 3}), DistContext(), *splits, 7)
    assert isinstance(middle, SumMosaic) and middle.largest_sum == 3
    for index in range(len(middle)):
        first, label = int(middle.targets[index]), middle[index][1]
        assert (first < label <= 3) if 1 <= first <= 2 else label == first, (first, label)
    # The pair is the two photos, each squeezed to half the width.
    left, right = train_set.at_input_size(0), train_set.at_input_size(1)
    torch.manual_seed(1)
    flipped = float(torch.rand(())) < 0.5
    torch.manual_seed(1)
    canvas = np.asarray(train_set.pair(0, 1))
    expected_left = np.asarray((right if flipped else left).resize((24, 32), Image.Resampling.BILINEAR))
    assert canvas.shape == (32, 48, 3) and np.array_equal(canvas[:, :24], expected_left)

    summary = train(config.model_copy(update={"mosaic": 0.5, "epochs": 1, "max_train_batches": 2}))
    assert summary.history[0].train_loss > 0  # its conflicting settings: test_bad_config_is_a_clear_error


def test_a_soup_averages_runs_of_one_recipe_and_refuses_others(
    bins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        train(tiny(bins, out, head="classification", image_size=32, epochs=1, max_train_batches=2, seed=seed))
        runs.append(out / "best.pt")
    command = ["soup", "--checkpoints", ",".join(map(str, runs)), "--out", str(tmp_path / "soup.pt")]
    assert main([*command, "--workers", "0"]) == 0
    made, a, b = (load_checkpoint(p) for p in (tmp_path / "soup.pt", *runs))
    assert made["soup"] == [str(p) for p in runs] and "history" not in made and "val_metrics" not in made
    uncalibrated = soup(SoupConfig(checkpoints=runs, out=tmp_path / "plain.pt", calibrate=False, workers=0))
    assert uncalibrated.temperature is None
    plain = load_checkpoint(tmp_path / "plain.pt")
    for key, tensor in plain["model"].items():
        assert isinstance(tensor, torch.Tensor)
        if tensor.is_floating_point():
            assert torch.allclose(tensor, (a["model"][key] + b["model"][key]) / 2, atol=1e-6), key
        else:
            assert torch.equal(tensor, a["model"][key]), key
    # Calibrated (the default): the same soup with its head divided by the temperature fitted on
    # validation, which lowers the validation log-loss and leaves every other weight alone.
    calibrated = soup(SoupConfig(checkpoints=runs, out=tmp_path / "soup.pt", workers=0))
    temperature, (nll_before, nll_after) = calibrated.temperature, calibrated.val_nll  # type: ignore[misc]
    assert temperature is not None and temperature != 1.0 and nll_after < nll_before
    assert load_checkpoint(tmp_path / "soup.pt")["temperature"] == temperature and "temperature" not in plain
    for key, tensor in made["model"].items():
        expected = plain["model"][key]
        if key.startswith("head.fc."):
            expected = expected / temperature
        assert torch.allclose(tensor, expected, atol=1e-6), key
    result = evaluate(EvaluateConfig(checkpoint=tmp_path / "soup.pt", split="val", workers=0))
    assert result.n == 90 and result.epoch is None and result.soup == [str(p) for p in runs]
    assert "a soup of 2 runs&#x27; weights" in (tmp_path / "eval-val" / "report.html").read_text()

    # Greedy: the runs tried from the best on validation down, each kept only if the soup's validation
    # accuracy does not fall; the soup written is the average of exactly the runs kept.
    greedy = soup(
        SoupConfig(checkpoints=runs, out=tmp_path / "greedy.pt", greedy=True, calibrate=False, workers=0)
    )
    assert greedy.greedy is not None and [s.checkpoint for s in greedy.greedy] in (runs, runs[::-1])
    first, second = greedy.greedy
    assert first.kept and first.val_accuracy >= second.val_accuracy
    assert second.kept == (second.soup_val_accuracy >= first.soup_val_accuracy)
    assert greedy.members == [s.checkpoint for s in greedy.greedy if s.kept]
    assert not (tmp_path / "greedy.pt.trial").exists()
    kept = [load_checkpoint(path)["model"] for path in greedy.members]
    for key, tensor in load_checkpoint(tmp_path / "greedy.pt")["model"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            assert torch.allclose(tensor, sum(k[key] for k in kept) / len(kept), atol=1e-6), key
    # Calibrating a greedy soup reuses the validation answers of the last soup it kept: one pass per
    # run and per try, none more.
    passes = []
    real_pass = soup_module.photo_probabilities
    monkeypatch.setattr(
        soup_module, "photo_probabilities", lambda *a, **k: passes.append(a[0]) or real_pass(*a, **k)
    )
    calibrated_greedy = soup(
        SoupConfig(checkpoints=runs, out=tmp_path / "greedy-t.pt", greedy=True, workers=0)
    )
    assert len(passes) == 2 * len(runs) - 1 and calibrated_greedy.temperature is not None
    assert calibrated_greedy.members == greedy.members
    rows = load_split(bins, "val")
    counts = np.array([int(r["count"]) for r in rows])
    plain_greedy = photo_probabilities(tmp_path / "greedy.pt", bins, rows)
    assert calibrated_greedy.temperature == fit_temperature(plain_greedy, counts)[0]

    other = tmp_path / "regression"
    train(tiny(bins, other, image_size=32, epochs=1, max_train_batches=2))
    with pytest.raises(BinsightError, match=r"not the same model.*head differ"):
        soup(SoupConfig(checkpoints=[runs[0], other / "best.pt"], out=tmp_path / "bad.pt"))
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(BinsightError, match="scales a classification head"):
        soup(SoupConfig(checkpoints=[other / "best.pt"] * 2, out=tmp_path / "bad.pt", temperature=0.8))


def test_init_from_starts_at_a_trained_runs_kept_weights_at_another_input_size(
    bins: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "source"
    settings = dict(head="classification", max_train_batches=2, epochs=1, average_decay=0.9)
    train(tiny(bins, source, image_size=32, **settings))  # type: ignore[arg-type]
    kept = load_checkpoint(source / "best.pt")

    # A CNN takes another input size: the run starts from the source's kept (averaged) weights, head
    # included, not from a new head on the prior.
    adapted = tiny(bins, tmp_path / "adapted", image_size=48, image_width=64, init_from=source / "best.pt")
    run = build_run(adapted.model_copy(update=settings), DistContext())
    for key, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, kept["model"][key]), key
    stepped = load_checkpoint(source / "last.pt")["trained_model"]  # differs from the average kept
    assert any(not torch.equal(tensor, stepped[key]) for key, tensor in kept["model"].items())

    command = ["train", "--data", str(bins), "--out", str(tmp_path / "cli"), "--arch", "mobilenet_v3_small"]
    command += ["--head", "classification", "--no-pretrained", "--image-size", "48", "--image-width", "64"]
    command += ["--epochs", "1", "--max-train-batches", "2", "--workers", "0", "--no-tensorboard"]
    assert main([*command, "--init-from", str(source / "best.pt")]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["init_from"] == str(source / "best.pt")

    # Another model is refused by name, before anything trains, without a traceback.
    assert main([*command, "--out", str(tmp_path / "other"), "--head", "regression",
                 "--init-from", str(source / "best.pt")]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "is not the model this run trains (head differ)" in err and "Traceback" not in err
    assert not (tmp_path / "other" / "best.pt").exists()
    with pytest.raises(ValidationError, match="--probe-start replaces the head"):
        tiny(bins, tmp_path / "x", init_from=source / "best.pt", probe_start=True)


def test_init_shrink_starts_between_a_fresh_start_and_the_trained_weights(bins: Path, tmp_path: Path) -> None:
    settings = dict(head="classification", max_train_batches=2, epochs=1, image_size=32)
    train(tiny(bins, tmp_path / "source", **settings))  # type: ignore[arg-type]
    trained = load_checkpoint(tmp_path / "source" / "best.pt")["model"]
    # The same seed draws the same fresh start (new head on the prior, here random weights).
    fresh = build_run(tiny(bins, tmp_path / "fresh", **settings), DistContext()).model.state_dict()  # type: ignore[arg-type]
    shrunk_config = tiny(
        bins, tmp_path / "shrunk", init_from=tmp_path / "source" / "best.pt", init_shrink=0.25, **settings
    )  # type: ignore[arg-type]
    shrunk = build_run(shrunk_config, DistContext()).model.state_dict()
    moved = 0
    for key, tensor in shrunk.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, trained[key]), key
            continue
        assert torch.allclose(tensor, fresh[key] + 0.25 * (trained[key] - fresh[key]), atol=1e-6), key
        moved += not torch.equal(fresh[key], trained[key])
    assert moved > 10  # the check above compared distinct points, not one start with itself
    with pytest.raises(ValidationError, match="--init-shrink moves a start towards --init-from"):
        tiny(bins, tmp_path / "x", init_shrink=0.5)


def test_init_from_warns_when_the_photos_are_normalised_otherwise(
    bins: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Lite0's own mean/std (0.5) differ from ImageNet's: a run that switches them starts from weights
    # that learnt other pixel values, which trains but deserves a word.
    source = tiny(bins, tmp_path / "source", arch="efficientnet_lite0", head="classification", num_classes=7)
    source = source.model_copy(update={"normalization": "imagenet"})
    model = build_model("efficientnet_lite0", "classification", 7, pretrained=False)
    save_checkpoint(
        tmp_path / "source.pt",
        {"config": source.model_dump(mode="json"), "num_classes": 7, "model": model.state_dict()},
    )
    adapted = source.model_copy(update={"normalization": "backbone", "init_from": tmp_path / "source.pt"})
    with caplog.at_level("INFO", logger="binsight.training.build"):
        build_run(adapted, DistContext())
        assert "learnt photos normalised with mean/std ((0.485" in caplog.text
        caplog.clear()
        build_run(adapted.model_copy(update={"normalization": "imagenet"}), DistContext())
    assert "normalised" not in caplog.text and "starting from the weights of" in caplog.text


def test_a_refit_trains_on_train_and_val_and_stops_at_the_validated_epoch(
    bins: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    validated = tmp_path / "run"
    settings = dict(head="classification", image_size=32, max_train_batches=2, epochs=4)
    summary = train(tiny(bins, validated, **settings))  # type: ignore[arg-type]
    # The best epoch is whichever validation chose; make it one before the end so that stopping shows.
    history = json.loads((validated / "history.json").read_text())
    history["best"]["epoch"] = 3
    (validated / "history.json").write_text(json.dumps(history))
    assert summary.epochs_run == 4

    assert main(["train", "--refit", str(validated), "--workers", "0"]) == 0
    refit = tmp_path / "run-refit"
    assert "refit on train+val, epoch 3 kept" in capsys.readouterr().out
    config = json.loads((refit / "config.json").read_text())
    assert config["fit_on"] == "train+val" and config["stop_after"] == 3 and config["epochs"] == 4
    assert {k: v for k, v in config.items() if k not in ("out", "fit_on", "stop_after")} == {
        k: v
        for k, v in json.loads((validated / "config.json").read_text()).items()
        if k not in ("out", "fit_on", "stop_after")
    }
    made = TrainSummary.read(refit / "history.json")
    assert made.epochs_run == 3 and made.best.epoch == 3  # the last epoch kept, whatever it scored
    best = load_checkpoint(refit / "best.pt")
    rows = load_split(bins, "train") + load_split(bins, "val")
    assert best["train_fingerprint"] == fingerprint(rows) and best["epoch"] == 3
    # The schedule is the validated run's (planned for 4 epochs): the learning rate has not reached
    # its end when the refit stops.
    assert made.history[-1].lr > TrainSummary.read(validated / "history.json").history[-1].lr

    assert main(["train", "--refit", str(refit)]) == 2
    assert "is itself a refit" in capsys.readouterr().err
    assert main(["train", "--refit", str(validated), "--recipe", "abid"]) == 2
    assert "--recipe and --refit" in capsys.readouterr().err
    assert main(["train", "--refit", str(tmp_path / "nowhere")]) == 2
    assert "cannot read run settings" in capsys.readouterr().err
    with pytest.raises(BinsightError, match="trained on their validation photos"):
        soup(SoupConfig(checkpoints=[validated / "best.pt", refit / "best.pt"], out=tmp_path / "s.pt"))
    plain = soup(
        SoupConfig(
            checkpoints=[validated / "best.pt", refit / "best.pt"], out=tmp_path / "s.pt", calibrate=False
        )
    )
    assert plain.temperature is None
    # A soup of refits takes the temperature fitted for the validated runs' soup: no validation pass.
    assert (
        main(
            [
                "soup",
                "--checkpoints",
                f"{validated / 'best.pt'},{refit / 'best.pt'}",
                "--out",
                str(tmp_path / "t.pt"),
                "--temperature",
                "0.8",
            ]
        )
        == 0
    )
    assert "temperature 0.800 (given) folded into the head" in capsys.readouterr().out
    scaled, unscaled = (
        load_checkpoint(tmp_path / "t.pt")["model"],
        load_checkpoint(tmp_path / "s.pt")["model"],
    )
    for key, tensor in scaled.items():
        expected = unscaled[key] / 0.8 if key.startswith("head.fc.") else unscaled[key]
        assert torch.allclose(tensor, expected, atol=1e-6), key
    assert load_checkpoint(tmp_path / "t.pt")["temperature"] == 0.8
    with pytest.raises(ValidationError, match="greater than 0"):
        SoupConfig(
            checkpoints=[validated / "best.pt", refit / "best.pt"], out=tmp_path / "t.pt", temperature=0
        )


def test_a_run_begun_before_weight_averaging_resumes_with_it(bins: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = dict(head="classification", image_size=32, max_train_batches=3)
    train(tiny(bins, out, epochs=1, **settings))  # type: ignore[arg-type]
    old = load_checkpoint(out / "last.pt")
    del old["config"]["average_decay"]  # what binsight wrote before --average-decay existed
    save_checkpoint(out / "last.pt", old)
    train(tiny(bins, out, epochs=2, average_decay=0.9, **settings))  # type: ignore[arg-type]
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["average_updates"] == 3  # averaged from the resumed epoch on
    assert not torch.equal(resumed["model"]["head.fc.weight"], resumed["trained_model"]["head.fc.weight"])


def test_sam_steps_along_the_gradient_at_the_perturbed_weights_and_counts_the_batch_once(
    bins: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    inputs, targets = torch.randn(16, 5), torch.randint(0, 3, (16,))
    rho, lr = 0.05, 0.1
    config = tiny(bins, tmp_path, sam=rho, amp="off")

    def loss_at() -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs), targets)

    # By hand: the gradient at w, the weights moved rho along it, the gradient there, a step from w.
    reference = copy.deepcopy(model)
    start = [p.detach().clone() for p in reference.parameters()]
    gradient = torch.autograd.grad(
        nn.functional.cross_entropy(reference(inputs), targets), list(reference.parameters())
    )
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradient]))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), gradient, strict=True):
            p.add_(g * rho / norm)
    perturbed = torch.autograd.grad(
        nn.functional.cross_entropy(reference(inputs), targets), list(reference.parameters())
    )
    expected = [w - lr * g for w, g in zip(start, perturbed, strict=True)]

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    plain_statistics = copy.deepcopy(model)
    plain_statistics(inputs)  # one forward in training mode: the running statistics of one batch
    optimizer_step(
        loss_at(),
        model,
        optimizer,
        scheduler,
        Precision(config, torch.device("cpu")),
        config,
        Monitors(),
        0,
        0,
        loss_at,
    )
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(model[1].buffers(), plain_statistics[1].buffers(), strict=True):
        assert torch.equal(got, want)  # the perturbed pass did not count the batch a second time

    plain = tiny(bins, tmp_path, amp="off")
    model_plain = copy.deepcopy(plain_statistics)
    optimizer = torch.optim.SGD(model_plain.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    optimizer_step(
        nn.functional.cross_entropy(model_plain(inputs), targets),
        model_plain,
        optimizer,
        scheduler,
        Precision(plain, torch.device("cpu")),
        plain,
        Monitors(),
        0,
        0,
        None,
    )
    assert not torch.allclose(model_plain[0].weight, model[0].weight)  # without --sam: a plain step


def test_a_run_trains_with_sam(bins: Path, tmp_path: Path) -> None:
    config = tiny(bins, tmp_path / "run", sam=0.05, epochs=1, max_train_batches=3)
    summary = train(config)
    assert math.isfinite(summary.history[0].train_loss)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sam"] == 0.05
