"""The student artifact: a directory with ``manifest.json``, ``model.safetensors`` and
``model.onnx``. The manifest holds everything needed to rebuild and check the student."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, model_validator

from app.ml.signature import INPUT_NAME, LOGITS_NAME, ModelSignature
from app.ml.students import StudentSpecBase, parse_spec
from app.models import ArtifactFormat

FORMAT_VERSION = 2
FILENAMES = {
    ArtifactFormat.MANIFEST: "manifest.json",
    ArtifactFormat.SAFETENSORS: "model.safetensors",
    ArtifactFormat.ONNX: "model.onnx",
    ArtifactFormat.ONNX_INT8: "model.int8.onnx",
    ArtifactFormat.TOKENIZER: "tokenizer.json",
}
MEDIA_TYPES = {
    ArtifactFormat.MANIFEST: "application/json",
    ArtifactFormat.SAFETENSORS: "application/octet-stream",
    ArtifactFormat.ONNX: "application/octet-stream",
    ArtifactFormat.ONNX_INT8: "application/octet-stream",
    ArtifactFormat.TOKENIZER: "application/json",
}


class Manifest(BaseModel):
    """Version 2: the student's ``signature`` (named inputs, class names) replaces version 1's
    ``input_shape``, ``input_name``, ``output_name`` and ``classes``; version 1 manifests are
    read by converting them."""

    format_version: int = FORMAT_VERSION
    job_id: str
    student: dict[str, Any]
    signature: ModelSignature
    metrics: dict[str, Any]
    teachers: list[dict[str, Any]]
    dataset: dict[str, Any]
    files: dict[str, str]
    library_versions: dict[str, str]

    @model_validator(mode="before")
    @classmethod
    def _upgrade_version_1(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format_version") == 1:
            data = dict(data)
            classes = data.pop("classes")
            data["signature"] = ModelSignature.for_tensor(
                data.pop("input_shape"),
                len(classes),
                input_name=data.pop("input_name", INPUT_NAME),
                output_name=data.pop("output_name", LOGITS_NAME),
                classes=classes,
            )
        return data

    @property
    def student_spec(self) -> StudentSpecBase:
        return parse_spec(self.student)

    @property
    def classes(self) -> list[str]:
        return self.signature.class_names

    @property
    def input_shape(self) -> list[int]:
        return list(self.signature.input_shape)


def read_manifest(directory: Path) -> Manifest:
    return Manifest.model_validate_json(
        (directory / FILENAMES[ArtifactFormat.MANIFEST]).read_text()
    )
