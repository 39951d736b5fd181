"""Counting heads. Counts are ordered, so besides plain classification there are two heads that know it:

- ``classification``: softmax over 0..K, cross-entropy (with optional label smoothing).
- ``ordinal``: K sigmoid outputs for P(count > k) sharing one score (CORAL, Cao et al. 2020); mistakes
  by one cost less than mistakes by three, and predictions cannot be non-monotone.
- ``regression``: one number, smooth-L1 to the count; rounding gives the class.

Every head turns its outputs into a probability for each count 0..K, so metrics, calibration and the
audit treat them alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("classification", "ordinal", "regression")
# Spread of the discretised Gaussian that gives a regression head count probabilities.
REGRESSION_SIGMA = 0.5


def neighbour_targets(targets: torch.Tensor, num_classes: int, share: float) -> torch.Tensor:
    """One-hot targets with `share` of the mass split over the counts one above and one below."""
    soft = F.one_hot(targets, num_classes).float()
    below = F.one_hot((targets - 1).clamp_min(0), num_classes).float() * (targets > 0)[:, None]
    above = F.one_hot((targets + 1).clamp_max(num_classes - 1), num_classes).float()
    above = above * (targets < num_classes - 1)[:, None]
    neighbours = below + above
    return soft * (1 - share) + share * neighbours / neighbours.sum(dim=1, keepdim=True)


class CountHead(nn.Module):
    # Declared, so that attribute access is typed (nn.Module's __getattr__ would say Tensor | Module).
    fc: nn.Linear
    thresholds: nn.Parameter

    def __init__(self, kind: str, in_features: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")
        self.kind = kind
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        if kind == "classification":
            self.fc = nn.Linear(in_features, num_classes)
        elif kind == "ordinal":
            self.fc = nn.Linear(in_features, 1, bias=False)
            self.thresholds = nn.Parameter(torch.linspace(1.0, -1.0, num_classes - 1))
        else:
            self.fc = nn.Linear(in_features, 1)

    @torch.no_grad()
    def start_from_prior(self, class_counts: torch.Tensor) -> None:
        """Start an ordinal or regression head at the training data's base rates.

        Adam moves a parameter by about the learning rate per step, so thresholds initialised at
        evenly spaced values need thousands of steps to reach the data's (P(count > 0) is near 1 in
        ABID, a logit of ~5): on 1.4k real photos an ordinal head was still at its initial thresholds
        after 3 epochs and answered "6+" for nearly every bin. Classification needs no help: its
        softmax biases start equal, and the first steps set them.
        """
        frequency = (class_counts.double() + 1) / (class_counts.sum() + self.num_classes)  # add-one
        if self.kind == "ordinal":
            survival = (1 - frequency.cumsum(0)[:-1]).clamp(1e-4, 1 - 1e-4)
            self.thresholds.copy_(torch.logit(survival).float())
        elif self.kind == "regression":
            self.fc.bias.fill_(float((frequency * torch.arange(self.num_classes)).sum()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.dropout(torch.flatten(features, 1)))
        if self.kind == "ordinal":
            return out + self.thresholds  # (N, K) logits of P(count > k)
        return out.squeeze(1) if self.kind == "regression" else out

    def loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        neighbour_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Training loss; with reduction="none", one value per image.

        `neighbour_smoothing` (classification) moves that share of each target to the adjacent counts:
        calling 4 a 5 is a smaller mistake than calling it a 1, and the loss then says so.
        """
        if self.kind == "classification" and neighbour_smoothing > 0:
            soft = neighbour_targets(targets, self.num_classes, neighbour_smoothing).to(outputs.dtype)
            if label_smoothing > 0:
                soft = soft * (1 - label_smoothing) + label_smoothing / self.num_classes
            per_image = -(soft * F.log_softmax(outputs, dim=1)).sum(dim=1)
        elif self.kind == "classification":
            per_image = F.cross_entropy(outputs, targets, label_smoothing=label_smoothing, reduction="none")
        elif self.kind == "ordinal":
            levels = torch.arange(self.num_classes - 1, device=targets.device)
            above = (targets[:, None] > levels[None, :]).to(outputs.dtype)
            per_image = F.binary_cross_entropy_with_logits(outputs, above, reduction="none").mean(dim=1)
        else:
            per_image = F.smooth_l1_loss(outputs, targets.to(outputs.dtype), reduction="none")
        return per_image if reduction == "none" else per_image.mean()

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, num_classes) probabilities of each count."""
        outputs = outputs.float()
        if self.kind == "classification":
            return outputs.softmax(dim=1)
        if self.kind == "ordinal":
            above = torch.sigmoid(outputs)
            ones = torch.ones_like(above[:, :1])
            zeros = torch.zeros_like(above[:, :1])
            # A running minimum keeps P(count > k) non-increasing in k. Unrolled (K is small) rather
            # than torch.cummin, which ONNX cannot express.
            columns = [above[:, 0]]
            for k in range(1, above.shape[1]):
                columns.append(torch.minimum(columns[-1], above[:, k]))
            above = torch.stack(columns, dim=1)
            survival = torch.cat([ones, above, zeros], dim=1)
            return (survival[:, :-1] - survival[:, 1:]).clamp_min(0)
        classes = torch.arange(self.num_classes, device=outputs.device, dtype=outputs.dtype)
        return (-((classes[None, :] - outputs[:, None]) ** 2) / (2 * REGRESSION_SIGMA**2)).softmax(dim=1)


class CountingModel(nn.Module):
    # Declared, so that attribute access is typed (nn.Module's __getattr__ would say Tensor | Module).
    backbone: nn.Module
    head: CountHead

    def __init__(self, backbone: nn.Module, head: CountHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone(images))
        return logits
