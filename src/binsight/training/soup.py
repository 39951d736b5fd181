"""`binsight soup`: the weights of several runs averaged into one model (a "model soup", Wortsman et al.,
ICML 2022).

Runs fine-tuned from the same pretrained weights with different seeds end close enough in weight space
that the average of their weights is itself a good model, often better than each: much of what an
ensemble of the runs gains, served as one model at one model's speed. Runs that do not share the
pretrained starting point (or that trained from scratch) do not average into anything useful: check
the soup on validation before using it, as `binsight soup` reports.

Averaged weights give softer answers than any member (the members' heads started from different random
weights, and their average is shorter than each): a soup of three Lite0 seeds was right about half the
time on validation with a mean top probability of 0.39. So the soup's temperature is fitted on the
validation split and folded into its classification head (logits / T is the head's weights / T): the
answers keep their order, and their probabilities mean what they say again. A soup of refits (runs that
trained on their validation photos) cannot be calibrated on them; it takes the temperature fitted for
the soup of the runs they repeat (`--temperature`), whose members differ from theirs only by the photos.

From a sweep of runs, `greedy` keeps only the runs that help: tried from the best on validation down,
each stays if the soup's validation accuracy does not fall (the paper's greedy soup). The soup's
validation score is then the one its members were chosen on, and flatters it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from binsight.data.split import load_split
from binsight.errors import BinsightError
from binsight.training.checkpoint import CHECKPOINT_FORMAT, Checkpoint, load_trained, save_checkpoint
from binsight.training.config import TrainConfig
from binsight.training.evaluate import photo_probabilities
from binsight.training.metrics import counting_metrics

log = logging.getLogger(__name__)

# What a checkpoint's model is and takes: members must agree on all of it to be averaged.
SAME_MODEL = ("arch", "head", "image_size", "image_width", "normalization", "pretrained")


class SoupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoints: list[Path] = Field(
        min_length=2,
        description="best.pt of two or more runs fine-tuned from the same pretrained weights, with the "
        "same architecture, head, classes and input size (e.g. the same recipe with different --seed)",
    )
    out: Path = Field(description="the soup's checkpoint: evaluate, export and serve it as any best.pt")
    calibrate: bool = Field(
        True,
        description="fit a temperature on the validation split and fold it into the head, so that the "
        "soup's probabilities are calibrated (classification heads)",
    )
    greedy: bool = Field(
        False,
        description="greedy soup: try the runs from the best on validation down, keeping each only if the "
        "soup's validation accuracy does not fall (one validation pass per run and per try)",
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="fold this temperature into the head instead of fitting one on validation: the one "
        "`binsight soup` reported for the validated runs, when these checkpoints are their refits",
    )
    data: Path | None = Field(
        None,
        description="dataset whose validation split calibrates and, with --greedy, chooses (default: "
        "the first run's)",
    )
    device: str = Field("auto", description="where calibration scores the validation photos: auto, cpu, cuda")
    workers: int = Field(2, ge=0, description="data loader processes for calibration")


class GreedyStep(BaseModel):
    """One run tried by a greedy soup: its own validation accuracy, the soup's with it, whether it stayed."""

    checkpoint: Path
    val_accuracy: float
    soup_val_accuracy: float
    kept: bool


class SoupResult(BaseModel):
    out: Path
    members: list[Path]
    greedy: list[GreedyStep] | None = None  # in the order tried
    arch: str
    parameters_averaged: int
    temperature: float | None = None  # folded into the head; None when not calibrated
    val_nll: tuple[float, float] | None = None  # validation log-loss before and after calibrating


def _check_compatible(paths: list[Path], members: list[tuple[Checkpoint, TrainConfig]]) -> None:
    first, first_config = members[0]
    for path, (checkpoint, config) in zip(paths[1:], members[1:], strict=True):
        differs = [k for k in SAME_MODEL if getattr(config, k) != getattr(first_config, k)]
        if checkpoint.get("num_classes") != first.get("num_classes"):
            differs.append("num_classes")
        if differs or checkpoint["model"].keys() != first["model"].keys():
            raise BinsightError(
                f"{path} is not the same model as {paths[0]} ({', '.join(differs) or 'weights'} differ)",
                hint="a soup averages runs of one architecture and input: the same recipe with other seeds",
            )


def _average(members: list[tuple[Checkpoint, TrainConfig]], paths: list[Path]) -> tuple[Checkpoint, int]:
    """The members' weights (parameters and BatchNorm statistics) averaged into one checkpoint, and the
    number of weights averaged."""
    first, _ = members[0]
    averaged: dict[str, torch.Tensor] = {}
    parameters = 0
    weights = [cast(dict[str, torch.Tensor], member["model"]) for member, _ in members]
    for key, tensor in weights[0].items():
        if tensor.is_floating_point():
            total = torch.stack([w[key].double() for w in weights]).mean(dim=0)
            averaged[key] = total.to(tensor.dtype)
            parameters += tensor.numel()
        else:
            averaged[key] = tensor.clone()  # counters (BatchNorm's batches seen) are not weights
    # The soup is a model, not a run: no history, best epoch, validation metrics or training state of
    # any one member travels with it.
    checkpoint = Checkpoint(
        config=first["config"],
        num_classes=first["num_classes"],
        checkpoint_format=first.get("checkpoint_format", CHECKPOINT_FORMAT),
        train_fingerprint=first.get("train_fingerprint", ""),
        val_fingerprint=first.get("val_fingerprint", ""),
        model=cast(dict[str, object], averaged),
        soup=[str(p) for p in paths],
    )
    if "card" in first:  # checkpoints older than the card get theirs rebuilt by export
        checkpoint["card"] = first["card"]
    return checkpoint, parameters


