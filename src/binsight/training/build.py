"""Setting up a training run: data, model, optimiser, schedule and objective as the config says, then
resumed where a checkpoint says (`engine.py` runs its epochs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from binsight.data.split import fingerprint, load_split
from binsight.errors import BinsightError
from binsight.models.factory import build_model
from binsight.models.heads import CountingModel
from binsight.training.averaging import WeightAverage
from binsight.training.cached import CachedTrainer
from binsight.training.checkpoint import JsonObject, load_trained
from binsight.training.config import TrainConfig
from binsight.training.data import Loader, build_datasets, make_loader
from binsight.training.distributed import DistContext
from binsight.training.hardware import Precision, resolve_device, wants_channels_last
from binsight.training.monitors import Monitors
from binsight.training.objective import Objective, build_objective
from binsight.training.optim import build_optimizer, build_scheduler
from binsight.training.probe import start_from_probe
from binsight.training.progress import Progress, fetch_remote_checkpoints, resume
from binsight.training.results import BestEpoch, model_card
from binsight.training.teachers import teacher_probabilities
from binsight.utils.io import atomic_write_json
from binsight.utils.storage import Store, open_store

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


def stream_seed(*parts: int) -> int:
    """A seed for one (seed, rank, epoch) stream. Arithmetic like seed*1000 + epoch*10 + rank collides
    (rank 10 of epoch 0 is rank 0 of epoch 1); NumPy's SeedSequence hashes the parts instead."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Run:
    """What one training run holds from its set-up to its summary."""

    config: TrainConfig
    context: DistContext
    device: torch.device
    out: Path
    train_rows: list[dict[str, str]]
    val_rows: list[dict[str, str]]
    num_classes: int
    model: CountingModel  # the model itself, under any DDP wrapper
    trained: nn.Module  # what the optimiser steps: the model, or its DDP wrapper
    channels_last: bool
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    monitors: Monitors
    cached: CachedTrainer | None
    loaders: tuple[Loader, Loader] | None  # train, val; None when training on cached features
    progress: Progress
    fingerprints: tuple[str, str]  # of the train and val splits, for the checkpoints and the card
    card: JsonObject  # the model card every checkpoint carries
    average: WeightAverage | None = None  # validated, kept and exported instead of `model` when set
    remote: Store | None = None
    writer: SummaryWriter | None = None

    @property
    def train_counts(self) -> np.ndarray:
        return np.array([int(r["count"]) for r in self.train_rows])

    @property
    def kept(self) -> CountingModel:
        """The weights validated, kept in `best.pt` and exported."""
        return self.model if self.average is None else self.average.module  # type: ignore[return-value]


def build_run(config: TrainConfig, context: DistContext) -> Run:
    """Data, model, optimiser, schedule and objective, as the config says."""
    device = resolve_device(config.device, context)
    data_dir = Path(config.data)
    train_rows, val_rows = load_split(data_dir, "train"), load_split(data_dir, "val")
    if config.refit:
        train_rows = train_rows + val_rows
    train_counts = np.array([int(r["count"]) for r in train_rows])
    num_classes = config.num_classes or int(train_counts.max()) + 1
    clipped_counts = np.minimum(train_counts, num_classes - 1)

    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    np.random.seed(config.seed)
    model = build_model(
        config.arch,
        config.head,
        num_classes,
        config.pretrained and (config.init_from is None or config.init_shrink < 1),
        config.weights,
        config.dropout,
        config.input_hw,
        config.drop_path,
    )
    model.head.start_from_prior(torch.bincount(torch.from_numpy(clipped_counts), minlength=num_classes))
    if config.init_from is not None:
        start_from_trained(model, config.init_from, config, num_classes)
    teacher = (
        teacher_probabilities(
            config.teachers, data_dir, train_rows, Path(config.out), str(device), config.workers
        )
        if config.teachers and config.distill > 0
        else None
    )
    objective = build_objective(config, model.head, clipped_counts, num_classes, teacher)
    # A run resuming from a local last.pt starts from its checkpoint's head (one fetched from
    # --checkpoint-dir is only seen later, in restore, and overwrites the probe there).
    if config.probe_start and context.is_main and not resumes(config):
        # The other ranks receive the probe from DDP, which broadcasts rank 0's weights as it wraps.
        start_from_probe(config, model, train_rows, val_rows, num_classes, objective)
    model = model.to(device)
    channels_last = wants_channels_last(config, device) and not config.train_on_cache
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it
    precision = Precision(config, device)

    cached, loaders = None, None
    if config.train_on_cache:
        if context.enabled or device.type != "cpu":
            raise BinsightError(
                "--train-on-cache runs in one CPU process", hint="run it without torchrun, with --device cpu"
            )
        cached = CachedTrainer(config, model, train_rows, val_rows, num_classes, precision)
        steps_per_epoch = cached.steps_per_epoch
    else:
        train_set, val_set = build_datasets(config, context, train_rows, val_rows, num_classes)
        pin = device.type == "cuda"
        loaders = (
            make_loader(
                train_set, config.batch_size, True, config.workers, config.seed, context.enabled, pin
            ),
            make_loader(val_set, config.batch_size, False, config.workers, config.seed, context.enabled, pin),
        )
        steps_per_epoch = min(len(loaders[0]), config.max_train_batches or len(loaders[0]))

    trained: nn.Module = model
    if context.enabled:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(trained, config)
    average = None
    if config.average_decay is not None:
        average = WeightAverage(model, config.average_decay)
        # A hook rather than a call in each loop: it runs only when the step did (an fp16 scaler skips
        # steps whose gradients overflowed), in the image loop and the cached one alike.
        optimizer.register_step_post_hook(lambda *_: average.update(model))
    fingerprints = (fingerprint(train_rows), fingerprint(val_rows))
    monitors = Monitors()
    monitors.check_class_balance(np.bincount(clipped_counts, minlength=num_classes))
    return Run(
        config=config,
        context=context,
        device=device,
        out=Path(config.out),
        train_rows=train_rows,
        val_rows=val_rows,
        num_classes=num_classes,
        model=model,
        trained=trained,
        channels_last=channels_last,
        precision=precision,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config, steps_per_epoch),
        objective=objective,
        monitors=monitors,
        cached=cached,
        loaders=loaders,
        progress=Progress(history=[], best=BestEpoch(metric=config.select_metric)),
        fingerprints=fingerprints,
        card=model_card(config, num_classes, *fingerprints).model_dump(mode="json"),
        average=average,
    )


