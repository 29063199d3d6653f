"""Image-folder archives (zip, tar, tar.gz) become image datasets: decoded with Pillow into uint8
``[N, 3, H, W]`` arrays, stored as an ``.npz`` upload is, and trained on; every refusal is a 422
with its own code, naming the file inside the archive, and keeps nothing."""

import io
import json
import struct
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import config
from app.config import get_settings
from app.datasets.images import MAX_IMAGE_PIXELS, parse_image_size
from app.errors import InvalidDataset
from app.storage import get_store, keys
from tests.helpers.api import npz_bytes
from tests.helpers.onnx_teachers import fit_mlp, write_onnx_teacher
from worker.pipeline import run_job

ArchiveKind = Literal["zip", "tar", "tgz"]
ARCHIVE_NAMES: dict[ArchiveKind, str] = {"zip": "i.zip", "tar": "i.tar", "tgz": "i.tar.gz"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 210)}
FORMATS = ("PNG", "JPEG", "WEBP")
SUFFIXES = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (12, 12), seed: int = 0) -> Any:
    """A coloured square with noise and a light stripe every 4th row: uint8 ``[H, W, 3]`` for
    ``size`` (width, height)."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = np.array(colour, dtype=np.int64) + rng.integers(-20, 21, (height, width, 3))
    pixels[::4] += 30
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode(pixels: Any, image_format: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
    options = {"lossless": True} if image_format == "WEBP" else {}
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def class_folders(
    per_class: int = 5, prefix: str = "", size: tuple[int, int] = (12, 12)
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Archive members ``<prefix><class>/<i>.<ext>`` (PNG, JPEG and WebP in turn), and the
    pixels of each member."""
    files: dict[str, bytes] = {}
    pixels: dict[str, Any] = {}
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            image_format = FORMATS[i % len(FORMATS)]
            member = f"{prefix}{name}/{i}.{SUFFIXES[image_format]}"
            pixels[member] = picture(colour, size, seed=10 * c + i)
            files[member] = encode(pixels[member], image_format)
    return files, pixels


def archive(files: dict[str, bytes], kind: ArchiveKind = "zip") -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(zipfile.ZipInfo(name), data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tgz" else "w") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def post(
    client: TestClient, data: bytes, filename: str = "images.zip", **form: str
) -> dict[str, Any]:
    response = client.post("/v1/datasets", files={"file": (filename, data)}, data=form)
    body: dict[str, Any] = {"status": response.status_code, **response.json()}
    return body


def stored(body: dict[str, Any]) -> dict[str, Any]:
    """The stored ``.npz``'s arrays, as uploaded (uint8 images)."""
    with np.load(get_store().path(keys.dataset(body["ref"])), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def classes_of(body: dict[str, Any]) -> list[str]:
    names: list[str] = body["signature"]["outputs"][0]["classes"]
    return names


def kept() -> set[Path]:
    """Every file under the store's datasets and staging folders, and the image extractions."""
    root = get_settings().resolved_storage_dir
    stored_files = {p for folder in ("datasets", "staging") for p in (root / folder).rglob("*")}
    return stored_files | set(Path(tempfile.gettempdir()).glob("distill-images-*"))


@pytest.fixture
def nothing_kept(client: TestClient) -> Iterator[None]:
    """The test's uploads are all refused: no row, no file kept, staged or left unpacked."""
    before = kept()
    yield
    items = client.get("/v1/datasets").json()["items"]
    assert [d for d in items if d["kind"] == "uploaded"] == []
    assert kept() == before


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 1-bit PNG whose header (IHDR, checksum fixed) declares ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8), mode="1"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# Archives that are read.


