"""The layers a feature-distillation method can hook, named by module path, with their shapes,
and the activation memory of a forward pass.

Both come from running the model once on the meta device (no memory, no maths), so the API can
check a job's layer names, shapes and memory at submission, and the worker can size the adapters.
"""

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from app.ml.signature import ModelSignature, TextPreprocessing
from app.ml.students import StudentSpecBase, TextCnnSpec, TransformerSpec, build_model
from app.ml.text import ATTENTIONS, HIDDEN_STATES


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
            model(*_example(signature))
    finally:
        for handle in handles:
            handle.remove()


def _example(signature: ModelSignature) -> list[torch.Tensor]:
    """One sample on the meta device: text of ``max_length`` tokens, else the input shape.

    Text gets ``input_ids`` alone (no padding: the same sizes): a mask would make
    ``transformers`` ask whether it masks anything, which a meta tensor cannot answer.
    """
    if isinstance(signature.preprocessing, TextPreprocessing):
        shape = (1, signature.preprocessing.max_length)
        return [torch.ones(shape, dtype=torch.int64, device="meta")]
    return [torch.empty(1, *signature.input_shape, device="meta")]


def transformer_layers(num_layers: int, hidden_size: int, num_heads: int) -> list[FeatureLayer]:
    """What a text feature method matches in a transformer encoder: ``hidden_states.<i>``
    (``i = 0`` the embeddings' output, ``i`` layer ``i``'s), per token ``[hidden_size]``, and
    ``attentions.<i>`` (layer ``i + 1``'s attention distributions), per query ``[num_heads]``
    distributions over the keys. Named as ``transformers`` returns them."""
    hidden = [
        FeatureLayer(name=f"{HIDDEN_STATES}.{i}", shape=[hidden_size], kind=HIDDEN_STATES)
        for i in range(num_layers + 1)
    ]
    attentions = [
        FeatureLayer(name=f"{ATTENTIONS}.{i}", shape=[num_heads], kind=ATTENTIONS)
        for i in range(num_layers)
    ]
    return hidden + attentions


def feature_layers(spec: StudentSpecBase, signature: ModelSignature) -> list[FeatureLayer]:
    """Every layer's output shape (per sample) in the order the forward pass produces them,
    except the last (the logits). Names are paths for ``build_model(...).get_submodule``; a
    transformer student's are its hidden states and attentions (``transformer_layers``); a
    text CNN offers none."""
    if isinstance(spec, TransformerSpec):
        assert spec.hidden_size is not None and spec.num_heads is not None, "resolved"
        return transformer_layers(spec.num_layers, spec.hidden_size, spec.num_heads)
    if isinstance(spec, TextCnnSpec):
        return []
    layers: dict[str, FeatureLayer] = {}

    def record(name: str, module: nn.Module, output: Any) -> None:
        if isinstance(output, torch.Tensor) and name not in layers:
            layers[name] = FeatureLayer(
                name=name, shape=list(output.shape[1:]), kind=type(module).__name__
            )

    _meta_forward(spec, signature, record)
    return list(layers.values())[:-1]


def input_bytes(signature: ModelSignature) -> int:
    """Bytes of one input sample of ``signature`` (text: ``max_length`` int64 tokens per
    input)."""
    return sum(t.numel() * t.element_size() for t in _example(signature))


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
