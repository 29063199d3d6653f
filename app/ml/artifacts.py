"""The student artifact: a directory with ``manifest.json``, ``model.safetensors`` and
``model.onnx``. The manifest holds everything needed to rebuild and check the student."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from app.ml.architectures import CnnSpec, MlpSpec, ModelSpec
from app.models import ArtifactFormat

FORMAT_VERSION = 1
FILENAMES = {
    ArtifactFormat.MANIFEST: "manifest.json",
    ArtifactFormat.SAFETENSORS: "model.safetensors",
    ArtifactFormat.ONNX: "model.onnx",
}
MEDIA_TYPES = {
    ArtifactFormat.MANIFEST: "application/json",
    ArtifactFormat.SAFETENSORS: "application/octet-stream",
    ArtifactFormat.ONNX: "application/octet-stream",
}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_student_adapter: TypeAdapter[MlpSpec | CnnSpec] = TypeAdapter(ModelSpec)


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    job_id: str
    student: dict[str, Any]
    input_shape: list[int]
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    classes: list[str]
    metrics: dict[str, Any]
    teachers: list[dict[str, Any]]
    dataset: dict[str, Any]
    files: dict[str, str]
    library_versions: dict[str, str]

    @property
    def student_spec(self) -> MlpSpec | CnnSpec:
        return _student_adapter.validate_python(self.student)


def read_manifest(directory: Path) -> Manifest:
    return Manifest.model_validate_json(
        (directory / FILENAMES[ArtifactFormat.MANIFEST]).read_text()
    )