@pytest.mark.parametrize("kind", ["zip", "tar", "tgz"])
def test_class_folders_become_the_classes(client: TestClient, kind: ArchiveKind) -> None:
    files, pixels = class_folders(prefix="shapes/")
    clutter = {
        "__MACOSX/shapes/red/._0.png": b"\x00\x05\x16\x07 resource fork",
        "shapes/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "shapes/green/Thumbs.db": b"not an image",
        "shapes/blue/.hidden.txt": b"dotfile",
    }
    body = post(client, archive(files | clutter, kind), ARCHIVE_NAMES[kind])
    assert body["status"] == 201, body
    assert classes_of(body) == ["blue", "green", "red"]
    assert (body["num_classes"], body["input_shape"]) == (3, [3, 12, 12])
    assert body["signature"]["inputs"][0]["shape"][-3:] == [3, 12, 12]
    assert (body["train_size"], body["test_size"], body["has_test_split"]) == (12, 3, False)
    assert body["input_stats"]["dtype"] == "uint8" and body["input_stats"]["integer_valued"]
    arrays = stored(body)
    assert set(arrays) == {"x", "y"}
    assert (arrays["x"].dtype, arrays["x"].shape) == (np.uint8, (15, 3, 12, 12))
    assert (arrays["y"].dtype, np.bincount(arrays["y"]).tolist()) == (np.int64, [5, 5, 5])
    # Members in sorted order; PNG and lossless WebP come back exactly, JPEG close.
    members = sorted(pixels)
    for i, member in enumerate(members):
        expected = pixels[member].transpose(2, 0, 1)
        assert arrays["y"][i] == classes_of(body).index(member.split("/")[1])
        if member.endswith(".jpg"):
            assert np.abs(arrays["x"][i].astype(int) - expected).mean() < 12
        else:
            assert np.array_equal(arrays["x"][i], expected), member


def test_train_and_test_folders_give_the_test_split(client: TestClient) -> None:
    train, _ = class_folders(per_class=4, prefix="data/train/")
    test, _ = class_folders(per_class=2, prefix="data/test/")
    del test["data/test/green/0.png"]
    body = post(client, archive(train | test), "split.tgz")
    assert body["status"] == 201, body
    assert body["has_test_split"] is True
    assert (body["train_size"], body["test_size"]) == (12, 5)
    arrays = stored(body)
    assert arrays["x_test"].shape == (5, 3, 12, 12)
    assert np.bincount(arrays["y_test"]).tolist() == [2, 1, 2]


def test_a_labels_csv_names_the_classes(client: TestClient) -> None:
    files: dict[str, bytes] = {}
    rows = ["file,label"]
    for i in range(9):
        name = ["cat", "dog", "bird"][i % 3]
        files[f"pets/img/{i:02d}.png"] = encode(picture(COLOURS["red"], seed=i))
        rows.append(f"img/{i:02d}.png,{name}")
    files["pets/labels.csv"] = ("\n".join(rows) + "\n").encode()
    body = post(client, archive(files))
    assert body["status"] == 201, body
    assert classes_of(body) == ["bird", "cat", "dog"]
    assert stored(body)["y"].tolist() == [1, 2, 0] * 3
    # `classes` gives the order instead (and may name more).
    body = post(client, archive(files), classes=json.dumps(["dog", "cat", "bird", "fish"]))
    assert body["status"] == 201, body
    assert classes_of(body) == ["dog", "cat", "bird", "fish"]
    assert stored(body)["y"].tolist() == [1, 0, 2] * 3


def test_image_size_resizes_every_image(client: TestClient) -> None:
    small, _ = class_folders(per_class=2, size=(12, 12))
    large, _ = class_folders(per_class=2, prefix="x/", size=(20, 16))
    files = small | {k.removeprefix("x/").replace("/", "/big-"): v for k, v in large.items()}
    body = post(client, archive(files), image_size="10x8")
    assert body["status"] == 201, body
    assert body["input_shape"] == [3, 8, 10]
    assert stored(body)["x"].shape == (12, 3, 8, 10)
    body = post(client, archive(files), image_size="16")
    assert (body["status"], body["input_shape"]) == (201, [3, 16, 16])
    assert stored(body)["x"].shape == (12, 3, 16, 16)


def test_grey_and_transparent_images_become_rgb(client: TestClient) -> None:
    grey = np.full((12, 12), 100, np.uint8)
    clear = np.zeros((12, 12, 4), np.uint8)  # black, fully transparent: white once composited
    half = np.zeros((12, 12, 4), np.uint8)
    half[..., 3] = 128  # black at half opacity over white
    files = {
        "a/grey.png": encode(grey),  # mode L
        "a/grey.jpg": encode(grey, "JPEG"),
        "b/clear.png": encode(clear),  # mode RGBA
        "b/clear.webp": encode(clear, "WEBP"),
        "c/half.png": encode(half),
        "c/palette.png": encode(picture(COLOURS["blue"]), mode="P"),
    }
    body = post(client, archive(files))
    assert body["status"] == 201, body
    x = stored(body)["x"]
    assert (x[0] == 100).all() and (np.abs(x[1].astype(int) - 100) <= 2).all()
    assert (x[2] == 255).all() and (x[3] == 255).all()
    assert (np.abs(x[4].astype(int) - 127) <= 1).all()
    assert x[5].shape == (3, 12, 12)


