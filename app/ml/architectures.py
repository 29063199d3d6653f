"""The model families Distill builds itself: for students, and for safetensors teachers.

A spec is pure data (pydantic), stored with the job and in the artifact manifest, so a model is
rebuilt from its spec and weights alone, never from user-supplied code.
"""

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

Width = Annotated[int, Field(ge=1, le=16_384)]


class MlpSpec(BaseModel):
    """Flatten, then Linear+ReLU per hidden size, then a linear classifier."""

    model_config = ConfigDict(extra="forbid")
    architecture: Literal["mlp"] = "mlp"
    hidden_sizes: list[Width] = Field(default=[128], max_length=16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class CnnSpec(BaseModel):
    """Per channel width a 3x3 conv, batch norm, ReLU and 2x2 max-pool; then an MLP head."""

    model_config = ConfigDict(extra="forbid")
    architecture: Literal["cnn"] = "cnn"
    channels: list[Width] = Field(default=[16, 32], min_length=1, max_length=8)
    hidden_sizes: list[Width] = Field(default=[], max_length=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


ModelSpec = Annotated[MlpSpec | CnnSpec, Field(discriminator="architecture")]


def _head(
    in_features: int, hidden_sizes: list[int], dropout: float, num_classes: int
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def build_model(
    spec: MlpSpec | CnnSpec, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build a freshly initialised model for inputs ``[batch, *input_shape]``."""
    if isinstance(spec, MlpSpec):
        return nn.Sequential(
            nn.Flatten(),
            *_head(math.prod(input_shape), spec.hidden_sizes, spec.dropout, num_classes),
        )
    if len(input_shape) != 3:
        raise ValueError(f"a cnn needs inputs shaped [C, H, W], not {list(input_shape)}")
    channels, height, width = input_shape
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
    features = channels * height * width
    return nn.Sequential(
        *layers, nn.Flatten(), *_head(features, spec.hidden_sizes, spec.dropout, num_classes)
    )


class Standardize(nn.Module):
    """``(x - mean) / std`` with per-channel (per-feature for flat inputs) statistics of the
    training inputs. Kept as buffers, so the student takes raw inputs just as its teacher does;
    it makes the student's optimisation much better conditioned (an MLP on raw [0, 1] pixels
    learns markedly slower)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        shape = (input_shape[0],) + (1,) * (len(input_shape) - 1)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the statistics from a batch ``[N, *input_shape]``."""
        dims = (0, *range(2, x.ndim))
        self.mean.copy_(x.mean(dim=dims).reshape(self.mean.shape))
        self.std.copy_(x.std(dim=dims).clamp_min(1e-6).reshape(self.std.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_student(
    spec: MlpSpec | CnnSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    fit_inputs: torch.Tensor | None = None,
) -> nn.Sequential:
    """A student: input standardisation (fitted on ``fit_inputs`` when given), then the
    architecture. Serving rebuilds it without ``fit_inputs`` and loads the statistics."""
    standardize = Standardize(input_shape)
    if fit_inputs is not None:
        standardize.fit(fit_inputs)
    return nn.Sequential(standardize, build_model(spec, input_shape, num_classes))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
