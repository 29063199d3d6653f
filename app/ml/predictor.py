"""A student rebuilt in torch from its manifest and safetensors weights: the reference that checks
an artifact (tests, recipes). Serving runs the ONNX student on onnxruntime instead
(``app/serving/engine.py``)."""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from app.ml.artifacts import FILENAMES, Manifest, read_manifest
from app.ml.students import build_student
from app.models import ArtifactFormat


@dataclass(frozen=True)
class Predictor:
    manifest: Manifest
    model: nn.Module

    def predict(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class indices and probabilities for a float32 batch shaped ``[N, *input_shape]``."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(inputs))
            probabilities = torch.softmax(logits.float(), dim=-1)
        return probabilities.argmax(dim=-1).numpy(), probabilities.numpy()


@lru_cache(maxsize=16)
def load_predictor(directory: Path) -> Predictor:
    manifest = read_manifest(directory)
    model = build_student(manifest.student_spec, manifest.signature)
    model.load_state_dict(load_file(str(directory / FILENAMES[ArtifactFormat.SAFETENSORS])))
    return Predictor(manifest, model.eval())
