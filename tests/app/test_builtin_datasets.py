"""The builtin dataset registry: every entry's metadata and signature agree with its loader."""

import gzip
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app import config
from app.datasets.arrays import DatasetArrays
from app.datasets.builtins import BUILTIN_DATASETS, BuiltinDataset, fashion_mnist, is_available
from app.datasets.service import resolve_dataset
from app.errors import DatasetUnavailable
from app.models import DEFAULT_TENANT_ID

DATASETS = list(BUILTIN_DATASETS.values())


@pytest.fixture(scope="module", params=DATASETS, ids=[d.ref for d in DATASETS])
def loaded(request: pytest.FixtureRequest) -> tuple[BuiltinDataset, DatasetArrays]:
    """Each available builtin with its arrays, loaded once for the module."""
    dataset: BuiltinDataset = request.param
    if not is_available(dataset.ref):
        pytest.skip(f"{dataset.ref} is not on this machine")
    return dataset, dataset.load()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty DISTILL_DATA_DIR, and no Debian Fashion-MNIST."""
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    config.get_settings.cache_clear()
    yield tmp_path / "data"
    config.get_settings.cache_clear()


@pytest.mark.parametrize("dataset", DATASETS, ids=[d.ref for d in DATASETS])
def test_registry_entry(dataset: BuiltinDataset) -> None:
    assert dataset.ref.startswith("builtin:")
    assert BUILTIN_DATASETS[dataset.ref] is dataset
    assert dataset.num_classes == len(set(dataset.classes)) >= 2
    assert dataset.train_size > 0 and dataset.test_size > 0


@pytest.mark.parametrize("dataset", DATASETS, ids=[d.ref for d in DATASETS])
def test_signature_matches_metadata(dataset: BuiltinDataset) -> None:
    signature = dataset.signature
    assert signature.input_shape == dataset.input_shape
    assert signature.num_classes == dataset.num_classes
    assert signature.class_names == list(dataset.classes)
    assert signature.preprocessing == dataset.preprocessing


def test_digits_is_always_available() -> None:
    assert is_available("builtin:digits")


def test_metadata_and_signature_match_loaded_arrays(
    loaded: tuple[BuiltinDataset, DatasetArrays],
) -> None:
    dataset, data = loaded
    assert data.input_shape == dataset.input_shape == dataset.signature.input_shape
    assert data.classes == list(dataset.classes) == dataset.signature.class_names
    assert len(data.classes) == dataset.signature.num_classes
    assert (len(data.x_train), len(data.x_test)) == (dataset.train_size, dataset.test_size)
    assert data.y_train is not None and len(data.y_train) == dataset.train_size
    assert len(data.y_test) == dataset.test_size
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    labels = np.concatenate([data.y_train, data.y_test])
    assert set(np.unique(labels)) == set(range(dataset.num_classes))


def test_preprocessing_scale_is_the_loaders(loaded: tuple[BuiltinDataset, DatasetArrays]) -> None:
    """Inputs are raw integer pixels times ``preprocessing.scale``, in [0, 1]."""
    dataset, data = loaded
    assert dataset.preprocessing.channel_order == "L" and dataset.input_shape[0] == 1
    for x in (data.x_train, data.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
        raw = x / dataset.preprocessing.scale
        np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)


def test_loading_is_deterministic(loaded: tuple[BuiltinDataset, DatasetArrays]) -> None:
    dataset, data = loaded
    assert dataset.load().digest() == data.digest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim])
    return header + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()


def test_fashion_mnist_is_found_in_the_data_dir(data_dir: Path) -> None:
    assert not is_available("builtin:fashion-mnist")
    with pytest.raises(DatasetUnavailable, match="distill download fashion-mnist"):
        fashion_mnist.load()

    rng = np.random.default_rng(0)
    directory = data_dir / "fashion-mnist"
    directory.mkdir(parents=True)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(6, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(4, dtype=np.uint8),
    }
    for i, (key, array) in enumerate(arrays.items()):
        stem = fashion_mnist.FILES[key]
        if i % 2:  # the files may be gzipped or not
            (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (directory / stem).write_bytes(idx_bytes(array))

    assert is_available("builtin:fashion-mnist")
    data = fashion_mnist.load()
    assert data.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(np.rint(data.x_train[:, 0] * 255), arrays["train_images"])
    np.testing.assert_array_equal(data.y_test, arrays["test_labels"])


def test_read_idx_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "floats"
    path.write_bytes(b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + bytes(8))
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        fashion_mnist.read_idx(path)


def test_download_refuses_a_file_whose_md5_differs(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in fashion_mnist.MD5:
        (mirror / name).write_bytes(b"not the published file")
    target = tmp_path / "target"
    with pytest.raises(ValueError, match="does not match the published"):
        fashion_mnist.download(target, base_url=mirror.as_uri() + "/")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("dataset", DATASETS, ids=[d.ref for d in DATASETS])
def test_a_missing_builtin_is_a_422_saying_how_to_install_it(
    dataset: BuiltinDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(BUILTIN_DATASETS, dataset.ref, replace(dataset, available=lambda: False))
    with pytest.raises(DatasetUnavailable) as raised:
        # Builtins need no session and belong to no tenant.
        resolve_dataset(None, DEFAULT_TENANT_ID, dataset.ref)  # type: ignore[arg-type]
    assert raised.value.status == 422 and raised.value.extra["field"] == "dataset"
    assert dataset.install_hint in raised.value.detail
    assert dataset.signature.inputs[0].shape == list(dataset.input_shape)
