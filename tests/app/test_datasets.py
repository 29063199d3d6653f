"""Dataset uploads are checked fully before they are kept."""

import io
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import config
from tests.helpers.api import npz_bytes


def post_npz(client: TestClient, data: bytes) -> dict[str, object]:
    response = client.post("/v1/datasets", files={"file": ("data.npz", data)})
    body: dict[str, object] = {"status": response.status_code, **response.json()}
    return body


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
