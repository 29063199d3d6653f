"""Plain convolutional students: per width a 3x3 conv, batch norm, ReLU and 2x2 max-pool, then an
MLP head. Trained channels-last."""

from typing import Literal

from pydantic import Field
from torch import nn

from app.ml.signature import ModelSignature
from app.ml.students.base import (
    StudentFamily,
    StudentSpecBase,
    Width,
    accepts_images,
    classifier_head,
)


class CnnSpec(StudentSpecBase):
    """Per channel width a 3x3 conv, batch norm, ReLU and 2x2 max-pool; then an MLP head."""

    architecture: Literal["cnn"] = "cnn"
    channels: list[Width] = Field(default=[16, 32], min_length=1, max_length=8)
    hidden_sizes: list[Width] = Field(default=[], max_length=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def build(spec: CnnSpec, signature: ModelSignature) -> nn.Module:
    """Images ``[batch, C, H, W]`` -> logits ``[batch, classes]``.

    Raises:
        ValueError: inputs that are not ``[C, H, W]``.
    """
    shape = signature.input_shape
    if len(shape) != 3:
        raise ValueError(f"a cnn needs inputs shaped [C, H, W], not {list(shape)}")
    channels, height, width = shape
    layers: list[nn.Module] = []
    for out_channels in spec.channels:
        layers += [
            nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out_channels
    head = classifier_head(
        channels * height * width, spec.hidden_sizes, spec.dropout, signature.num_classes
    )
    return nn.Sequential(*layers, nn.Flatten(), *head)


CNN = StudentFamily(
    name="cnn",
    spec=CnnSpec,
    build=build,
    accepts=accepts_images("cnn"),
    int8="static",
    memory_format="channels_last",
)
