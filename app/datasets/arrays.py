"""A dataset in memory, as training sees it: float32 inputs, int64 labels, and a test split.

Builtin loaders (``app.datasets.builtins``) and the worker's upload loader both return it.
"""

import hashlib
from dataclasses import dataclass, field

import numpy as np

from app.ml.signature import AnyPreprocessing, ModelSignature, RawTensors


@dataclass(frozen=True)
class DatasetArrays:
    """``y_train`` is None for an unlabelled transfer set (label-free distillation).
    ``preprocessing`` says how the inputs were made from raw records (builtin images: scaled)."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    preprocessing: AnyPreprocessing = field(default_factory=RawTensors)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def signature(self) -> ModelSignature:
        """The records as a model must take them: one FP32 tensor, one score per class."""
        return ModelSignature.for_tensor(
            self.input_shape,
            len(self.classes),
            classes=self.classes,
            preprocessing=self.preprocessing,
        )

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
