"""A dataset in memory, as training sees it: float32 inputs, int64 labels, and a test split.

Builtin loaders (``app.datasets.builtins``) and the worker's upload loader both return it.
"""

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DatasetArrays:
    """``y_train`` is None for an unlabelled transfer set (label-free distillation)."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def digest(self) -> str:
        """sha256 of the arrays as training sees them, whatever file they came from."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            if array is None:
                digest.update(b"unlabelled")
                continue
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()
