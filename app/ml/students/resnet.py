"""CIFAR-style residual students (He et al. 2016, "Deep residual learning for image recognition",
section 4.2): a 3x3 convolution, three stages of ``n`` basic blocks (depth ``6n + 2``) of widths
``w``, ``2w``, ``4w``, global average pooling and a linear classifier. Trained channels-last.

Shortcuts are the paper's option A, as its CIFAR networks use: identity, and where a stage starts
(stride 2, twice the channels) the input subsampled by 2 with zero channels appended, so the
shortcuts add no parameters and the counts are the paper's (ResNet-20, width 16: 0.27 M).

Each stage's output is the identity module ``stages.<i>`` (``i`` = 0, 1, 2: maps of ``w``, ``2w``,
``4w`` channels at 1, 1/2, 1/4 of the input's height and width), a leaf that the feature methods
list and hook by that name; the blocks themselves are ``blocks.<i>.<j>``.
"""

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional

from app.ml.signature import ModelSignature
from app.ml.students.base import StudentFamily, StudentSpecBase, accepts_images

DEPTHS = (8, 14, 20, 32, 44, 56)


class ResnetSpec(StudentSpecBase):
    """A CIFAR ResNet: ``depth`` 6n + 2 (n basic blocks per stage), stage widths ``width``,
    2 x ``width``, 4 x ``width``, ``dropout`` before the classifier.

    Parameters (3-channel inputs, 10 classes; option A shortcuts): ResNet-20 width 16 269,722
    (the paper's 0.27 M); ResNet-8 width 16 75,290; ResNet-56 width 16 853,018. In general
    ``9 C w + 2 w`` (stem) ``+ 288 w^2 + 28 w + (n - 1) (378 w^2 + 28 w)`` (blocks: each 3x3
    conv 9 x in x out, each batch norm 2 x out) ``+ 4 w K + K`` (classifier), for ``C`` input
    channels, ``K`` classes and ``w`` the ``width``.
    """

    architecture: Literal["resnet"] = "resnet"
    depth: int = Field(
        default=20,
        description="6n + 2: 3 stages of n basic blocks, one of 8, 14, 20, 32, 44, 56.",
        json_schema_extra={"enum": list(DEPTHS)},
    )
    width: int = Field(
        default=16, ge=4, le=256, description="Channels of the first stage (then 2x, 4x)."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, depth: int) -> int:
        if depth not in DEPTHS:
            raise ValueError(
                f"depth must be 6n + 2 (3 stages of n basic blocks, 2 convolutions each, plus "
                f"the first convolution and the classifier), one of "
                f"{', '.join(map(str, DEPTHS))}; got {depth}"
            )
        return depth


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, 3x3 convolutions. A block that
    halves the grid (``stride`` 2) and widens the channels has the option A shortcut: ``x``
    subsampled by 2, zero channels appended (``F.pad``: an ONNX ``Pad``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.extra_channels:
            # The conv's output is ceil(H / 2) x ceil(W / 2), as this slice is, odd sizes too.
            shortcut = functional.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra_channels)
            )
        result: Tensor = self.relu2(out + shortcut)
        return result


class GlobalAveragePool(nn.Module):
    """``[N, C, H, W]`` -> ``[N, C]`` (ONNX ``GlobalAveragePool`` then ``Flatten``): a vector,
    so feature methods take the last map ``[C, H, W]`` before it as the deepest features."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1)


class ResNet(nn.Module):
    """Images ``[batch, C, H, W]`` (any H, W >= 1) -> logits ``[batch, classes]``."""

    def __init__(self, spec: ResnetSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        blocks_per_stage = (spec.depth - 2) // 6
        widths = [spec.width, 2 * spec.width, 4 * spec.width]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for i, width in enumerate(widths):
            stage: list[nn.Module] = []
            for j in range(blocks_per_stage):
                stage.append(BasicBlock(channels, width, 2 if i > 0 and j == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.blocks = nn.ModuleList(stages)
        self.stages = nn.ModuleList(nn.Identity() for _ in widths)
        self.pool = GlobalAveragePool()
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else None
        self.classifier = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al. 2015 ("Delving deep into rectifiers"), as the paper initialises.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for blocks, stage in zip(self.blocks, self.stages, strict=True):
            x = stage(blocks(x))
        x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        result: Tensor = self.classifier(x)
        return result


def build(spec: ResnetSpec, signature: ModelSignature) -> nn.Module:
    """Images ``[batch, C, H, W]`` -> logits ``[batch, classes]``.

    Raises:
        ValueError: inputs that are not ``[C, H, W]``.
    """
    shape = signature.input_shape
    if len(shape) != 3:
        raise ValueError(f"a resnet needs inputs shaped [C, H, W], not {list(shape)}")
    return ResNet(spec, shape[0], signature.num_classes)


RESNET = StudentFamily(
    name="resnet",
    spec=ResnetSpec,
    build=build,
    accepts=accepts_images("resnet"),
    int8="static",
    memory_format="channels_last",
)
