"""Outputs of named submodules, taken with forward hooks while a model runs."""

from typing import Any

import torch
from torch import nn

from app.ml.text import ATTENTIONS, HIDDEN_STATES, layer_index


class FeatureTap:
    """Calls ``model`` and also returns the outputs of the submodules of ``root`` (by default the
    model itself) at ``paths``, in that order. Outputs are kept only during a call through the
    tap, so plain calls (evaluation, export) hold nothing extra."""

    def __init__(self, model: nn.Module, paths: list[str], root: nn.Module | None = None) -> None:
        self.model, self.paths = model, paths
        self._outputs: dict[str, torch.Tensor] | None = None
        root = model if root is None else root
        self._handles = [
            root.get_submodule(path).register_forward_hook(self._keep(path))
            for path in dict.fromkeys(paths)
        ]

    def _keep(self, path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._outputs is not None:
                self._outputs[path] = output

        return hook

    def __call__(
        self, *inputs: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``model`` replaces the tapped model for this call: a compiled wrapper of it, say."""
        self._outputs = {}
        try:
            output = (self.model if model is None else model)(*inputs)
            return output, [self._outputs[path] for path in self.paths]
        finally:
            self._outputs = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def transformer_outputs(
    model: nn.Module, inputs: dict[str, torch.Tensor], names: list[str]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A ``transformers`` sequence classifier's logits ``[B, classes]`` and its outputs at
    ``names``: ``hidden_states.<i>`` ``[B, L, hidden]`` (0: the embeddings) and
    ``attentions.<i>`` ``[B, heads, L, L]`` (layer ``i``'s, which needs eager attention)."""
    wanted = [layer_index(name) for name in names]
    kinds = {kind for kind, _ in wanted}
    outputs = model(
        **inputs,
        output_hidden_states=HIDDEN_STATES in kinds,
        output_attentions=ATTENTIONS in kinds,
    )
    return outputs.logits, [getattr(outputs, kind)[index] for kind, index in wanted]


class TransformerTap:
    """Calls a ``transformer`` student (``TransformerClassifier``) and also returns its hidden
    states or attentions at ``names`` (``transformer_outputs``); its inputs are positional, in
    the signature's order. Nothing is hooked, so there is nothing to remove."""

    def __init__(self, student: nn.Module, names: list[str], input_names: list[str]) -> None:
        self.student, self.names, self.input_names = student, names, input_names

    def __call__(
        self, *inputs: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feed = dict(zip(self.input_names, inputs, strict=True))
        return transformer_outputs(self.student.get_submodule("model"), feed, self.names)

    def remove(self) -> None:
        pass
