"""Dataset uploads are checked fully before they are kept."""

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import config
from app.datasets import arrays
from app.datasets.arrays import input_stats
from app.datasets.loading import load_uploaded
from app.errors import InvalidDataset
from tests.helpers.api import npz_bytes


def post_npz(client: TestClient, data: bytes, **form: str) -> dict[str, Any]:
    response = client.post("/v1/datasets", files={"file": ("data.npz", data)}, data=form)
    body: dict[str, Any] = {"status": response.status_code, **response.json()}
    return body


def uploaded(client: TestClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get("/v1/datasets").json()["items"]
    return [d for d in items if d["kind"] == "uploaded"]


def test_builtin_datasets_are_listed(client: TestClient) -> None:
    items = {d["ref"]: d for d in client.get("/v1/datasets").json()["items"]}
    digits = items["builtin:digits"]
    assert digits["available"] is True
    assert digits["input_shape"] == [1, 8, 8]
    assert (digits["train_size"], digits["test_size"]) == (1438, 359)
    assert "builtin:fashion-mnist" in items
    assert client.get("/v1/datasets/builtin:digits").json() == digits
    assert digits["signature"]["preprocessing"] == {
        "kind": "image",
        "scale": 1 / 16,
        "mean": None,
        "std": None,
        "channel_order": "L",
    }
    assert digits["signature"]["outputs"][0]["classes"] == [str(i) for i in range(10)]
    assert digits["input_stats"] is None
    missing = client.get("/v1/datasets/builtin:imagenet")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")


def test_valid_upload_with_and_without_test_split(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((50, 3, 4, 4), dtype=np.float32), rng.integers(0, 5, 50)
    body = post_npz(client, npz_bytes(x=x, y=y))
    assert body["status"] == 201
    assert body["input_shape"] == [3, 4, 4]
    assert body["num_classes"] == int(y.max()) + 1
    assert (body["train_size"], body["test_size"]) == (40, 10)

    body = post_npz(client, npz_bytes(x=x, y=y, x_test=x[:7], y_test=y[:7]))
    assert (body["train_size"], body["test_size"]) == (50, 7)
    listed = [
        d["ref"] for d in client.get("/v1/datasets").json()["items"] if d["kind"] == "uploaded"
    ]
    assert len(listed) == 2


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"x": np.array([[np.nan, 1.0], [0.0, 1.0]]), "y": np.array([0, 1])}, "NaN"),
        ({"x": np.array([[np.inf, 1.0], [0.0, 1.0]]), "y": np.array([0, 1])}, "infinite"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "labels must lie"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1.0, 1.0])}, "integer"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "2 labels for 3 samples"),
        ({"x": np.zeros(3), "y": np.array([0, 1, 1])}, "shaped [samples"),
        ({"x": np.zeros((3, 0)), "y": np.array([0, 1, 1])}, "non-empty feature dimensions"),
        ({"x": np.zeros((3,) + (1,) * 17), "y": np.array([0, 1, 1])}, "1 to 16"),
        ({"y": np.array([0, 1])}, "no `x`"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1, 1]), "x_test": np.zeros((2, 2))}, "both"),
        (
            {
                "x": np.zeros((3, 2)),
                "y": np.array([0, 1, 1]),
                "x_test": np.zeros((2, 3)),
                "y_test": np.array([0, 1]),
            },
            "`x_test` samples",
        ),
        (
            {"x": np.zeros((3, 2)), "y": np.array([0, 1, 1]), "extra": np.zeros(1)},
            "only the arrays",
        ),
    ],
)
def test_bad_datasets_are_refused(
    client: TestClient, arrays: dict[str, np.ndarray], words: str
) -> None:
    body = post_npz(client, npz_bytes(**arrays))
    assert body["status"] == 422, body
    assert body["code"] == "invalid_dataset"
    assert words in str(body["detail"])
    assert [d for d in client.get("/v1/datasets").json()["items"] if d["kind"] == "uploaded"] == []


