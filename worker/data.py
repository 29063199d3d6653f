"""Dataset references -> in-memory arrays (float32 inputs, int64 labels, with a test split)."""

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.datasets.builtin import (
    BUILTIN_DATASETS,
    FASHION_MNIST_FILES,
    fashion_mnist_candidate_dirs,
    fashion_mnist_dir,
    find_idx_file,
)
from app.datasets.npz import holdout_split, read_dataset_npz
from app.errors import DatasetUnavailable


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


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist() -> DatasetArrays:
    directory = fashion_mnist_dir()
    if directory is None:
        searched = ", ".join(str(d) for d in fashion_mnist_candidate_dirs())
        raise DatasetUnavailable(
            "Fashion-MNIST is not on this machine (looked in "
            f"{searched}). Install it with `apt-get install dataset-fashion-mnist`, or download "
            "it with `distill download fashion-mnist` (into DISTILL_DATA_DIR)."
        )
    arrays = {
        key: read_idx(find_idx_file(directory, stem))  # type: ignore[arg-type]
        for key, stem in FASHION_MNIST_FILES.items()
    }

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0)[:, None, :, :]

    return DatasetArrays(
        x_train=images(arrays["train_images"]),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=images(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int64),
        classes=list(BUILTIN_DATASETS["builtin:fashion-mnist"].classes),
    )


def load_digits() -> DatasetArrays:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    x_train, y_train, x_test, y_test = holdout_split(x, bunch.target.astype(np.int64))
    return DatasetArrays(
        x_train, y_train, x_test, y_test, list(BUILTIN_DATASETS["builtin:digits"].classes)
    )


BUILTIN_LOADERS = {"builtin:fashion-mnist": load_fashion_mnist, "builtin:digits": load_digits}


def load_builtin(ref: str) -> DatasetArrays:
    return BUILTIN_LOADERS[ref]()


def load_uploaded(path: Path) -> DatasetArrays:
    data = read_dataset_npz(path)
    classes = [str(i) for i in range(data.num_classes)]
    if data.x_test is not None and data.y_test is not None:
        return DatasetArrays(data.x, data.y, data.x_test, data.y_test, classes)
    assert data.y is not None  # an unlabelled upload always brings its test split
    return DatasetArrays(*holdout_split(data.x, data.y), classes)
