"""The artifact round trip: what the worker writes, serving rebuilds and predicts identically."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from app.ml.architectures import CnnSpec, MlpSpec, build_student
from app.ml.predictor import load_predictor
from app.models import ArtifactFormat
from app.storage import sha256_file
from worker.export import write_artifact


def round_trip(spec: MlpSpec | CnnSpec, tmp_path: Path, channels_last: bool) -> None:
    x = torch.rand(16, 1, 8, 8)
    torch.manual_seed(0)
    student = build_student(spec, (1, 8, 8), 10, fit_inputs=x)
    if channels_last:
        student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.no_grad():
        expected = torch.softmax(student.eval()(x), -1).numpy()
    paths = write_artifact(
        tmp_path,
        model=student,
        input_shape=(1, 8, 8),
        manifest_fields={
            "job_id": "j",
            "student": spec.model_dump(mode="json"),
            "classes": [str(i) for i in range(10)],
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
