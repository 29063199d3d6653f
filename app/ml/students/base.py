"""What every student family provides, and what all students share: input standardisation."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from app.ml.signature import Datatype, ModelSignature, TextPreprocessing

Width = Annotated[int, Field(ge=1, le=16_384)]


class StudentSpecBase(BaseModel):
    """A family's spec: pure data, stored with the job and in the artifact manifest, so a student
    is rebuilt from its spec and weights alone. ``architecture`` names the family."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    architecture: str


SpecT = TypeVar("SpecT", bound=StudentSpecBase)
MemoryFormat = Literal["contiguous", "channels_last"]
# onnxruntime's int8 quantisation for the exported student: dynamic (weights ahead of time,
# activations per batch) for matrix products, static (calibrated activations) for convnets.
QuantMethod = Literal["dynamic", "static"]


@dataclass(frozen=True)
class StudentFamily(Generic[SpecT]):
    """One architecture family: its spec type, how to build it for a signature, which
    signatures it accepts, how its int8 student is quantised (``worker.quantize``), and the
    memory format it trains fastest in.

    ``accepts`` returns None when the family can take the signature, else the reason it cannot.
    ``resolve`` (families built from their teacher: text students) settles at submission what
    the spec takes from the teacher's ``architecture`` (its config), raising ``ValueError`` with
    the reason when it cannot. Export needs nothing per family: every student is exported to
    ONNX from its signature.
    """

    name: str
    spec: type[SpecT]
    build: Callable[[SpecT, ModelSignature], nn.Module]
    accepts: Callable[[ModelSignature], str | None]
    int8: QuantMethod
    memory_format: MemoryFormat = "contiguous"
    resolve: Callable[[SpecT, dict[str, Any] | None], SpecT] | None = None

    def apply_memory_format(self, model: nn.Module) -> nn.Module:
        if self.memory_format == "channels_last":
            # NHWC: oneDNN (CPU) and cuDNN (tensor cores) run convolutions faster in this layout.
            return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]
        return model


def one_float_tensor(signature: ModelSignature, rank: int | None = None) -> str | None:
    """None if the signature is one FP32 input of fixed shape (of ``rank`` dims, if given)."""
    if isinstance(signature.preprocessing, TextPreprocessing):
        return "it takes one FP32 tensor, not tokenised text: use a `transformer` or `text_cnn`"
    if len(signature.inputs) != 1 or signature.inputs[0].datatype != Datatype.FP32:
        return f"it takes one FP32 tensor; these inputs are {signature.describe_inputs()}"
    shape = signature.inputs[0].static_shape
    if shape is None:
        return f"it needs fixed input sizes; got {signature.inputs[0].shape}"
    if rank is not None and len(shape) != rank:
        return f"it needs inputs of {rank} dimensions; got {list(shape)}"
    return None


def accepts_images(family: str) -> Callable[[ModelSignature], str | None]:
    """The ``accepts`` of a family of image students: one FP32 input ``[C, H, W]``."""

    def accepts(signature: ModelSignature) -> str | None:
        reason = one_float_tensor(signature, rank=3)
        if reason is None:
            return None
        return f"{reason}: a {family} student needs image inputs [C, H, W]"

    return accepts


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
        """Set the statistics from a batch ``[N, *input_shape]`` (any N >= 1).

        A feature (channel) that never varied gets scale 1, scikit-learn's convention
        (``StandardScaler``): its std is 0, and any floor would turn a faint value there at
        serving into an enormous input. The std is the population one, defined for one sample.
        """
        dims = (0, *range(2, x.ndim))
        constant = x.amax(dim=dims) == x.amin(dim=dims)
        std = torch.where(constant, 1.0, x.std(dim=dims, correction=0))
        self.mean.copy_(x.mean(dim=dims).reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def classifier_head(
    in_features: int, hidden_sizes: list[int], dropout: float, num_classes: int
) -> list[nn.Module]:
    """Linear+ReLU (+dropout) per hidden size, then the linear classifier."""
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers
