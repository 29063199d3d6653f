"""A dataset in memory, as training sees it: float32 inputs, int64 labels, and a test split.

Builtin loaders (``app.datasets.builtins``) and the worker's upload loader both return it.
"""

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.ml.signature import AnyPreprocessing, ModelSignature, RawTensors
from app.ml.text import TokenizedInputs

# Elements per block when a check needs a temporary array (bounds its memory).
_BLOCK_ELEMENTS = 1 << 22


class InputStats(BaseModel):
    """What an upload's inputs look like: enough to tell raw pixels from scaled ones, say.
    Values are those training sees (float32); ``dtype`` is the one uploaded."""

    model_config = ConfigDict(frozen=True)

    dtype: str  # numpy dtype name of `x` as uploaded, before the float32 cast
    min: float  # over x and x_test
    max: float
    integer_valued: bool  # every value is a whole number
    constant_features: int  # per-sample positions of `x` equal in every sample


def _integer_valued(a: np.ndarray) -> bool:
    if a.dtype.kind in "iub":
        return True
    rows = max(1, _BLOCK_ELEMENTS // max(1, math.prod(a.shape[1:])))
    for start in range(0, len(a), rows):
        block = a[start : start + rows]
        if not np.array_equal(np.trunc(block), block):
            return False
    return True


def input_stats(
    x: np.ndarray, x_test: np.ndarray | None, *, dtype: str | None = None
) -> InputStats:
    """Stats of inputs ``x`` (and ``x_test``), shaped [samples, features...] and finite.

    ``dtype`` names the uploaded dtype when ``x`` is already cast (default: ``x.dtype``); an
    integer or bool dtype is whole-valued without a scan. Only reductions and bounded blocks:
    the arrays are never copied whole.
    """
    arrays = [a for a in (x, x_test) if a is not None and a.size]
    name = x.dtype.name if dtype is None else np.dtype(dtype).name
    return InputStats(
        dtype=name,
        min=min(float(a.min()) for a in arrays),
        max=max(float(a.max()) for a in arrays),
        integer_valued=np.dtype(name).kind in "iub" or all(_integer_valued(a) for a in arrays),
        constant_features=int(np.count_nonzero(x.min(axis=0) == x.max(axis=0))),
    )


@dataclass(frozen=True)
class DatasetArrays:
    """``y_train`` is None for an unlabelled transfer set (label-free distillation).
    ``preprocessing`` says how the inputs were made from raw records (builtin images: scaled;
    text: tokenised, the inputs then being ``TokenizedInputs``)."""

    x_train: np.ndarray | TokenizedInputs
    y_train: np.ndarray | None
    x_test: np.ndarray | TokenizedInputs
    y_test: np.ndarray
    classes: list[str]
    preprocessing: AnyPreprocessing = field(default_factory=RawTensors)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample shape of array inputs (text has none: records vary in length)."""
        assert isinstance(self.x_train, np.ndarray), "tokenised text has no fixed shape"
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
        arrays: list[np.ndarray | None] = []
        for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            arrays += [*(x.arrays.values() if isinstance(x, TokenizedInputs) else [x]), y]
        for array in arrays:
            if array is None:
                digest.update(b"unlabelled")
                continue
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()
