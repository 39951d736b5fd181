"""The model card: what a counting model is and takes, in one record that travels with it. Shared by
every stage and light (no torch, no engine). Training writes it into the checkpoint, export into the
ONNX file's metadata, the registry into the version's record; the server (`/v1/model`), batch runs
and the audit read it from the model file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_height: int = Field(ge=1)
    input_width: int = Field(ge=1)
    # Pixels in, as the exported graph takes them: a float32 batch, channels first, RGB, scaled to
    # 0-1 and normalised by mean and std (imaging.normalise).
    layout: Literal["NCHW float32 RGB, (x/255 - mean) / std"] = "NCHW float32 RGB, (x/255 - mean) / std"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[int, ...] = Field(description="counts; the last one means that many or more")
    arch: str
    head: str
    training: dict[str, Any] = Field(default_factory=dict, description="the training config")
    data: str = ""
    train_fingerprint: str = ""
    val_fingerprint: str = ""

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_height, self.input_width
