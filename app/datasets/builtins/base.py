"""The type of a builtin dataset: its metadata (for validation at submission) and its loader."""

from collections.abc import Callable
from dataclasses import dataclass

from app.datasets.arrays import DatasetArrays
from app.ml.signature import ImagePreprocessing, ModelSignature


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset Distill knows by name (``ref``, ``builtin:<name>``).

    ``load`` reads it into memory (numpy only, no torch) and raises ``DatasetUnavailable`` when
    its files are missing; ``available`` says, cheaply, whether they are on this machine, and
    ``install_hint`` how to put them there.
    """

    ref: str
    description: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    train_size: int
    test_size: int
    preprocessing: ImagePreprocessing
    load: Callable[[], DatasetArrays]
    available: Callable[[], bool]
    install_hint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def signature(self) -> ModelSignature:
        """One float32 image tensor in, one logit per class out."""
        return ModelSignature.for_tensor(
            self.input_shape,
            self.num_classes,
            classes=list(self.classes),
            preprocessing=self.preprocessing,
        )
