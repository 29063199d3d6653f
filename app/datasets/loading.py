"""Dataset references -> in memory (arrays: float32 inputs, int64 labels; or text records), with
a test split, for the worker and for the API's preflight at submission."""

from pathlib import Path

from app.datasets.arrays import DatasetArrays
from app.datasets.builtins import BUILTIN_DATASETS
from app.datasets.npz import holdout_split, read_dataset_npz
from app.datasets.text import TextRecords, read_records
from app.errors import InvalidDataset
from app.ml.signature import AnyPreprocessing, RawTensors


def load_builtin(ref: str) -> DatasetArrays:
    """Load builtin dataset ``ref`` (a key of ``BUILTIN_DATASETS``).

    Raises:
        DatasetUnavailable: its files are not on this machine.
    """
    return BUILTIN_DATASETS[ref].load()


def load_uploaded(
    path: Path, classes: list[str] | None = None, preprocessing: AnyPreprocessing | None = None
) -> DatasetArrays | TextRecords:
    """Load an uploaded dataset as stored: ``.npz`` arrays, or text records (``.parquet``,
    ``read_records``); ``classes`` names the label values (default: "0", "1"...);
    ``preprocessing`` is the dataset signature's (an image archive's pixels), default raw.

    Raises:
        InvalidDataset: a label has no name in ``classes``.
    """
    if path.suffix == ".parquet":
        return read_records(path, classes)
    data = read_dataset_npz(path)
    made = preprocessing or RawTensors()
    if classes is None:
        classes = [str(i) for i in range(data.num_classes)]
    elif data.num_classes > len(classes):
        raise InvalidDataset(
            f"{len(classes)} class names for labels up to {data.num_classes - 1}.", field="classes"
        )
    if data.x_test is not None and data.y_test is not None:
        return DatasetArrays(data.x, data.y, data.x_test, data.y_test, classes, made)
    assert data.y is not None  # an unlabelled upload always brings its test split
    return DatasetArrays(*holdout_split(data.x, data.y), classes, made)
