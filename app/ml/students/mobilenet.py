"""MobileNetV2-style students (Sandler et al. 2018, "MobileNetV2: inverted residuals and linear
bottlenecks"): inverted residual blocks (1x1 expansion by ``t``, 3x3 depthwise, ReLU6, then a
linear 1x1 projection; a residual where the shape is kept), reduced for small images. Trained
channels-last.

The stage table (``width_multiplier`` 1; channels scaled by it and rounded to multiples of 8 as
the paper's code does). It is the paper's Table 2 without its two widest sequences (160 and 320
channels) and with a 1x1 head of 4 x 96 channels instead of 1280: 0.58 M parameters for 10
classes where the whole table has 2.24 M (3.50 M for 1,000 classes: the paper's 3.4 M):

=============  ===  ========  ===  =====================
module         t    channels  n    downsampling slot
=============  ===  ========  ===  =====================
stem (conv3)   -    32        1    4th
stages.0       1    16        1    -
stages.1       t    24        2    1st
stages.2       t    32        3    2nd
stages.3       t    64        4    3rd
stages.4       t    96        3    5th
head (conv1)   -    384       1    -
=============  ===  ========  ===  =====================

then global average pooling, dropout and a linear classifier. Strides follow the input size: a
slot halves the grid (stride 2 in its first block) only while the map it makes stays at least
``MIN_GRID`` (4) pixels on its shorter side, slots taken in the order above. 32x32 (CIFAR) gets
the first three, down to 4x4, as CIFAR adaptations of MobileNetV2 do (28x28 too); 224x224 all
five, down to 7x7, as the paper's ImageNet network; 12x12 one (6x6); 8x8 one (4x4); below 7
pixels none. Any
``[C, H, W]`` is taken, and the strides are a function of the shape, so serving rebuilds the
same network from the signature.

Each stage's output is the identity module ``stages.<i>`` (``i`` = 0 to 4), a leaf that the
feature methods list and hook by that name; the blocks themselves are ``blocks.<i>.<j>``.
"""

import math
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from app.ml.signature import ModelSignature
from app.ml.students.base import StudentFamily, StudentSpecBase, accepts_images
from app.ml.students.resnet import GlobalAveragePool

# (expands by ``expansion``, channels, blocks, downsampling slot or None), stages.0 to stages.4.
STAGES: tuple[tuple[bool, int, int, int | None], ...] = (
    (False, 16, 1, None),
    (True, 24, 2, 0),
    (True, 32, 3, 1),
    (True, 64, 4, 2),
    (True, 96, 3, 4),
)
STEM_CHANNELS, STEM_SLOT = 32, 3
HEAD_CHANNELS = 384
MIN_GRID = 4


class MobilenetV2Spec(StudentSpecBase):
    """MobileNetV2 reduced for small images (the stage table in this module's docstring):
    channels times ``width_multiplier``, inverted residuals expanding by ``expansion`` (the
    paper's t), ``dropout`` before the classifier; strides follow the input size.

    Parameters (3-channel inputs, 10 classes; the strides change no count): width 1.0
    584,010; 0.5 162,922."""

    architecture: Literal["mobilenet_v2"] = "mobilenet_v2"
    width_multiplier: float = Field(
        default=1.0, ge=0.25, le=4.0, description="Scales every layer's channels."
    )
    expansion: int = Field(
        default=6, ge=1, le=12, description="t: how much each inverted residual widens."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def make_divisible(channels: float, divisor: int = 8) -> int:
    """``channels`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never
    more than 10% below it: the rounding of the paper's reference implementation."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def strides(height: int, width: int) -> list[int]:
    """The stride (1 or 2) of each downsampling slot, in slot order, for ``height`` x ``width``
    inputs: slots halve the grid in order while the shorter side stays ``MIN_GRID`` or more
    (a stride-2 3x3 convolution with padding 1 makes ``ceil(size / 2)``)."""
    side, result = min(height, width), []
    for _ in range(1 + max(slot for *_, slot in STAGES if slot is not None)):
        halve = math.ceil(side / 2) >= MIN_GRID
        side = math.ceil(side / 2) if halve else side
        result.append(2 if halve else 1)
    return result


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]


class InvertedResidual(nn.Module):
    """``expand`` (1x1 conv to ``t`` x the channels, batch norm, ReLU6; absent when ``t`` is 1),
    ``depthwise`` (3x3 per channel, ``stride``, batch norm, ReLU6), ``project`` (1x1 conv, batch
    norm, no activation: the linear bottleneck), plus ``x`` when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = (
            nn.Sequential(*conv_bn(in_channels, hidden, 1), nn.ReLU6()) if expansion != 1 else None
        )
        self.depthwise = nn.Sequential(*conv_bn(hidden, hidden, 3, stride, hidden), nn.ReLU6())
        self.project = nn.Sequential(*conv_bn(hidden, out_channels, 1))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        result: Tensor = x + out if self.residual else out
        return result


class MobileNetV2(nn.Module):
    """Images ``[batch, C, H, W]`` (any H, W >= 1) -> logits ``[batch, classes]``."""

    def __init__(self, spec: MobilenetV2Spec, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        in_channels, height, width = input_shape
        stride = strides(height, width)

        def scaled(channels: int) -> int:
            return make_divisible(channels * spec.width_multiplier)

        channels = scaled(STEM_CHANNELS)
        self.stem = nn.Sequential(*conv_bn(in_channels, channels, 3, stride[STEM_SLOT]), nn.ReLU6())
        stages: list[nn.Module] = []
        for expands, out_channels, blocks, slot in STAGES:
            stage: list[nn.Module] = []
            for j in range(blocks):
                first_stride = 1 if slot is None else stride[slot]
                stage.append(
                    InvertedResidual(
                        channels,
                        scaled(out_channels),
                        first_stride if j == 0 else 1,
                        spec.expansion if expands else 1,
                    )
                )
                channels = scaled(out_channels)
            stages.append(nn.Sequential(*stage))
        self.blocks = nn.ModuleList(stages)
        self.stages = nn.ModuleList(nn.Identity() for _ in STAGES)
        self.head = nn.Sequential(*conv_bn(channels, scaled(HEAD_CHANNELS), 1), nn.ReLU6())
        self.pool = GlobalAveragePool()
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else None
        self.classifier = nn.Linear(scaled(HEAD_CHANNELS), num_classes)
        for module in self.modules():
            # The initialisation of torchvision's MobileNetV2.
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for blocks, stage in zip(self.blocks, self.stages, strict=True):
            x = stage(blocks(x))
        x = self.pool(self.head(x))
        if self.dropout is not None:
            x = self.dropout(x)
        result: Tensor = self.classifier(x)
        return result


def build(spec: MobilenetV2Spec, signature: ModelSignature) -> nn.Module:
    """Images ``[batch, C, H, W]`` -> logits ``[batch, classes]``.

    Raises:
        ValueError: inputs that are not ``[C, H, W]``.
    """
    shape = signature.input_shape
    if len(shape) != 3:
        raise ValueError(f"a mobilenet_v2 needs inputs shaped [C, H, W], not {list(shape)}")
    return MobileNetV2(spec, shape, signature.num_classes)


MOBILENET_V2 = StudentFamily(
    name="mobilenet_v2",
    spec=MobilenetV2Spec,
    build=build,
    accepts=accepts_images("mobilenet_v2"),
    int8="static",
    memory_format="channels_last",
)
