"""The layers a feature-distillation method can hook, named by module path, with their shapes,
and the activation memory of a forward pass.

Both come from running the model once on the meta device (no memory, no maths), so the API can
check a job's layer names, shapes and memory at submission, and the worker can size the adapters.
"""

import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from app.ml.signature import ModelSignature
from app.ml.students import StudentSpecBase, build_model

FLOAT32_BYTES = 4


class FeatureLayer(BaseModel):
    name: str = Field(description="Module path (or, for an ONNX teacher, graph output name).")
    shape: list[int] = Field(description="Per sample: `[C, H, W]` feature maps or `[D]`.")
    kind: str | None = Field(default=None, description="The module's class, e.g. `MaxPool2d`.")


def _meta_forward(
    spec: StudentSpecBase,
    signature: ModelSignature,
    record: Callable[[str, nn.Module, Any], None],
) -> None:
    """Build ``spec`` on the meta device and run one sample through it, calling
    ``record(name, module, output)`` after each leaf module, in forward order."""
    with torch.device("meta"):
        model = build_model(spec, signature)

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record(name, module, output)

        return hook

    handles = [
        module.register_forward_hook(hook_for(name))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            model(torch.empty(1, *signature.input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()


def feature_layers(spec: StudentSpecBase, signature: ModelSignature) -> list[FeatureLayer]:
    """Every layer's output shape (per sample) in the order the forward pass produces them,
    except the last (the logits). Names are paths for ``build_model(...).get_submodule``."""
    layers: dict[str, FeatureLayer] = {}

    def record(name: str, module: nn.Module, output: Any) -> None:
        if isinstance(output, torch.Tensor) and name not in layers:
            layers[name] = FeatureLayer(
                name=name, shape=list(output.shape[1:]), kind=type(module).__name__
            )

    _meta_forward(spec, signature, record)
    return list(layers.values())[:-1]


def input_bytes(signature: ModelSignature) -> int:
    """Bytes of one float32 input sample of ``signature``."""
    return math.prod(signature.input_shape) * FLOAT32_BYTES


def activation_bytes(spec: StudentSpecBase, signature: ModelSignature) -> int:
    """Activation memory, in bytes, of a forward pass of one sample through ``spec`` built for
    ``signature``: the input plus every layer's output, summed (what training keeps for the
    backward pass; an upper bound for inference). Computed on the meta device: nothing is
    allocated, whatever the shapes. Multiply by the batch size for a batch."""
    total = input_bytes(signature)

    def record(name: str, module: nn.Module, output: Any) -> None:
        nonlocal total
        outputs = output if isinstance(output, tuple | list) else (output,)
        total += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    _meta_forward(spec, signature, record)
    return total


def last_feature_map(layers: list[FeatureLayer]) -> FeatureLayer | None:
    """The last ``[C, H, W]`` output: the deepest spatial features (FitNets, attention)."""
    return next((layer for layer in reversed(layers) if len(layer.shape) == 3), None)
