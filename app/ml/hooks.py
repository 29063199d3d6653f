"""Outputs of named submodules, taken with forward hooks while a model runs."""

from typing import Any

import torch
from torch import nn


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
        self, x: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``model`` replaces the tapped model for this call: a compiled wrapper of it, say."""
        self._outputs = {}
        try:
            output = (self.model if model is None else model)(x)
            return output, [self._outputs[path] for path in self.paths]
        finally:
            self._outputs = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