def test_parse_image_size() -> None:
    assert parse_image_size("64") == (64, 64)
    assert parse_image_size("64x48") == (64, 48)
    for bad in ("7", "1025", "64x", "x64", "64x48x2", "-8", "big", ""):
        with pytest.raises(InvalidDataset) as refused:
            parse_image_size(bad)
        assert refused.value.code == "invalid_image_size"


# Refusals: each a 422 with its own code, naming the file inside the archive.


def refusal(client: TestClient, files: dict[str, bytes], **form: str) -> dict[str, Any]:
    body = post(client, archive(files), **form)
    assert body["status"] == 422, body
    assert "/tmp" not in body["detail"] and str(get_settings().home) not in body["detail"]
    return body


@pytest.mark.usefixtures("nothing_kept")
def test_mixed_sizes_without_image_size_are_refused(client: TestClient) -> None:
    files, _ = class_folders(per_class=2)
    files["red/wide.png"] = encode(picture(COLOURS["red"], (16, 12)))
    body = refusal(client, files)
    assert (body["code"], body["field"], body["member"]) == (
        "image_sizes_differ",
        "file",
        "red/wide.png",
    )
    assert "'blue/0.png' is 12x12" in body["detail"] and "'red/wide.png' is 16x12" in body["detail"]
    assert "`image_size`" in body["detail"]