class Scored:
    """A model's validation answers: what the greedy soup chooses by and calibration fits, computed once."""

    def __init__(self, checkpoint: Path, data: Path, config: SoupConfig) -> None:
        rows = load_split(data, "val")
        self.counts = np.array([int(r["count"]) for r in rows])
        self.probabilities = photo_probabilities(
            checkpoint, data, rows, device=config.device, workers=config.workers
        )
        # The accuracy training selects by: an overflow answer on a 7-item photo is not a right count.
        self.accuracy = counting_metrics(self.counts, self.probabilities).accuracy


def _greedy(
    paths: list[Path], members: list[tuple[Checkpoint, TrainConfig]], data: Path, config: SoupConfig
) -> tuple[list[int], list[GreedyStep], Scored]:
    """Greedy soup (Wortsman et al.): the best run alone, then each next-best run added only if the
    soup's validation accuracy does not fall. Soups are scored as written, through the evaluation path;
    the kept soup's answers come back for calibration."""
    alone = [Scored(path, data, config) for path in paths]
    order = sorted(range(len(paths)), key=lambda i: -alone[i].accuracy)
    kept, best = [order[0]], alone[order[0]]
    steps = [
        GreedyStep(
            checkpoint=paths[order[0]],
            val_accuracy=best.accuracy,
            soup_val_accuracy=best.accuracy,
            kept=True,
        )
    ]
    trial = config.out.with_name(config.out.name + ".trial")
    try:
        for index in order[1:]:
            candidate = [*kept, index]
            save_checkpoint(
                trial, _average([members[i] for i in candidate], [paths[i] for i in candidate])[0]
            )
            scored = Scored(trial, data, config)
            stays = scored.accuracy >= best.accuracy
            steps.append(
                GreedyStep(
                    checkpoint=paths[index],
                    val_accuracy=alone[index].accuracy,
                    soup_val_accuracy=scored.accuracy,
                    kept=stays,
                )
            )
            log.info(
                "greedy soup: %s (alone %.4f): soup of %d %.4f, %s",
                paths[index],
                alone[index].accuracy,
                len(candidate),
                scored.accuracy,
                "kept" if stays else "left out",
            )
            if stays:
                kept, best = candidate, scored
    finally:
        trial.unlink(missing_ok=True)
    return kept, steps, best


def soup(config: SoupConfig) -> SoupResult:
    """Average the members' weights into one checkpoint (with `greedy`, those that help on validation)."""
    paths = list(config.checkpoints)
    members = [load_trained(path) for path in paths]
    _check_compatible(paths, members)
    data = config.data or members[0][1].data
    calibrates = members[0][1].head == "classification" and config.temperature is None and config.calibrate
    refits = [str(path) for path, (_, member) in zip(paths, members, strict=True) if member.refit]
    if refits and config.data is None and (config.greedy or calibrates):
        raise BinsightError(
            f"{', '.join(refits)} trained on their validation photos (a refit): calibrating or choosing "
            "on them would measure fit",
            hint="pass --temperature with the one fitted for the soup of the runs they refit (without "
            "--greedy), or --data a dataset whose validation photos they did not train on",
        )
    if config.temperature is not None and members[0][1].head != "classification":
        raise BinsightError(
            f"--temperature scales a classification head; {paths[0]} has a {members[0][1].head} head",
            hint="drop --temperature",
        )
    config.out.parent.mkdir(parents=True, exist_ok=True)
    steps, scored = None, None
    if config.greedy:
        kept, steps, scored = _greedy(paths, members, data, config)
        paths, members = [paths[i] for i in kept], [members[i] for i in kept]
    checkpoint, parameters = _average(members, paths)
    save_checkpoint(config.out, checkpoint)
    result = SoupResult(
        out=config.out, members=paths, greedy=steps, arch=members[0][1].arch, parameters_averaged=parameters
    )
    if calibrates:
        # The soup is scored from its file (the evaluation path), hence the write above; a greedy
        # soup's last kept try was this very soup, already scored.
        scored = scored or Scored(config.out, data, config)
        result.temperature, result.val_nll = fit_temperature(scored.probabilities, scored.counts)
        log.info(
            "soup calibrated on %d validation photos: temperature %.3f",
            len(scored.counts),
            result.temperature,
        )
    else:
        result.temperature = config.temperature
    if result.temperature is not None:
        averaged = cast(dict[str, torch.Tensor], checkpoint["model"])
        for key in ("head.fc.weight", "head.fc.bias"):
            averaged[key].div_(result.temperature)  # the checkpoint's own tensors
        checkpoint["temperature"] = result.temperature
        save_checkpoint(config.out, checkpoint)
    return result


def fit_temperature(probabilities: np.ndarray, counts: np.ndarray) -> tuple[float, tuple[float, float]]:
    """The temperature T that minimises the log-loss of softmax(logits / T) on these answers and true
    counts, and the log-loss before and after. The log-probabilities stand in for the logits: they
    differ by a constant per photo, which softmax ignores."""
    classes = probabilities.shape[1]
    targets = np.minimum(counts, classes - 1)
    log_p = np.log(np.clip(probabilities, 1e-12, None))

    def nll(temperature: float) -> float:
        scaled = log_p / temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        log_softmax = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-log_softmax[np.arange(len(targets)), targets].mean())

    # A grid over log T: one dimension, no local minimum to fear, the same answer on every run.
    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 401))
    losses = [nll(float(t)) for t in grid]
    return float(grid[int(np.argmin(losses))]), (nll(1.0), min(losses))