def test_unlabelled_transfer_set(client: TestClient) -> None:
    x = np.random.default_rng(0).random((30, 4), dtype=np.float32)
    body = post_npz(client, npz_bytes(x=x, x_test=x[:5], y_test=np.array([0, 1, 2, 1, 0])))
    assert body["status"] == 201
    assert body["labelled"] is False
    assert (body["train_size"], body["test_size"], body["num_classes"]) == (30, 5, 3)
    refused = post_npz(client, npz_bytes(x=x))
    assert refused["status"] == 422 and refused["field"] == "y"


def test_object_arrays_are_not_unpickled(client: TestClient) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    body = post_npz(client, buffer.getvalue())
    assert body["status"] == 422
    assert "pickle" in str(body["detail"])


def test_zip_bomb_is_refused_before_decompression(client: TestClient) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy(np.zeros((8 * 1024 * 1024, 1))))  # 64 MiB of zeros
        archive.writestr("y.npy", npy(np.zeros(8 * 1024 * 1024, dtype=np.int64)))
    data = buffer.getvalue()
    assert len(data) < 1024 * 1024
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_MAX_DATASET_BYTES", str(4 * 1024 * 1024))
        config.get_settings.cache_clear()
        body = post_npz(client, data)
    config.get_settings.cache_clear()
    assert body["status"] == 422
    assert "decompress" in str(body["detail"])


def test_not_a_zip(client: TestClient) -> None:
    body = post_npz(client, b"hello, not an archive")
    assert body["status"] == 422


def test_oversized_upload_is_413(client: TestClient) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_MAX_DATASET_BYTES", "1000")
        config.get_settings.cache_clear()
        body = post_npz(client, npz_bytes(x=np.zeros((100, 10)), y=np.zeros(100, dtype=np.int64)))
    config.get_settings.cache_clear()
    assert body["status"] == 413
    assert body["code"] == "payload_too_large"
    assert [d for d in client.get("/v1/datasets").json()["items"] if d["kind"] == "uploaded"] == []


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        zip_of({"x": npy(np.zeros((3, 2))), "y.npy": npy(np.array([0, 1, 1]))}),  # no .npy suffix
        # A header that claims 10^12 float64 values: refused before numpy allocates.
        zip_of(
            {
                "x.npy": npy(np.zeros((3, 2))).replace(b"(3, 2)", b"(1000000000000, 1)"),
                "y.npy": npy(np.array([0, 1, 1])),
            }
        ),
        # Corrupt deflate stream.
        zip_of(
            {"x.npy": npy(np.zeros((3, 2))), "y.npy": npy(np.array([0, 1, 1]))},
            zipfile.ZIP_DEFLATED,
        ).replace(b"\x00\x00\x00\x00\x00", b"\xff\xff\xff\xff\xff", 1),
        npz_bytes(x=np.zeros((2, 2)), y=np.array([0, 1])),  # too few samples
        npz_bytes(
            x=np.zeros((3, 2)),
            y=np.array([0, 1, 1]),
            x_test=np.zeros((0, 2)),
            y_test=np.zeros(0, dtype=np.int64),
        ),  # empty test split
    ],
)
def test_malformed_archives_are_422_not_500(client: TestClient, data: bytes) -> None:
    body = post_npz(client, data)
    assert body["status"] == 422, body
    assert body["code"] == "invalid_dataset"


def test_input_stats_of_a_uint8_upload(client: TestClient) -> None:
    x = (np.arange(20 * 6).reshape(20, 6) * 13 % 256).astype(np.uint8)
    x[0, 1], x[1, 1] = 0, 255
    x[:, 0] = 7  # one position that never varies
    body = post_npz(client, npz_bytes(x=x, y=np.arange(20) % 4))
    assert body["status"] == 201, body
    stats = {
        "dtype": "uint8",
        "min": 0.0,
        "max": 255.0,
        "integer_valued": True,
        "constant_features": 1,
    }
    assert body["input_stats"] == stats
    assert client.get(f"/v1/datasets/{body['ref']}").json()["input_stats"] == stats


