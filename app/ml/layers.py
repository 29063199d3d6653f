"""The layers a feature-distillation method can hook, named by module path, with their shapes.

Listed by running the model once on the meta device (no memory, no maths), so the API can check a
job's layer names and shapes at submission, and the worker can size the adapters.
"""

from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from app.ml.signature import ModelSignature
from app.ml.students import StudentSpecBase, build_model


class FeatureLayer(BaseModel):
    name: str = Field(description="Module path (or, for an ONNX teacher, graph output name).")
    shape: list[int] = Field(description="Per sample: `[C, H, W]` feature maps or `[D]`.")
    kind: str | None = Field(default=None, description="The module's class, e.g. `MaxPool2d`.")


def feature_layers(spec: StudentSpecBase, signature: ModelSignature) -> list[FeatureLayer]:
    """Every layer's output shape (per sample) in the order the forward pass produces them,
    except the last (the logits). Names are paths for ``build_model(...).get_submodule``."""
    with torch.device("meta"):
        model = build_model(spec, signature)
    layers: dict[str, FeatureLayer] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and name not in layers:
                layers[name] = FeatureLayer(
                    name=name, shape=list(output.shape[1:]), kind=type(module).__name__
                )

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            model(torch.empty(1, *signature.input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return list(layers.values())[:-1]


def last_feature_map(layers: list[FeatureLayer]) -> FeatureLayer | None:
    """The last ``[C, H, W]`` output: the deepest spatial features (FitNets, attention)."""
    return next((layer for layer in reversed(layers) if len(layer.shape) == 3), None)
