"""A job's teachers, frozen and opened through their format's backend, and how an ensemble's
outputs become one teacher's. Logits (and a feature method's hooked outputs) are computed once per
job, never per training step: without augmentation the inputs never change."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.layers import FeatureLayer
from app.ml.signature import ModelSignature
from app.ml.teacher_formats import (
    FORMATS,
    ScoresChoice,
    TeacherBackend,
    TeacherDeclarations,
    inspect_teacher,
)
from app.storage import sha256_file


@dataclass(frozen=True)
class TeacherRecord:
    """What a job needs of one stored teacher (read from its row, used without the database)."""

    id: str
    format: str
    sha256: str
    path: Path
    size_bytes: int
    parameter_count: int
    signature: ModelSignature
    architecture: dict[str, Any] | None
    # None for teachers uploaded before choices were recorded: the first output, assumed logits.
    scores_choice: ScoresChoice | None = None
    feature_layers: tuple[FeatureLayer, ...] = ()

    @classmethod
    def from_file(
        cls,
        path: Path,
        config: dict[str, Any] | None = None,
        declared: TeacherDeclarations | None = None,
    ) -> "TeacherRecord":
        """A teacher file as an upload would store it (benchmarks and tests, no database);
        ``config`` is a safetensors teacher's architecture config, ``declared`` the upload's
        other form fields."""
        info = inspect_teacher(
            path, path.name, None if config is None else json.dumps(config), declared
        )
        return cls(
            id=path.stem,
            format=info.format,
            sha256=sha256_file(path),
            path=path,
            size_bytes=path.stat().st_size,
            parameter_count=info.parameter_count,
            signature=info.signature,
            architecture=info.architecture,
            scores_choice=info.scores_choice,
            feature_layers=tuple(info.feature_layers),
        )

    @property
    def choice(self) -> ScoresChoice:
        return self.scores_choice or ScoresChoice(output=self.signature.scores.name, by="position")

    def open(self, device: torch.device) -> TeacherBackend:
        return FORMATS[self.format].open(self.path, self.signature, self.architecture, device)


def ensemble_logits(
    logits: list[np.ndarray], weights: list[float], temperature: float
) -> np.ndarray:
    """One teacher out of several: ``z`` with ``softmax(z / T) = sum_i w_i softmax(z_i / T)``.

    The weighted mean of the ensemble's softened distributions, taken at the temperature the
    loss will use, so every method sees the ensemble as a single teacher.
    """
    if len(logits) == 1:
        return logits[0]
    mixture = np.zeros(logits[0].shape, dtype=np.float64)
    for z, weight in zip(logits, weights, strict=True):
        scaled = z.astype(np.float64) / temperature
        scaled -= scaled.max(axis=-1, keepdims=True)
        probabilities = np.exp(scaled)
        mixture += weight * probabilities / probabilities.sum(axis=-1, keepdims=True)
    return (temperature * np.log(np.clip(mixture, 1e-300, None))).astype(np.float32)
