"""The artifact round trip: what the worker writes, serving rebuilds and predicts identically."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from app.ml.predictor import load_predictor
from app.ml.signature import ModelSignature
from app.ml.students import CnnSpec, MlpSpec, build_student
from app.models import ArtifactFormat
from app.storage import sha256_file
from worker.export import write_manifest, write_student


def round_trip(spec: MlpSpec | CnnSpec, tmp_path: Path, channels_last: bool) -> None:
    x = torch.rand(16, 1, 8, 8)
    torch.manual_seed(0)
    signature = ModelSignature.for_tensor((1, 8, 8), 10, classes=[str(i) for i in range(10)])
    student = build_student(spec, signature, fit_inputs=x)
    if channels_last:
        student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.no_grad():
        expected = torch.softmax(student.eval()(x), -1).numpy()
    paths = write_student(tmp_path, student, signature)
    write_manifest(
        tmp_path,
        paths,
        signature,
        {
            "job_id": "j",
            "student": spec.model_dump(mode="json"),
            "metrics": {},
            "teachers": [],
            "dataset": {"ref": "builtin:digits", "sha256": "d"},
        },
    )
    predictor = load_predictor(tmp_path)
    predictions, probabilities = predictor.predict(x.numpy())
    assert np.allclose(probabilities, expected, atol=1e-5)
    assert (predictions == expected.argmax(-1)).all()
    session = ort.InferenceSession(
        str(paths[ArtifactFormat.ONNX]), providers=["CPUExecutionProvider"]
    )
    onnx_logits = session.run(None, {"input": x.numpy()})[0]
    assert np.allclose(
        torch.softmax(torch.from_numpy(onnx_logits), -1).numpy(), expected, atol=1e-5
    )
    files = predictor.manifest.files
    assert files["model.onnx"] == sha256_file(paths[ArtifactFormat.ONNX])
    assert files["model.safetensors"] == sha256_file(paths[ArtifactFormat.SAFETENSORS])


def test_mlp_student_round_trip(tmp_path: Path) -> None:
    round_trip(MlpSpec(hidden_sizes=[16]), tmp_path, channels_last=False)


def test_channels_last_cnn_student_round_trip(tmp_path: Path) -> None:
    round_trip(CnnSpec(channels=[4, 8], hidden_sizes=[16]), tmp_path, channels_last=True)


def test_version_1_manifests_are_still_served(tmp_path: Path) -> None:
    """Artifacts written before signatures keep working: their manifest is converted on read."""
    round_trip(MlpSpec(hidden_sizes=[16]), tmp_path, channels_last=False)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    signature = manifest.pop("signature")
    manifest |= {
        "format_version": 1,
        "input_shape": [1, 8, 8],
        "input_name": "input",
        "output_name": "logits",
        "classes": signature["outputs"][0]["classes"],
    }
    path.write_text(json.dumps(manifest))
    load_predictor.cache_clear()
    predictor = load_predictor(tmp_path)
    assert predictor.manifest.signature == ModelSignature.model_validate(signature)
    assert predictor.manifest.input_shape == [1, 8, 8]
    predictions, _ = predictor.predict(np.zeros((2, 1, 8, 8), np.float32))
    assert predictions.shape == (2,)
