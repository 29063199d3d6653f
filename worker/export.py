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


def write_artifact(
    directory: Path,
    *,
    model: nn.Module,
    signature: ModelSignature,
    manifest_fields: dict[str, Any],
) -> dict[ArtifactFormat, Path]:
    """Write the three files and return them by format; the manifest records the others' sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    paths = {f: directory / name for f, name in FILENAMES.items()}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(paths[ArtifactFormat.SAFETENSORS]),
    )
    export_onnx(model, signature, paths[ArtifactFormat.ONNX])
    files = {
        FILENAMES[f]: sha256_file(paths[f])
        for f in (ArtifactFormat.SAFETENSORS, ArtifactFormat.ONNX)
    }
    manifest = Manifest(
        signature=signature,
        files=files,
        library_versions=library_versions(),
        **manifest_fields,
    )
    paths[ArtifactFormat.MANIFEST].write_text(
        json.dumps(manifest.model_dump(mode="json"), indent=2)
    )
    return paths
