"""An exponential moving average of the weights: one model that behaves like an average of the points
the optimiser passed through late in training, for the price of one copy of the weights and no pass.

On a few thousand photos the validation accuracy of the trained weights jumps by a point or two from
epoch to epoch, and the epoch `best.pt` keeps is picked on that noise; the average moves slowly, so the
model kept and served depends less on which epoch happened to end well.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """`module` holds the average of a model's parameters and floating buffers (BatchNorm's running
    statistics too, so that the average is evaluated with statistics of weights like its own).

    The decay starts low and rises towards `decay` as (1 + n) / (10 + n) after n updates: a plain moving
    average started at the first step would keep the pretrained weights and the random head for
    hundreds of steps, and on a short run it never forgets them.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the model's weights after one optimiser step."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        averaged_floats, current_floats = [], []
        pairs = zip(
            [*self.module.parameters(), *self.module.buffers()],
            [*model.parameters(), *model.buffers()],
            strict=True,
        )
        for averaged, current in pairs:
            if averaged.is_floating_point():
                averaged_floats.append(averaged)
                current_floats.append(current.detach().to(averaged.dtype))
            else:
                averaged.copy_(current)  # counters (BatchNorm's batches seen) are not averaged
        # One multi-tensor update, as torch.optim.swa_utils' EMA does: on a GPU a kernel launch per
        # tensor (296 for Lite0) every step adds up; on a CPU it is the same loop (2-3 ms either way).
        torch._foreach_lerp_(averaged_floats, current_floats, weight)

    def restore(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Continue an average saved by an interrupted run."""
        self.module.load_state_dict(weights)
        self.updates = updates
