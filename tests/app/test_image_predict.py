"""`/predict` (and `/v2`) take encoded images for an image student: base64 PNG, JPEG or WebP, or
data URLs, decoded as uploads are, resized to the student's input and made its dataset's stored
form; refused images are 422s naming the sample. An archive's signature declares its values
pixels, which the preflight maps to what a teacher declares."""

import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.datasets.images import ARCHIVE_PREPROCESSING
from app.errors import InvalidInput
from app.jobs.preflight import teacher_inputs
from app.ml.signature import ImagePreprocessing, ModelSignature
from app.serving import service
from tests.app.test_image_datasets import (
    COLOURS,
    archive,
    bomb_png,
    class_folders,
    encode,
    picture,
    post,
    stored,
)
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.onnx_teachers import fit_mlp, write_onnx_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def channel(values: list[float], rank: int = 4) -> Any:
    """Per-channel values shaped to broadcast over ``[N, C, H, W]`` (``rank`` 3: ``[C, H, W]``)."""
    return np.asarray(values).reshape((-1, 1, 1) if rank == 3 else (1, -1, 1, 1))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chw(pixels: Any) -> list[Any]:
    """uint8 ``[H, W, 3]`` as the sample an archive stores, ``[3, H, W]`` (values 0 to 255)."""
    out: list[Any] = np.asarray(pixels).transpose(2, 0, 1).astype(np.float32).tolist()
    return out


def predict(client: TestClient, job_id: str, inputs: list[Any]) -> dict[str, Any]:
    response = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": inputs})
    body: dict[str, Any] = {"status": response.status_code, **response.json()}
    return body


def image_job(client: TestClient, tmp_path: Path) -> str:
    """A succeeded job: a cnn student of an archive of coloured 12x12 squares, distilled from an
    MLP teacher that takes ``[3, 12, 12]`` inputs normalised as ImageNet models' are, declared
    at upload: the preflight maps the archive's pixels to them."""
    files, _ = class_folders(per_class=20)
    body = post(client, archive(files), "colours.zip")
    assert body["status"] == 201, body
    assert body["signature"]["preprocessing"] == ARCHIVE_PREPROCESSING.model_dump(mode="json")
    arrays = stored(body)
    normalised = (arrays["x"] / 255.0 - channel(IMAGENET_MEAN)) / channel(IMAGENET_STD)
    weights = fit_mlp(normalised, arrays["y"], 3, hidden=16, steps=150)
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(weights, (3, 12, 12), path)
    declared = ImagePreprocessing(scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with open(path, "rb") as f:
        teacher = client.post(
            "/v1/teachers",
            files={"file": ("teacher.onnx", f)},
            data={"preprocessing": declared.model_dump_json()},
        )
    assert teacher.status_code == 201, teacher.text
    job = {
        "teacher": teacher.json()["id"],
        "dataset": body["ref"],
        "student": {"architecture": "cnn", "channels": [8], "hidden_sizes": []},
        "training": {"epochs": 3, "batch_size": 16, "learning_rate": 0.01, "seed": 0},
    }
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    run_job(job_id)
    done = client.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["teacher_accuracy"] == 1.0  # it got the inputs it declared
    return job_id


def test_an_image_student_takes_encoded_images(client: TestClient, tmp_path: Path) -> None:
    job_id = image_job(client, tmp_path)
    manifest = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "manifest"}).json()
    assert manifest["signature"]["preprocessing"] == ARCHIVE_PREPROCESSING.model_dump(mode="json")
    pixels = [picture(colour, seed=100 + i) for i, colour in enumerate(COLOURS.values())]
    as_arrays = predict(client, job_id, [chw(p) for p in pixels])
    assert as_arrays["status"] == 200, as_arrays
    assert as_arrays["labels"] == list(COLOURS)

    pngs = [b64(encode(p)) for p in pixels]
    as_png = predict(client, job_id, pngs)
    assert as_png["status"] == 200, as_png
    assert as_png["probabilities"] == as_arrays["probabilities"]
    data_urls = [f"data:image/png;base64,{s}" for s in pngs]
    assert predict(client, job_id, data_urls)["probabilities"] == as_arrays["probabilities"]
    wrapped = "\n".join(pngs[0][i : i + 76] for i in range(0, len(pngs[0]), 76))  # `base64`
    assert predict(client, job_id, [wrapped])["probabilities"][0] == as_arrays["probabilities"][0]
    webp = [b64(encode(p, "WEBP")) for p in pixels]
    assert predict(client, job_id, webp)["probabilities"] == as_arrays["probabilities"]
    jpeg = predict(client, job_id, [b64(encode(p, "JPEG")) for p in pixels])
    assert jpeg["labels"] == as_arrays["labels"]
    mixed = predict(client, job_id, [chw(pixels[0]), pngs[1], chw(pixels[2])])
    assert mixed["probabilities"] == as_arrays["probabilities"]

    # Another size is resized (bicubic, as uploads are); grey is made RGB.
    large = picture(COLOURS["green"], (24, 20), seed=7)
    resized = np.asarray(Image.fromarray(large).resize((12, 12), Image.Resampling.BICUBIC))
    grey = np.asarray(Image.fromarray(pixels[2]).convert("L"))
    answer = predict(client, job_id, [b64(encode(large)), b64(encode(grey))])
    expected = predict(client, job_id, [chw(resized), chw(np.stack([grey] * 3, axis=-1))])
    assert answer["status"] == 200, answer
    assert answer["probabilities"] == expected["probabilities"]
    assert answer["labels"][0] == "green"

    # /v2: a BYTES tensor [N] or [N, 1] of encoded images, as the FP32 tensor of their pixels.
    fp32 = {"name": "input", "shape": [3, 3, 12, 12], "datatype": "FP32"}
    fp32["data"] = np.asarray([chw(p) for p in pixels]).reshape(-1).tolist()
    logits = v2(client, job_id, fp32)
    assert logits["status"] == 200, logits
    for shape in ([3], [3, 1]):
        tensor = {"name": "input", "shape": shape, "datatype": "BYTES", "data": data_urls}
        assert v2(client, job_id, tensor)["outputs"] == logits["outputs"], shape
    bad = v2(client, job_id, {"name": "input", "shape": [1], "datatype": "BYTES", "data": ["@@"]})
    assert bad["status"] == 400 and "input.0" in bad["error"], bad


