"""Training monitors in the spirit of SageMaker Debugger's built-in rules.

Each rule watches the numbers the loop already has (losses, gradient norms, label counts) and
reports a finding once when its condition starts to hold; findings go to the log, to history.json,
and to the HTML report.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Finding:
    rule: str
    epoch: int
    message: str


@dataclass
class MonitorSettings:
    exploding_grad_norm: float = 1e3
    vanishing_grad_norm: float = 1e-7
    vanishing_steps: int = 20
    stall_epochs: int = 3
    stall_min_improvement: float = 0.01
    overfit_epochs: int = 3
    imbalance_ratio: float = 10.0


@dataclass
class Monitors:
    settings: MonitorSettings = field(default_factory=MonitorSettings)
    findings: list[Finding] = field(default_factory=list)
    _fired: set[str] = field(default_factory=set)
    _tiny_grad_steps: int = 0

    def _report(self, rule: str, epoch: int, message: str) -> None:
        if rule in self._fired:
            return
        self._fired.add(rule)
        self.findings.append(Finding(rule, epoch, message))
        log.warning("monitor %s (epoch %d): %s", rule, epoch, message)

    def check_class_balance(self, counts: np.ndarray) -> None:
        present = counts[counts > 0]
        if present.size and present.max() / present.min() > self.settings.imbalance_ratio:
            ratio = present.max() / present.min()
            self._report(
                "class_imbalance",
                0,
                f"largest class has {ratio:.0f}x the images of the smallest ({counts.tolist()}); "
                "consider per-class sampling or more data for rare counts",
            )

    def check_gradient(self, grad_norm: float, epoch: int, step: int) -> None:
        if not math.isfinite(grad_norm):
            self._report(
                "exploding_gradient",
                epoch,
                f"gradient norm is {grad_norm} at step {step}; the step was skipped",
            )
        elif grad_norm > self.settings.exploding_grad_norm:
            self._report(
                "exploding_gradient",
                epoch,
                f"gradient norm {grad_norm:.3g} at step {step} exceeds "
                f"{self.settings.exploding_grad_norm:g}; lower the learning rate or set grad_clip",
            )
        if grad_norm < self.settings.vanishing_grad_norm:
            self._tiny_grad_steps += 1
            if self._tiny_grad_steps >= self.settings.vanishing_steps:
                self._report(
                    "vanishing_gradient",
                    epoch,
                    f"gradient norm below {self.settings.vanishing_grad_norm:g} for "
                    f"{self._tiny_grad_steps} steps in a row; the model has stopped learning",
                )
        else:
            self._tiny_grad_steps = 0

    def check_epoch(self, epoch: int, train_losses: list[float], val_losses: list[float]) -> None:
        """Called after each epoch with the full loss history so far."""
        s = self.settings
        if len(train_losses) > s.stall_epochs:
            earlier = min(train_losses[: -s.stall_epochs])
            recent = min(train_losses[-s.stall_epochs :])
            if recent > earlier * (1 - s.stall_min_improvement):
                self._report(
                    "loss_not_decreasing",
                    epoch,
                    f"training loss has not improved by {100 * s.stall_min_improvement:.0f}% in "
                    f"{s.stall_epochs} epochs (best {earlier:.4f}, recent {recent:.4f}); "
                    "check the learning rate and the labels",
                )
        if len(val_losses) > s.overfit_epochs:
            gaps = [v - t for v, t in zip(val_losses, train_losses, strict=True)]
            recent_gaps = gaps[-s.overfit_epochs - 1 :]
            growing = all(b > a for a, b in itertools.pairwise(recent_gaps))
            if growing and val_losses[-1] > min(val_losses):
                self._report(
                    "overfitting",
                    epoch,
                    f"validation loss rose to {val_losses[-1]:.4f} (best {min(val_losses):.4f}) while "
                    f"the train/val gap grew for {s.overfit_epochs} epochs; stronger "
                    "augmentation, more data or earlier stopping would help",
                )

    def state_dict(self) -> dict[str, object]:
        return {
            "findings": [asdict(f) for f in self.findings],
            "fired": sorted(self._fired),
            "tiny_grad_steps": self._tiny_grad_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.findings = [Finding(**f) for f in state["findings"]]
        self._fired = set(state["fired"])
        self._tiny_grad_steps = int(state["tiny_grad_steps"])
