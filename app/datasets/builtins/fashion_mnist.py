"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747): 70,000 28x28 grey images of Zalando
clothing in 10 classes, 60,000 for training and 10,000 for test.

Its four IDX files (https://github.com/zalandoresearch/fashion-mnist) are looked for in
``DISTILL_DATA_DIR`` and where Debian's ``dataset-fashion-mnist`` package installs them; they can
be downloaded, md5-checked, with ``distill download fashion-mnist`` (``download``).
"""

import gzip
import hashlib
import shutil
import urllib.request
from pathlib import Path

import numpy as np

from app.config import get_settings
from app.datasets.arrays import DatasetArrays
from app.datasets.builtins.base import BuiltinDataset
from app.errors import DatasetUnavailable
from app.ml.signature import ImagePreprocessing

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the upstream .gz files, as published by the Fashion-MNIST authors.
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MAX_PIXEL = 255.0  # pixels are bytes; images are scaled to [0, 1]
PREPROCESSING = ImagePreprocessing(scale=1.0 / MAX_PIXEL, channel_order="L")


def candidate_dirs() -> list[Path]:
    """Where the IDX files are looked for, in order."""
    data_dir = get_settings().resolved_data_dir
    return [data_dir / "fashion-mnist", data_dir, DEBIAN_DIR]


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_files() -> dict[str, Path] | None:
    """The four IDX files (by ``FILES`` key) from the first directory holding all, or None."""
    for directory in candidate_dirs():
        found = {key: _find_idx_file(directory, stem) for key, stem in FILES.items()}
        if all(path is not None for path in found.values()):
            return {key: path for key, path in found.items() if path is not None}
    return None


def available() -> bool:
    return _idx_files() is not None


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


def load() -> DatasetArrays:
    """Images as float32 ``[N, 1, 28, 28]`` in [0, 1], the published train/test split.

    Raises:
        DatasetUnavailable: the files are on none of ``candidate_dirs()``.
    """
    files = _idx_files()
    if files is None:
        searched = ", ".join(str(d) for d in candidate_dirs())
        raise DatasetUnavailable(
            "Fashion-MNIST is not on this machine (looked in "
            f"{searched}). Install it with `apt-get install dataset-fashion-mnist`, or download "
            "it with `distill download fashion-mnist` (into DISTILL_DATA_DIR)."
        )
    arrays = {key: read_idx(path) for key, path in files.items()}

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / MAX_PIXEL)[:, None, :, :]

    return DatasetArrays(
        x_train=images(arrays["train_images"]),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=images(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int64),
        classes=list(CLASSES),
        preprocessing=PREPROCESSING,
    )


def download(target: Path, base_url: str = URL) -> Path:
    """Download the four files into ``target``, verifying each md5 (kept files that match are
    not fetched again).

    Raises:
        ValueError: a downloaded file's md5 is not the published one (the file is removed).
    """
    target.mkdir(parents=True, exist_ok=True)
    for name, expected in MD5.items():
        destination = target / name
        if destination.exists() and _md5(destination) == expected:
            continue
        partial = destination.with_suffix(".part")
        with (
            urllib.request.urlopen(base_url + name, timeout=60) as response,
            open(partial, "wb") as out,
        ):
            shutil.copyfileobj(response, out)
        actual = _md5(partial)
        if actual != expected:
            partial.unlink()
            raise ValueError(f"{name}: md5 {actual} does not match the published {expected}")
        partial.rename(destination)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


DATASET = BuiltinDataset(
    ref="builtin:fashion-mnist",
    description="Fashion-MNIST (Xiao et al. 2017): 28x28 grey clothing images, 10 classes.",
    input_shape=(1, 28, 28),
    classes=CLASSES,
    train_size=60_000,
    test_size=10_000,
    preprocessing=PREPROCESSING,
    load=load,
    available=available,
    install_hint="`apt-get install dataset-fashion-mnist`, or `distill download fashion-mnist`",
)
