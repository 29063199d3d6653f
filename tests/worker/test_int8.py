"""The int8 student: quantised with onnxruntime beside the float32 one (dynamic for MLPs, static
for convnets), its reported figures reproduced by the file, a quantisation failure harmless to the
job, and the file downloadable."""

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

import worker.quantize
from app.datasets.loading import load_builtin
from app.jobs.schemas import DistillationSpec
from app.ml.artifacts import read_manifest
from app.models import ArtifactFormat
from app.storage import sha256_file
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job
from worker.quantize import ArrayCalibrationReader
from worker.recipe import DistillationRecipe, RecipeInputs, RecipeOutput
from worker.teachers import TeacherRecord

MLP = {"architecture": "mlp", "hidden_sizes": [256, 128]}
CNN = {"architecture": "cnn", "channels": [16, 32], "hidden_sizes": [64]}


def distil(teacher: Path, student: dict[str, Any], directory: Path) -> RecipeOutput:
    spec = DistillationSpec.model_validate(
        {
            "teacher": "t",
            "dataset": "builtin:digits",
            "student": student,
            "training": {"epochs": 3, "batch_size": 64, "learning_rate": 0.01, "seed": 0},
        }
    )
    return DistillationRecipe(
        RecipeInputs(
            job_id="j",
            spec=spec,
            teachers=[TeacherRecord.from_file(teacher)],
            data=load_builtin("builtin:digits"),
            device=torch.device("cpu"),
            artifact_dir=directory,
        )
    ).run()


def onnx_predictions(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])
    return np.asarray(logits.argmax(axis=1))


def check_int8(output: RecipeOutput, method: str) -> tuple[int, int]:
    """What holds for every int8 student; returns the float32 and int8 sizes."""
    result, paths = output.result, output.paths
    int8, float32 = paths[ArtifactFormat.ONNX_INT8], paths[ArtifactFormat.ONNX]
    assert int8.name == "model.int8.onnx" and int8.parent == float32.parent
    assert result.int8_method == method
    assert result.int8_size_bytes == int8.stat().st_size
    assert result.student_size_bytes == float32.stat().st_size
    # The reported accuracy and agreement are those of the file, run with onnxruntime.
    data = load_builtin("builtin:digits")
    predicted = onnx_predictions(int8, data.x_test)
    assert result.int8_accuracy == pytest.approx(float((predicted == data.y_test).mean()))
    reference = onnx_predictions(float32, data.x_test)
    assert result.int8_agreement == pytest.approx(float((predicted == reference).mean()))
    assert result.int8_agreement is not None and result.int8_agreement > 0.95
    assert result.int8_accuracy is not None
    assert result.int8_accuracy >= result.student_accuracy - 0.03
    assert result.int8_latency_ms is not None and result.int8_latency_ms > 0
    assert result.student_latency_ms is not None and result.int8_speedup == pytest.approx(
        result.student_latency_ms / result.int8_latency_ms
    )
    assert not [w for w in result.warnings if w.code == "int8_skipped"]
    # The manifest lists the int8 file with its digest, and carries its figures.
    manifest = read_manifest(int8.parent)
    assert manifest.files["model.int8.onnx"] == sha256_file(int8)
    assert manifest.metrics["int8_accuracy"] == result.int8_accuracy
    return float32.stat().st_size, int8.stat().st_size


def test_an_mlp_student_is_quantised_dynamically(
    digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    output = distil(digits_teacher.onnx, MLP, tmp_path)
    float32, int8 = check_int8(output, "dynamic")
    # Its weights are nearly all the file: int8 weights make it 3-4 times smaller (not 4: the
    # biases stay float32, and each matrix gets a scale and zero point per output channel).
    assert 3 < float32 / int8 < 4
    ops = {
        node.op_type for node in onnx.load(str(output.paths[ArtifactFormat.ONNX_INT8])).graph.node
    }
    # Every Gemm was rewritten as MatMul + Add, and every MatMul quantised.
    assert "MatMulInteger" in ops and not ops & {"Gemm", "MatMul"}


def test_a_cnn_student_is_quantised_statically(
    digits_cnn_teacher: TeacherFiles, tmp_path: Path
) -> None:
    output = distil(digits_cnn_teacher.onnx, CNN, tmp_path)
    float32, int8 = check_int8(output, "static")
    # Smaller, but by less than an MLP: in QDQ format each quantised weight comes with a
    # DequantizeLinear node and per-channel scales and zero points, biases are int32 (as large as
    # float32), and every activation gets a QuantizeLinear/DequantizeLinear pair, which in a graph
    # this small weigh as much as many of the weights.
    assert 1.5 < float32 / int8 < 4
    ops = [
        node.op_type for node in onnx.load(str(output.paths[ArtifactFormat.ONNX_INT8])).graph.node
    ]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops


def test_a_failed_quantisation_skips_only_the_int8_student(
    digits_teacher: TeacherFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        (tmp_path / "model.int8.onnx").write_bytes(b"half")  # a partial file, removed after
        raise RuntimeError("quantiser broke")

    monkeypatch.setattr(worker.quantize, "quantize_student", fail)
    output = distil(digits_teacher.onnx, MLP, tmp_path)
    result = output.result
    assert ArtifactFormat.ONNX_INT8 not in output.paths
    assert not (tmp_path / "model.int8.onnx").exists()
    assert result.student_accuracy > 0.85 and result.student_latency_ms is not None
    assert (result.int8_method, result.int8_accuracy, result.int8_size_bytes) == (None,) * 3
    (warning,) = [w for w in result.warnings if w.code == "int8_skipped"]
    assert "RuntimeError: quantiser broke" in warning.detail
    assert "model.int8.onnx" not in read_manifest(tmp_path).files


def test_the_calibration_reader_goes_through_its_samples_in_batches_and_rewinds() -> None:
    x = np.arange(70 * 64, dtype=np.float32).reshape(70, 1, 8, 8)
    reader = ArrayCalibrationReader("input", x)
    for _ in range(2):
        batches = []
        while (batch := reader.get_next()) is not None:
            batches.append(batch["input"])
        assert [len(b) for b in batches] == [32, 32, 6]
        assert np.array_equal(np.concatenate(batches), x)
        reader.rewind()


def test_the_int8_student_is_downloadable(client: TestClient, digits_teacher: TeacherFiles) -> None:
    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["int8_method"] == "dynamic" and result["int8_size_bytes"] > 0
    response = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "onnx_int8"})
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    assert response.headers["X-Content-SHA256"] == digest
    assert len(response.content) == result["int8_size_bytes"]
    manifest = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "manifest"}).json()
    assert manifest["files"]["model.int8.onnx"] == digest
    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    data = load_builtin("builtin:digits")
    logits = session.run(None, {session.get_inputs()[0].name: data.x_test})[0]
    accuracy = float((np.asarray(logits).argmax(axis=1) == data.y_test).mean())
    assert accuracy == pytest.approx(result["int8_accuracy"])