@pytest.mark.usefixtures("nothing_kept")
def test_a_corrupt_image_is_named(client: TestClient) -> None:
    files, _ = class_folders(per_class=2)
    cats = {k.replace("red/", "cats/"): v for k, v in files.items()}
    whole = encode(picture(COLOURS["red"], seed=3))
    cats["cats/broken.png"] = whole[: len(whole) // 2]
    body = refusal(client, cats)
    assert (body["code"], body["member"]) == ("corrupt_image", "cats/broken.png")
    assert "cats/broken.png" in body["detail"]
    # A PNG signature over garbage is a corrupt PNG, not "not an image".
    cats["cats/broken.png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    assert refusal(client, cats)["code"] == "corrupt_image"


@pytest.mark.parametrize(
    "size",
    [(20_000, 20_000), (10_000, 10_000), (7_000, 7_000)],
    ids=["pillow-error", "pillow-warning", "own-limit"],
)
@pytest.mark.usefixtures("nothing_kept")
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_refused_undecoded(
    client: TestClient, size: tuple[int, int]
) -> None:
    assert size[0] * size[1] > MAX_IMAGE_PIXELS
    files, _ = class_folders(per_class=2)
    files["red/bomb.png"] = bomb_png(*size)
    assert len(files["red/bomb.png"]) < 100
    started = time.perf_counter()
    body = refusal(client, files)
    assert time.perf_counter() - started < 5
    assert (body["code"], body["member"]) == ("image_too_large", "red/bomb.png")
    assert f"{MAX_IMAGE_PIXELS:,} pixels" in body["detail"]


@pytest.mark.usefixtures("nothing_kept")
def test_a_bomb_is_refused_where_warnings_are_errors(client: TestClient) -> None:
    files, _ = class_folders(per_class=2)
    files["red/bomb.png"] = bomb_png(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        body = refusal(client, files)
    assert body["code"] == "image_too_large"


@pytest.mark.parametrize(
    ("member", "data", "code", "words"),
    [
        ("red/notes.txt", b"just some notes", "not_an_image", "not an image"),
        ("red/anim.gif", "GIF", "not_an_image", "a GIF image"),
        ("red/old.bmp", "BMP", "not_an_image", "a BMP image"),
        ("red/gif-named.png", "GIF", "not_an_image", "a GIF image"),
        ("README.txt", b"about", "unexpected_file", "not where images go"),
        ("red/deeper/0.png", "PNG", "unexpected_file", "`<class>/<image>`"),
    ],
)
@pytest.mark.usefixtures("nothing_kept")
def test_files_that_are_not_images_are_named(
    client: TestClient, member: str, data: bytes | str, code: str, words: str
) -> None:
    files, _ = class_folders(per_class=2)
    if isinstance(data, str):
        data = encode(picture(COLOURS["red"]), data)
    body = refusal(client, files | {member: data})
    assert (body["code"], body["member"]) == (code, member), body
    assert words in body["detail"] and member in body["detail"]


@pytest.mark.usefixtures("nothing_kept")
def test_layout_refusals(client: TestClient) -> None:
    files, _ = class_folders(per_class=2)
    red = {k: v for k, v in class_folders(per_class=3)[0].items() if k.startswith("red/")}
    assert refusal(client, red)["code"] == "one_class"
    assert refusal(client, {"a/0.png": files["red/0.png"]})["code"] == "too_few_images"
    assert refusal(client, {"notes/.DS_Store": b"x"})["code"] == "no_images"
    half = {f"train/{k}": v for k, v in files.items()} | {"other/x.png": files["red/0.png"]}
    assert refusal(client, half)["code"] == "unexpected_file"
    assert refusal(client, files, classes='["red", "green"]')["code"] == "unknown_label"
    labelled = {"labels.csv": b"file,label\nred/0.png,r\nred/1.jpg,r\n"} | files
    body = refusal(client, labelled)
    assert (body["code"], body["member"]) == ("unexpected_file", "blue/0.png")
    body = refusal(client, {"labels.csv": b"file,label\nnope.png,r\n"} | files)
    assert (body["code"], body["member"]) == ("missing_image", "labels.csv")
    assert refusal(client, {"labels.csv": b"name,class\n"} | files)["code"] == "invalid_labels"


@pytest.mark.usefixtures("nothing_kept")
def test_unsafe_archives_and_bad_fields_are_refused(client: TestClient) -> None:
    files, _ = class_folders(per_class=2)
    body = refusal(client, files | {"../evil.png": files["red/0.png"]})
    assert (body["code"], body["field"]) == ("archive_unsafe", "file")
    assert body["title"] == "Invalid dataset file"
    body = post(client, b"not an archive at all", "images.zip")
    assert (body["status"], body["code"]) == (422, "archive_unreadable")
    body = post(client, archive(files), image_size="4")
    assert (body["status"], body["code"], body["field"]) == (
        422,
        "invalid_image_size",
        "image_size",
    )
    npz = npz_bytes(x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    body = post(client, npz, "data.npz", image_size="16")
    assert (body["status"], body["field"]) == (422, "image_size")
    body = post(client, archive(files), text_column="text")
    assert (body["status"], body["field"]) == (422, "text_column")
    body = post(client, b"whatever", "images.rar")
    assert (body["status"], body["code"]) == (415, "unsupported_format")
    assert ".tar.gz" in body["detail"]


@pytest.mark.usefixtures("nothing_kept")
def test_the_memory_budget_is_checked_before_decoding(client: TestClient) -> None:
    files, _ = class_folders(per_class=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_MAX_DATASET_MEMORY_BYTES", "100000")
        config.get_settings.cache_clear()
        try:
            body = refusal(client, files, image_size="64")
        finally:
            config.get_settings.cache_clear()
    assert body["code"] == "dataset_too_large"
    assert "6 images of 64x64 pixels" in body["detail"] and "100,000 bytes" in body["detail"]


# End to end: a job trains a cnn student on an uploaded image dataset.


def test_a_job_trains_on_an_image_dataset(client: TestClient, tmp_path: Path) -> None:
    files, _ = class_folders(per_class=20)
    body = post(client, archive(files), "colours.tar.gz")
    assert body["status"] == 201, body
    arrays = stored(body)
    x, y = arrays["x"], arrays["y"]
    weights = fit_mlp(x / 255.0, y, 3, hidden=16, steps=150)
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(weights, (3, 12, 12), path, input_scale=1 / 255)
    with open(path, "rb") as f:
        teacher = client.post("/v1/teachers", files={"file": ("teacher.onnx", f)})
    assert teacher.status_code == 201, teacher.text
    job = {
        "teacher": teacher.json()["id"],
        "dataset": body["ref"],
        "student": {"architecture": "cnn", "channels": [8], "hidden_sizes": []},
        "training": {"epochs": 3, "batch_size": 16, "learning_rate": 0.01, "seed": 0},
    }
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    run_job(job_id)
    done = client.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["teacher_accuracy"] == 1.0
    predicted = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": x[:6].tolist()})
    assert predicted.status_code == 200, predicted.text
    answer = predicted.json()
    assert len(answer["predictions"]) == 6
    assert set(answer["labels"]) <= set(COLOURS)
