"""Run an uploaded teacher, frozen: ONNX through onnxruntime, safetensors through our own
architectures. Its logits (and a feature method's hooked outputs) are computed once per job, never
per training step: without augmentation the inputs never change."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from app.ml.architectures import build_model
from app.models import TeacherFormat
from app.teachers.inspection import TeacherConfig
from worker.features import FeatureTap


class TeacherRunner:
    """Logits of a frozen teacher for float32 arrays shaped ``[N, *input_shape]``."""

    def __init__(
        self, path: Path, fmt: str, architecture: dict[str, Any] | None, device: torch.device
    ) -> None:
        self.device = device
        self.model: nn.Module | None = None
        self.session: Any = None
        if fmt == TeacherFormat.ONNX:
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.input_name = self.session.get_inputs()[0].name
        else:
            config = TeacherConfig.model_validate(architecture)
            model = build_model(config.architecture, tuple(config.input_shape), config.num_classes)
            model.load_state_dict(load_file(str(path)))
            # Frozen: eval mode (no dropout, running BN statistics) and no gradients.
            self.model = model.eval().requires_grad_(False).to(device)

    def logits(
        self, x: np.ndarray, batch_size: int = 1024, on_batch: Callable[[], None] | None = None
    ) -> np.ndarray:
        """``on_batch`` runs after every batch (the worker's heartbeat on long passes)."""
        chunks = []
        for start in range(0, len(x), batch_size):
            if on_batch is not None:
                on_batch()
            batch = np.ascontiguousarray(x[start : start + batch_size])
            if self.session is not None:
                chunks.append(self.session.run(None, {self.input_name: batch})[0])
            else:
                assert self.model is not None
                with torch.inference_mode():
                    out = self.model(torch.from_numpy(batch).to(self.device))
                chunks.append(out.float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32)

    def features(
        self,
        x: np.ndarray,
        names: list[str],
        batch_size: int = 1024,
        on_batch: Callable[[], None] | None = None,
    ) -> list[np.ndarray]:
        """The outputs at ``names`` (module paths, or extra ONNX outputs) for every sample,
        float32, written into arrays allocated once (they can be the job's largest)."""
        tap = FeatureTap(self.model, names) if self.model is not None else None
        arrays: list[np.ndarray] = []
        try:
            for start in range(0, len(x), batch_size):
                if on_batch is not None:
                    on_batch()
                batch = np.ascontiguousarray(x[start : start + batch_size])
                if tap is None:
                    outputs = self.session.run(names, {self.input_name: batch})
                else:
                    with torch.inference_mode():
                        _, tensors = tap(torch.from_numpy(batch).to(self.device))
                    outputs = [t.float().cpu().numpy() for t in tensors]
                if not arrays:
                    arrays = [np.empty((len(x), *o.shape[1:]), np.float32) for o in outputs]
                for array, output in zip(arrays, outputs, strict=True):
                    array[start : start + len(output)] = output
        finally:
            if tap is not None:
                tap.remove()
        return arrays


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
