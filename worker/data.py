"""Dataset references -> in-memory arrays (float32 inputs, int64 labels, with a test split)."""

from pathlib import Path

from app.datasets.arrays import DatasetArrays
from app.datasets.builtins import BUILTIN_DATASETS
from app.datasets.npz import holdout_split, read_dataset_npz


def load_builtin(ref: str) -> DatasetArrays:
    """Load builtin dataset ``ref`` (a key of ``BUILTIN_DATASETS``).

    Raises:
        DatasetUnavailable: its files are not on this machine.
    """
    return BUILTIN_DATASETS[ref].load()


def load_uploaded(path: Path) -> DatasetArrays:
    data = read_dataset_npz(path)
    classes = [str(i) for i in range(data.num_classes)]
    if data.x_test is not None and data.y_test is not None:
        return DatasetArrays(data.x, data.y, data.x_test, data.y_test, classes)
    assert data.y is not None  # an unlabelled upload always brings its test split
    return DatasetArrays(*holdout_split(data.x, data.y), classes)
