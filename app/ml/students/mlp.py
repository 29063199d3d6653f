"""Multi-layer perceptron students: flatten, Linear+ReLU per hidden size, a linear classifier."""

import math
from typing import Literal

from pydantic import Field
from torch import nn

from app.ml.signature import ModelSignature
from app.ml.students.base import (
    StudentFamily,
    StudentSpecBase,
    Width,
    classifier_head,
    one_float_tensor,
)


class MlpSpec(StudentSpecBase):
    """Flatten, then Linear+ReLU per hidden size, then a linear classifier."""

    architecture: Literal["mlp"] = "mlp"
    hidden_sizes: list[Width] = Field(default=[128], max_length=16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def build(spec: MlpSpec, signature: ModelSignature) -> nn.Module:
    """Inputs ``[batch, *input_shape]`` -> logits ``[batch, classes]``."""
    return nn.Sequential(
        nn.Flatten(),
        *classifier_head(
            math.prod(signature.input_shape), spec.hidden_sizes, spec.dropout, signature.num_classes
        ),
    )


MLP = StudentFamily(name="mlp", spec=MlpSpec, build=build, accepts=one_float_tensor, int8="dynamic")
