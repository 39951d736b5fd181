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


class CountHead(nn.Module):
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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.dropout(torch.flatten(features, 1)))
        if self.kind == "ordinal":
            return out + self.thresholds  # (N, K) logits of P(count > k)
        return out.squeeze(1) if self.kind == "regression" else out

    def loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Training loss; with reduction="none", one value per image."""
        if self.kind == "classification":
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
    def __init__(self, backbone: nn.Module, head: CountHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