def start_from_trained(model: CountingModel, path: Path, config: TrainConfig, num_classes: int) -> None:
    """Load the kept weights of the run at `path` (its moving average where it kept one) into `model`,
    or with `config.init_shrink` < 1 a point between them and the fresh start `model` holds."""
    fresh = (
        {name: value.clone() for name, value in model.state_dict().items()} if config.init_shrink < 1 else {}
    )
    checkpoint, trained = load_trained(path)
    differs = [k for k in ("arch", "head") if getattr(trained, k) != getattr(config, k)]
    if checkpoint.get("num_classes") != num_classes:
        differs.append(f"classes {checkpoint.get('num_classes')} vs {num_classes} in this data")
    if differs:
        raise BinsightError(
            f"--init-from {path} is not the model this run trains ({', '.join(differs)} differ)",
            hint="start from a run of the same --arch and --head on data with the same classes "
            "(or set --num-classes to the run's)",
        )
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:  # shapes tied to the input size, e.g. a ViT's position grid
        raise BinsightError(
            f"--init-from {path}: its weights do not fit this model: {str(exc).splitlines()[0]}",
            hint="start from a run with the same --image-size and --image-width",
        ) from None
    if trained.mean_std != config.mean_std:
        log.warning(
            "--init-from %s learnt photos normalised with mean/std %s; this run feeds it %s",
            path,
            trained.mean_std,
            config.mean_std,
        )
    log.info("starting from the weights of %s (%s at %dx%d)", path, trained.arch, *trained.input_hw)
    if config.init_shrink < 1:
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if value.is_floating_point():  # BatchNorm's batch counter is not a weight
                    value.lerp_(fresh[name], 1.0 - config.init_shrink)
        log.info("shrunk to %.0f%% of the way there from a fresh start", 100 * config.init_shrink)


def resumes(config: TrainConfig) -> bool:
    """Whether the run continues from the last.pt in its folder."""
    return (Path(config.out) / "last.pt").exists() and not config.fresh


def restore(run: Run) -> None:
    """Resume from `last.pt` (fetched from the checkpoint store on a new machine) unless told not to;
    open the run's folder, TensorBoard writer and log line."""
    config, context, out = run.config, run.context, run.out
    last_path = out / "last.pt"
    run.remote = open_store(config.checkpoint_dir) if config.checkpoint_dir else None
    if run.remote is not None and not config.fresh and not last_path.exists():
        fetch_remote_checkpoints(run.remote, out)
    # Per-rank stream for dropout and augmentation; a resumed run replaces it with the saved state.
    torch.manual_seed(stream_seed(config.seed, context.rank))
    if resumes(config):
        run.progress = resume(
            last_path,
            config,
            context,
            run.model,
            run.optimizer,
            run.scheduler,
            run.precision,
            run.monitors,
            run.average,
        )
    elif context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if not context.is_main:
        return
    if config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(out / "tensorboard"), purge_step=run.progress.start_epoch)
    atomic_write_json(out / "config.json", config.model_dump(mode="json"))
    log.info(
        "training %s/%s on %s: %d train, %d val images, %d classes, world size %d",
        config.arch,
        config.head,
        run.device,
        len(run.train_rows),
        len(run.val_rows),
        run.num_classes,
        context.world_size,
    )
    if config.refit:
        log.info(
            "refit: the %d validation photos train too, so their figures below are fit, not accuracy; "
            "epoch %d of the %d-epoch schedule is kept: judge it on the test split",
            len(run.val_rows),
            config.stop_after or config.epochs,
            config.epochs,
        )