def test_input_stats_of_a_float_upload(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    x, x_test = rng.random((30, 2, 3)), rng.random((6, 2, 3)) * 3 - 1
    body = post_npz(
        client, npz_bytes(x=x, y=np.arange(30) % 3, x_test=x_test, y_test=np.arange(6) % 3)
    )
    assert body["status"] == 201, body
    stats = body["input_stats"]
    assert (stats["dtype"], stats["integer_valued"], stats["constant_features"]) == (
        "float64",
        False,
        0,
    )
    low, high = float(np.float32(x_test.min())), float(np.float32(x_test.max()))
    assert (stats["min"], stats["max"]) == (pytest.approx(low), pytest.approx(high))

    whole = np.arange(30 * 4, dtype=np.float32).reshape(30, 4) - 10
    body = post_npz(client, npz_bytes(x=whole, y=np.arange(30) % 3))
    assert body["input_stats"] == {
        "dtype": "float32",
        "min": -10.0,
        "max": 109.0,
        "integer_valued": True,
        "constant_features": 0,
    }


def test_whole_values_are_checked_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrays, "_BLOCK_ELEMENTS", 8)
    x = np.ones((50, 4), dtype=np.float32)
    assert input_stats(x, None).integer_valued is True
    assert input_stats(x, None).constant_features == 4
    x_test = np.ones((9, 4), dtype=np.float32)
    x_test[-1, -1] = 0.5  # in the last block only
    assert input_stats(x, x_test).integer_valued is False
    # An integer upload is whole by its dtype: no scan.
    assert input_stats(x, x_test, dtype="int16").integer_valued is True


def test_labels_must_start_at_zero(client: TestClient) -> None:
    x = np.random.default_rng(0).random((30, 4), dtype=np.float32)
    body = post_npz(client, npz_bytes(x=x, y=np.arange(30) % 10 + 1))
    assert body["status"] == 422, body
    assert (body["code"], body["field"]) == ("labels_not_zero_based", "y")
    assert "from 1 to 10" in body["detail"] and "counted as 11" in body["detail"]
    assert "`classes`" in body["detail"]
    assert uploaded(client) == []


def test_class_names_on_upload(client: TestClient) -> None:
    x = np.random.default_rng(0).random((30, 4), dtype=np.float32)
    y = np.arange(30) % 10 + 1  # label 0 is a class with no samples here
    names = ["background"] + [f"digit {i}" for i in range(1, 11)]
    body = post_npz(client, npz_bytes(x=x, y=y), classes=json.dumps(names))
    assert body["status"] == 201, body
    assert body["num_classes"] == 11
    assert body["signature"]["outputs"][0]["classes"] == names
    assert client.get(f"/v1/datasets/{body['ref']}").json()["signature"] == body["signature"]

    unnamed = post_npz(client, npz_bytes(x=x, y=y - 1))
    assert (unnamed["num_classes"], unnamed["signature"]["outputs"][0]["classes"]) == (10, None)


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        ("cat, dog", "JSON"),
        ('{"0": "cat"}', "JSON list"),
        ("[]", "at least 1"),
        ('["cat", ""]', "[1]"),
        ('["cat", 1]', "[1]"),
        ('["cat", "dog", "cat"]', "'cat' more than once"),
        (json.dumps([str(i) for i in range(10)]), "up to 10"),  # label 10 has no name
    ],
)
def test_bad_class_names_are_refused(client: TestClient, classes: str, words: str) -> None:
    x = np.random.default_rng(0).random((30, 4), dtype=np.float32)
    body = post_npz(client, npz_bytes(x=x, y=np.arange(30) % 10 + 1), classes=classes)
    assert body["status"] == 422, body
    assert (body["code"], body["field"]) == ("invalid_dataset", "classes")
    assert words in body["detail"]
    assert uploaded(client) == []


def test_load_uploaded_names_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    x = np.random.default_rng(0).random((20, 3))
    path.write_bytes(npz_bytes(x=x, y=np.arange(20) % 3 + 1))
    names = ["none", "a", "b", "c", "unused"]
    data = load_uploaded(path, names)
    assert data.classes == names
    assert data.signature.class_names == names and data.signature.num_classes == 5
    assert load_uploaded(path).classes == ["0", "1", "2", "3"]
    with pytest.raises(InvalidDataset, match="3 class names"):
        load_uploaded(path, names[:3])
