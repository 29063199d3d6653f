"""Write the student artifact directory: safetensors weights, ONNX graph, manifest."""

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from app.ml.artifacts import FILENAMES, Manifest
from app.ml.onnx_io import export_onnx
from app.ml.signature import ModelSignature
from app.models import ArtifactFormat
from app.storage import sha256_file

LIBRARIES = ("torch", "onnx", "onnxruntime", "safetensors", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("distill", *LIBRARIES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_student(
    directory: Path, model: nn.Module, signature: ModelSignature
) -> dict[ArtifactFormat, Path]:
    """The student's weights (safetensors) and graph (ONNX) in ``directory``, by format."""
    directory.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    paths = {f: directory / FILENAMES[f] for f in (ArtifactFormat.SAFETENSORS, ArtifactFormat.ONNX)}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(paths[ArtifactFormat.SAFETENSORS]),
    )
    export_onnx(model, signature, paths[ArtifactFormat.ONNX])
    return paths


def write_manifest(
    directory: Path,
    files: dict[ArtifactFormat, Path],
    signature: ModelSignature,
    fields: dict[str, Any],
) -> Path:
    """``manifest.json`` beside ``files``, recording each one's sha256; returns its path."""
    manifest = Manifest(
        signature=signature,
        files={path.name: sha256_file(path) for path in files.values()},
        library_versions=library_versions(),
        **fields,
    )
    path = directory / FILENAMES[ArtifactFormat.MANIFEST]
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return path
