"""The protocol every teacher format implements, and what inspecting an upload yields."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from app.ml.layers import FeatureLayer
from app.ml.signature import ModelSignature, OutputKind

OnBatch = Callable[[], None] | None
# Teacher passes run in batches of this many samples. On CPU, a convolutional teacher runs 4x
# faster per sample at 128 than at 1024 (measured on the example teacher: its activations stay in
# cache), and onnxruntime is no slower.
BATCH_SIZE = 128


@dataclass(frozen=True)
class TeacherInfo:
    """What inspection learns of an upload without running any code it contains.

    ``architecture`` is what ``open`` needs besides the file (a safetensors teacher's config).
    """

    format: str
    signature: ModelSignature
    parameter_count: int
    architecture: dict[str, Any] | None = None
    feature_layers: list[FeatureLayer] = field(default_factory=list)


class TeacherBackend(ABC):
    """A loaded teacher, frozen (eval mode, no gradients), run on float32 numpy inputs
    ``[N, *input_shape]`` in batches. A format implements ``run`` (one batch) and
    ``latency_ms``; ``on_batch`` runs before every batch (the worker's heartbeat on long
    passes)."""

    signature: ModelSignature

    @abstractmethod
    def run(self, batch: np.ndarray, names: list[str] | None) -> list[np.ndarray]:
        """One batch's class scores (``names`` None: a one-element list), or its outputs at
        ``names`` (``feature_layers`` names)."""

    @abstractmethod
    def latency_ms(self) -> float:
        """Median single-sample latency on onnxruntime, one CPU thread (as students are timed)."""

    def logits(
        self, x: np.ndarray, batch_size: int = BATCH_SIZE, on_batch: OnBatch = None
    ) -> np.ndarray:
        """Logits ``[N, classes]`` float32, whatever kind of scores the teacher returns."""
        scores = self._batched(x, None, batch_size, on_batch)[0]
        return as_logits(scores, self.signature.scores.kind)

    def features(
        self,
        x: np.ndarray,
        names: list[str],
        batch_size: int = BATCH_SIZE,
        on_batch: OnBatch = None,
    ) -> list[np.ndarray]:
        """The outputs at ``names`` for every sample, float32."""
        return self._batched(x, names, batch_size, on_batch)

    def _batched(
        self, x: np.ndarray, names: list[str] | None, batch_size: int, on_batch: OnBatch
    ) -> list[np.ndarray]:
        """``run`` over ``x`` in batches, its outputs written into float32 arrays allocated once
        (a feature method's can be the job's largest)."""
        arrays: list[np.ndarray] = []
        for start in range(0, len(x), batch_size):
            if on_batch is not None:
                on_batch()
            outputs = self.run(np.ascontiguousarray(x[start : start + batch_size]), names)
            if not arrays:
                arrays = [np.empty((len(x), *o.shape[1:]), np.float32) for o in outputs]
            for array, output in zip(arrays, outputs, strict=True):
                array[start : start + len(output)] = output
        return arrays


class TeacherFormat(Protocol):
    """One teacher file format: recognise it, inspect it into a signature, open it."""

    name: str

    def sniff(self, head: bytes, size: int) -> bool:
        """Does a file starting with ``head`` (its first 16 bytes) of ``size`` bytes look like
        this format?"""
        ...

    def inspect(self, path: Path, filename: str, config: str | None) -> TeacherInfo:
        """Check the upload and describe it, never running code from it.

        Raises:
            InvalidModel: the file or its ``config`` cannot be used (422).
        """
        ...

    def open(
        self,
        path: Path,
        signature: ModelSignature,
        architecture: dict[str, Any] | None,
        device: torch.device,
    ) -> TeacherBackend:
        """Load the stored teacher frozen, on ``device`` where the runtime can use it."""
        ...


def as_logits(scores: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Class scores ``[N, classes]`` as logits, which every loss and metric takes. Probabilities
    become their log (whose softmax gives them back exactly; a zero becomes the float32 floor);
    log-probabilities already are logits (a softmax ignores a per-row constant)."""
    if kind is OutputKind.PROBABILITIES:
        floor = np.finfo(np.float32).tiny
        logits: np.ndarray = np.log(np.maximum(scores, floor, dtype=np.float32))
        return logits
    return scores
