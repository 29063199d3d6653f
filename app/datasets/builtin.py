"""The builtin datasets: what they are (for validation at submission), where their files live, and
how to download the ones that can be."""

import hashlib
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from app.config import get_settings

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the upstream .gz files, as published by the Fashion-MNIST authors.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class BuiltinDataset:
    ref: str
    description: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    train_size: int
    test_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.ref: d
    for d in (
        BuiltinDataset(
            ref="builtin:fashion-mnist",
            description="Fashion-MNIST (Xiao et al. 2017): 28x28 grey clothing images, 10 classes.",
            input_shape=(1, 28, 28),
            classes=(
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
            ),
            train_size=60_000,
            test_size=10_000,
        ),
        BuiltinDataset(
            ref="builtin:digits",
            description="scikit-learn's 8x8 handwritten digits (UCI), split 80/20 with seed 0.",
            input_shape=(1, 8, 8),
            classes=tuple(str(i) for i in range(10)),
            train_size=1438,
            test_size=359,
        ),
    )
}


def fashion_mnist_candidate_dirs() -> list[Path]:
    """Where Fashion-MNIST's IDX files are looked for, in order."""
    data_dir = get_settings().resolved_data_dir
    return [data_dir / "fashion-mnist", data_dir, DEBIAN_FASHION_MNIST_DIR]


def find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dir() -> Path | None:
    """The first directory holding all four Fashion-MNIST files, or None."""
    for directory in fashion_mnist_candidate_dirs():
        if all(find_idx_file(directory, stem) for stem in FASHION_MNIST_FILES.values()):
            return directory
    return None


def is_available(ref: str) -> bool:
    return ref != "builtin:fashion-mnist" or fashion_mnist_dir() is not None


def download_fashion_mnist(target: Path, base_url: str = FASHION_MNIST_URL) -> Path:
    """Download the four Fashion-MNIST files into ``target``, verifying each md5."""
    target.mkdir(parents=True, exist_ok=True)
    for name, expected in FASHION_MNIST_MD5.items():
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
