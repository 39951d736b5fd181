"""Everything a training run depends on, in one typed, validated, serialisable place.

A config file (JSON) holds any subset of these fields; command-line flags override it. The config is
stored in every checkpoint, so `evaluate`, `export` and resume rebuild exactly the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from binsight.errors import BinsightError, invalid_settings
from binsight.imaging import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from binsight.models.backbones import TORCHVISION_BACKBONES, check_arch, normalisation
from binsight.models.heads import HEADS
from binsight.training.metrics import Metric
from binsight.utils.io import read_json_object

RECIPES_DIR = Path(__file__).with_name("recipes")
DEFAULT_IMAGE_SIZE = 224


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: Path = Field(description="dataset directory with splits/{train,val,test}.csv")
    out: Path = Field(Path("runs/train"), description="run directory (checkpoints, logs, report)")
    checkpoint_dir: str | None = Field(
        None,
        description="a folder or s3://bucket/prefix that outlives the machine: checkpoints are copied "
        "there every epoch, and a run whose --out has none resumes from there (preemptible jobs)",
    )

    arch: str = Field(
        "resnet18",
        description="backbone: efficientnet_lite0/1/2 (weights installed), resnet18/34/50, efficientnet_b0, "
        "mobilenet_v3_small/large, convnext_tiny, or timm:NAME",
    )
    head: str = Field("classification", description="classification, ordinal or regression")
    pretrained: bool = Field(True, description="start from ImageNet weights (--no-pretrained: random)")
    weights: Path | None = Field(
        None, description="ImageNet weights file (default: packaged, or $TORCH_HOME/hub/checkpoints)"
    )
    init_from: Path | None = Field(
        None,
        description="start from a trained run's weights (its best.pt: the same arch, head and classes; the "
        "input size may differ) instead of the pretrained ones; measured on real photos, going on with grown "
        "data ends below a fresh run and adapting to 160x224 no better than training at that size "
        "(docs/benchmarks.md, eighteenth round)",
    )
    init_shrink: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="with --init-from, keep this fraction of the way from a fresh start (the pretrained "
        "weights and a new head) to the trained run's weights: shrink-and-perturb (Ash & Adams 2020) "
        "against the warm-starting gap; 1 starts exactly at the trained weights. Measured on real photos, "
        "0.5 recovers 2.1 of the gap's 3.6 points and a fresh run in the same epochs does better "
        "(docs/benchmarks.md, nineteenth round)",
    )
    num_classes: int | None = Field(
        None,
        ge=2,
        description="classes 0..K-1; the last one means K-1 or more (default: from data, max count + 1)",
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the head")

    image_size: int = Field(DEFAULT_IMAGE_SIZE, ge=32, le=1024, description="model input height in pixels")
    image_width: int | None = Field(
        None, ge=32, le=1024, description="model input width (default: image_size, a square input)"
    )
    normalization: Literal["backbone", "imagenet"] = Field(
        "backbone", description="pixel mean/std: the backbone's own, or ImageNet's whatever the backbone"
    )
    epochs: int = Field(10, ge=1, description="epochs to train")
    stop_after: int | None = Field(
        None,
        ge=1,
        description="end the run after this epoch, its schedule still planned for --epochs (a refit "
        "stops where its validated run did best)",
    )
    fit_on: Literal["train", "train+val"] = Field(
        "train",
        description="photos trained on; train+val is a refit: the validation photos join training, so "
        "nothing is chosen on them and best.pt is the last epoch (see --refit)",
    )
    batch_size: int = Field(64, ge=1, description="per process; the global batch is this times world size")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="peak learning rate")
    backbone_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="backbone learning rate as a fraction of the head's"
    )
    layer_decay: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="layer-wise learning-rate decay: each block of a timm backbone learns at this factor "
        "of the rate of the block above it, the stem slowest (with --backbone-lr-scale on top)",
    )
    drop_path: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="stochastic depth: a timm backbone's residual blocks are skipped in training with a "
        "probability rising to this at the last block",
    )
    weight_decay: float = Field(0.05, ge=0.0, description="decoupled weight decay")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    schedule: Literal["cosine", "onecycle", "constant"] = Field(
        "cosine", description="learning-rate schedule"
    )
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up length")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="classification label smoothing")
    neighbour_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="classification: target mass moved to the adjacent counts"
    )
    rps_weight: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="classification: add this times the ranked probability score (the squared distance "
        "between the answer's and the count's cumulative distributions) to the loss, so that mass far "
        "from the count costs more than mass next to it",
    )
    augment: float = Field(
        1.0, ge=0.0, le=2.0, description="crop and colour augmentation strength, 0 turns them off"
    )
    flip: Literal["none", "h", "hv"] = Field("h", description="random flips: none, horizontal, or both")
    mosaic: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of training photos shown beside a second photo, squeezed side by side, "
        "labelled with the sum of their counts",
    )
    mosaic_max_sum: int | None = Field(
        None,
        ge=2,
        description="largest count a --mosaic pair may add up to (default: the largest exact class); "
        "lower keeps the pairs in the middle counts",
    )
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this")
    sam: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="sharpness-aware minimisation: each step follows the gradient at the worst point "
        "within this radius of the weights (0 off; 0.05 is usual for fine-tuning); twice the compute "
        "per step",
    )
    average_decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="keep a moving average of the weights (this decay per step, after a warm-up) and "
        "validate, keep and export the average instead of the trained weights",
    )

    amp: Literal["auto", "on", "off"] = Field(
        "auto",
        description="mixed precision; auto: on for GPUs and for CPUs with native bf16 (AVX512-BF16, AMX)",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="NHWC memory layout; auto: on for CPUs, and for GPUs with mixed precision"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    workers: int = Field(2, ge=0, description="data loader processes per training process")
    cache: bool = Field(False, description="decode and resize every image once into a uint8 cache")
    train_on_cache: bool = Field(
        False,
        description="freeze the backbone's first --frozen-blocks (all of a CNN), compute their output once "
        "per photo and view, and train only the rest on that cache: minutes per run on a CPU",
    )
    frozen_blocks: int | None = Field(
        None, ge=0, description="with --train-on-cache: blocks kept frozen (dinov2_small: 0-12; default all)"
    )
    cache_views: list[str] = Field(
        default_factory=lambda: ["o", "h"],
        description="with --train-on-cache: views cached per photo (o as is, h/v/hv flipped); each epoch "
        "draws from them, as augmentation",
    )
    class_balance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="weight each count by (1/frequency)**this in the loss: 0 none, 1 fully balanced",
    )
    teachers: list[Path] = Field(
        default_factory=list,
        description="trained checkpoints whose averaged answers the model also learns (distillation)",
    )
    distill: float = Field(
        0.0, ge=0.0, le=1.0, description="with --teachers: share of the loss that is the teachers' answers"
    )

    probe_start: bool = Field(
        False,
        description="start the head as a linear probe on the frozen backbone's features of the training "
        "photos (its L2 strength chosen on validation), then fine-tune as usual (LP-FT)",
    )

    seed: int = Field(0, description="random seed")
    init_seed: int | None = Field(
        None,
        description="seed of the new head's initial weights (default: --seed), apart from the seed of "
        "the photos' order and augmentation; soups of runs sharing it measured no better "
        "(docs/benchmarks.md)",
    )
    early_stopping: int | None = Field(5, ge=1, description="epochs without val improvement before stopping")
    select_metric: Metric = Field(
        Metric.ACCURACY, description="validation metric that picks best.pt and drives early stopping"
    )
    max_train_batches: int | None = Field(None, ge=1, description="cap per epoch (smoke tests)")
    profile_steps: int = Field(0, ge=0, description="record a torch.profiler trace of N steps")
    tensorboard: bool = Field(True, description="write TensorBoard logs in the run directory")
    fresh: bool = Field(False, description="start over, ignoring a checkpoint already in --out")

    @model_validator(mode="before")
    @classmethod
    def _one_spelling_of_square(cls, values: Any) -> Any:
        # A width equal to the height is a square input: one spelling, so that a config written either
        # way resumes the same run.
        height = values.get("image_size", DEFAULT_IMAGE_SIZE) if isinstance(values, dict) else None
        if height is not None and values.get("image_width") == height:
            values = {**values, "image_width": None}
        return values

    @model_validator(mode="after")
    def _known_choices(self) -> TrainConfig:
        if not self.cache_views or not set(self.cache_views) <= {"o", "h", "v", "hv"}:
            raise ValueError("cache_views are among o (as is), h, v, hv (flipped), at least one")
        try:
            check_arch(self.arch)
        except BinsightError as exc:
            raise ValueError(str(exc)) from None
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.mosaic > 0 and (self.train_on_cache or (self.teachers and self.distill > 0)):
            raise ValueError(
                "--mosaic pairs photos, which cached features and a teacher's per-photo answers cannot "
                "follow: train with --mosaic 0, or without --train-on-cache and --distill"
            )
        if (self.layer_decay is not None or self.drop_path > 0) and self.arch in TORCHVISION_BACKBONES:
            raise ValueError(
                f"--layer-decay and --drop-path need a timm backbone (efficientnet_lite0/1/2, "
                f"dinov2_small, timm:NAME), not the torchvision {self.arch}"
            )
        if self.rps_weight > 0 and self.head != "classification":
            raise ValueError("--rps-weight scores a softmax over counts: it needs --head classification")
        if self.stop_after is not None and self.stop_after > self.epochs:
            raise ValueError(f"stop_after ({self.stop_after}) is past the last of --epochs ({self.epochs})")
        if self.init_shrink < 1 and self.init_from is None:
            raise ValueError(
                "--init-shrink moves a start towards --init-from's weights: name them with --init-from"
            )
        if self.init_from is not None and self.probe_start:
            raise ValueError(
                "--probe-start replaces the head that --init-from brings: start from one or the other"
            )
        if self.fit_on == "train+val" and self.probe_start:
            raise ValueError(
                "--probe-start chooses its penalty on the validation photos, which --fit-on train+val "
                "trains on: refit without --probe-start"
            )
        return self

    @property
    def refit(self) -> bool:
        """Whether the validation photos are trained on, so that nothing can be chosen on them."""
        return self.fit_on == "train+val"

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.image_size, self.image_width or self.image_size

    @property
    def preprocess(self) -> Preprocess:
        """How this model sees a photo, the same in training, evaluation, export and serving."""
        return Preprocess(self.input_hw, *self.mean_std)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return normalisation(self.arch) if self.normalization == "backbone" else (IMAGENET_MEAN, IMAGENET_STD)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def refit_settings(run: Path) -> dict[str, object]:
    """The settings of a finished, validated run, to train again on its training and validation photos
    and stop at the epoch its validation chose: the refit that puts every labelled photo but the test
    split to work (the learning curve gains 3-4 points per doubling of the photos, docs/benchmarks.md)."""
    settings = read_json_object(run / "config.json", "run settings")
    history = read_json_object(run / "history.json", "run summary (written when a run finishes)")
    best = history.get("best")
    epoch = best.get("epoch") if isinstance(best, dict) else None
    if settings.get("fit_on", "train") != "train":
        raise BinsightError(
            f"{run} is itself a refit: nothing was chosen on its validation photos",
            hint="refit the run it was refitted from",
        )
    if not isinstance(epoch, int):
        raise BinsightError(
            f"{run} has no best epoch in history.json", hint="refit a run that validated at least one epoch"
        )
    kept = {k: v for k, v in settings.items() if k not in ("out", "fresh", "checkpoint_dir")}
    return {**kept, "fit_on": "train+val", "stop_after": epoch, "out": str(run.parent / f"{run.name}-refit")}


def load_config(
    path: Path | None, overrides: dict[str, object], recipe: str | None = None, refit: Path | None = None
) -> TrainConfig:
    """A named recipe or a run to refit, then a config file, then command-line overrides, each on top
    of the last."""
    values: dict[str, object] = {}
    if recipe is not None and refit is not None:
        raise BinsightError(
            "--recipe and --refit both give the settings",
            hint="a refit repeats its run's settings: drop --recipe",
        )
    if refit is not None:
        values.update(refit_settings(refit))
    if recipe is not None:
        if recipe not in recipe_names():
            raise BinsightError(
                f"unknown recipe {recipe!r}", hint=f"choose one of {', '.join(recipe_names())}"
            )
        values.update(read_json_object(RECIPES_DIR / f"{recipe}.json", "recipe"))
    if path is not None:
        values.update(read_json_object(path, "config"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise invalid_settings(exc, hint="see `binsight train --help` for the settings") from None