def v2(client: TestClient, job_id: str, tensor: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/v2/models/{job_id}/infer", json={"inputs": [tensor]})
    body: dict[str, Any] = {"status": response.status_code, **response.json()}
    return body


def test_refused_images_name_the_sample(client: TestClient, tmp_path: Path) -> None:
    job_id = image_job(client, tmp_path)
    good = b64(encode(picture(COLOURS["red"])))
    png = encode(picture(COLOURS["blue"]))
    cases = {
        "corrupt_image": b64(png[: len(png) // 2]),
        "not_an_image": b64(encode(picture(COLOURS["red"]), "GIF")),
        "invalid_base64": "not base64 at all!",
    }
    for code, sample in cases.items():
        body = predict(client, job_id, [good, sample])
        assert (body["status"], body["code"], body["field"]) == (422, code, "inputs.1"), body
        assert "inputs.1" in body["detail"]
    body = predict(client, job_id, [good, "data:image/png,rawbytes"])
    assert (body["code"], body["field"]) == ("invalid_base64", "inputs.1")
    body = predict(client, job_id, [[[0.0]], good])
    assert (body["status"], body["field"]) == (422, "inputs.0")

    started = time.perf_counter()
    body = predict(client, job_id, [good, b64(bomb_png(7_000, 7_000))])
    assert time.perf_counter() - started < 2
    assert (body["status"], body["code"], body["field"]) == (422, "image_too_large", "inputs.1")
    with pytest.MonkeyPatch.context() as mp:  # the request's pixels in all
        mp.setattr(service, "MAX_REQUEST_PIXELS", 12 * 12 * 2)
        body = predict(client, job_id, [good, good, good])
    assert (body["status"], body["code"], body["field"]) == (422, "too_many_pixels", "inputs.2")


def test_a_grey_student_takes_grey_images_scaled_as_its_data(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    run_job(job_id)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    signature = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "manifest"}).json()[
        "signature"
    ]
    assert signature["preprocessing"] == {
        "kind": "image",
        "scale": 1 / 16,
        "mean": None,
        "std": None,
        "channel_order": "L",
    }
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    # Digits are scaled into [0, 1] from counts 0 to 16: 8-bit white (255) is 1.0 there too.
    arrays = [(g.astype(np.float32) / np.float32(255))[None].tolist() for g in grey]
    expected = predict(client, job_id, arrays)
    strings = [b64(encode(g)) for g in grey]
    assert predict(client, job_id, strings)["probabilities"] == expected["probabilities"]
    tensor = {"name": "input", "shape": [2], "datatype": "BYTES", "data": strings}
    scores = v2(client, job_id, tensor)
    assert scores["status"] == 200, scores
    assert np.allclose(
        np.reshape(scores["outputs"][1]["data"], (2, -1)), expected["probabilities"], atol=1e-6
    )
    colour = np.stack([grey[0]] * 3, axis=-1)  # an RGB image of grey pixels: the same luma
    assert (
        predict(client, job_id, [b64(encode(colour))])["probabilities"]
        == expected["probabilities"][:1]
    )


def test_a_string_for_a_student_of_arrays_is_refused() -> None:
    signature = ModelSignature.for_tensor((3, 12, 12), 3)  # an `.npz` upload's: raw tensors
    with pytest.raises(InvalidInput) as refused:
        service.parse_inputs([np.zeros((3, 12, 12)).tolist(), "aGVsbG8="], signature, 8)
    assert refused.value.extra["field"] == "inputs.1"
    assert "this student takes arrays" in refused.value.detail


def test_archive_pixels_map_to_a_teachers_imagenet_normalisation() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 5)).astype(np.float32)
    teacher = ImagePreprocessing(scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mapped = teacher_inputs(pixels, ARCHIVE_PREPROCESSING, teacher)
    assert isinstance(mapped, np.ndarray) and mapped.dtype == np.float32
    expected = (pixels / 255.0 - channel(IMAGENET_MEAN)) / channel(IMAGENET_STD)
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-5)
    assert teacher_inputs(pixels, ARCHIVE_PREPROCESSING, ARCHIVE_PREPROCESSING) is pixels


def test_stored_pixels_follow_the_signature() -> None:
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    archive_form = service.stored_pixels(rgb, ARCHIVE_PREPROCESSING)
    np.testing.assert_array_equal(archive_form, rgb.transpose(2, 0, 1).astype(np.float32))
    bgr = service.stored_pixels(rgb, ImagePreprocessing(scale=1.0, channel_order="BGR"))
    np.testing.assert_array_equal(bgr, archive_form[::-1])
    unit = service.stored_pixels(rgb, ImagePreprocessing(scale=1 / 255))
    np.testing.assert_array_equal(unit, archive_form / np.float32(255))
    normalised = service.stored_pixels(
        rgb, ImagePreprocessing(scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    )
    expected = (archive_form / 255 - channel(IMAGENET_MEAN, 3)) / channel(IMAGENET_STD, 3)
    np.testing.assert_allclose(normalised, expected, rtol=1e-6)
