"""safetensors teachers: weights parsed by the safetensors library and loaded into an
architecture Distill builds itself (a registered student family), described by the upload's
``config`` form field. Nothing in the upload is ever executed."""

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from app.errors import InvalidModel
from app.ml.hooks import FeatureTap
from app.ml.layers import activation_bytes, feature_layers, input_bytes
from app.ml.onnx_io import torch_latency_ms
from app.ml.signature import ModelSignature
from app.ml.students import (
    StudentSpec,
    StudentSpecBase,
    build_model,
    family_of,
    parameter_count,
)
from app.ml.teacher_formats.base import (
    ModelInputs,
    ScoresChoice,
    TeacherBackend,
    TeacherInfo,
)

MAX_HEADER = 100 * 1024 * 1024
CONFIG_HELP = (
    "A safetensors teacher needs a `config` form field: "
    '{"architecture": {"architecture": "cnn", "channels": [32, 64], "hidden_sizes": [512]}, '
    '"input_shape": [1, 28, 28], "num_classes": 10}.'
)


class TeacherConfig(BaseModel):
    """The ``config`` sent with a safetensors teacher: the architecture and its input/output."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    architecture: StudentSpec
    input_shape: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(min_length=1, max_length=4)
    num_classes: int = Field(ge=2, le=100_000)

    @property
    def signature(self) -> ModelSignature:
        return ModelSignature.for_tensor(self.input_shape, self.num_classes)


def check_activation_budget(spec: StudentSpecBase, signature: ModelSignature) -> None:
    """Refuse an architecture whose one-sample forward pass needs more activation memory (bytes)
    than the ``max_activation_bytes`` setting; computed without allocating.

    Raises:
        InvalidModel: 422 on field ``config``, with the bytes needed and the budget.
    """
    from app.config import get_settings

    budget = get_settings().max_activation_bytes
    # The input alone first: its size bounds what the meta pass is asked to describe.
    needed, what = input_bytes(signature), "One input sample"
    if needed <= budget:
        needed, what = activation_bytes(spec, signature), "A forward pass of one sample"
    if needed > budget:
        raise InvalidModel(
            f"{what} of input shape {list(signature.input_shape)} needs {needed:,} bytes of "
            f"activation memory, more than the budget of {budget:,} bytes (setting "
            "`max_activation_bytes`, DISTILL_MAX_ACTIVATION_BYTES). Use a smaller input shape "
            "or fewer, narrower layers.",
            field="config",
            activation_bytes=needed,
            budget_bytes=budget,
        )


class TorchTeacher(TeacherBackend):
    def __init__(self, model: nn.Module, signature: ModelSignature, device: torch.device) -> None:
        # Frozen: eval mode (no dropout, running BN statistics) and no gradients.
        self.model = model.eval().requires_grad_(False).to(device)
        self.signature, self.device = signature, device

    def run(self, batch: ModelInputs, names: list[str] | None) -> list[np.ndarray]:
        assert isinstance(batch, np.ndarray)  # safetensors teachers take float tensors
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if names is None:
                outputs = [self.model(x)]
            else:
                tap = FeatureTap(self.model, names)
                try:
                    outputs = tap(x)[1]
                finally:
                    tap.remove()
        return [t.float().cpu().numpy() for t in outputs]

    def latency_ms(self, batch: int = 1) -> float:
        latency = torch_latency_ms(self.model, self.signature, batch)
        self.model.to(self.device)  # the export moved it to the CPU
        return latency


class SafetensorsFormat:
    name = "safetensors"

    def sniff(self, head: bytes, size: int) -> bool:
        if len(head) < 9:
            return False
        header_len = int.from_bytes(head[:8], "little")
        return 0 < header_len <= min(size - 8, MAX_HEADER) and head[8:9] == b"{"

    def inspect(self, path: Path, filename: str, config: str | None) -> TeacherInfo:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if config is None:
            raise InvalidModel(CONFIG_HELP)
        try:
            teacher_config = TeacherConfig.model_validate(json.loads(config))
        except (ValueError, ValidationError, RecursionError) as e:  # RecursionError: deep nesting
            raise InvalidModel(
                f"`config` is not a valid teacher config: {e}", field="config"
            ) from e
        signature = teacher_config.signature
        try:
            # The activation budget first (a meta forward pass), so the config's shapes are
            # checked, then compared with the file's header, before any memory is taken: a tiny
            # upload cannot make the API allocate gigabytes.
            check_activation_budget(teacher_config.architecture, signature)
            with torch.device("meta"):
                skeleton = build_model(teacher_config.architecture, signature)
            with safe_open(str(path), framework="pt") as f:
                stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InvalidModel(f"The safetensors file or the `config` cannot be used: {e}") from e
        expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        if stored != expected:
            differing = sorted(set(stored) ^ set(expected)) or sorted(
                n for n in expected if stored[n] != expected[n]
            )
            raise InvalidModel(
                f"The weights do not fit the architecture in `config` (first differences: "
                f"{differing[:5]})."
            )
        # No real forward pass: the meta one (``check_activation_budget``) ran every layer on
        # the config's shapes, and the stored shapes equal the architecture's, so the weights
        # load; only their values are left to check.
        state = load_file(str(path))
        if any(not t.is_floating_point() and t.numel() > 1 for t in state.values()):
            raise InvalidModel("Weights must be floating point.")
        # float32 for the check: torch has no isfinite for float8 types.
        if not all(
            bool(torch.isfinite(t.float()).all()) for t in state.values() if t.is_floating_point()
        ):
            raise InvalidModel("The weights contain NaN or infinite values.")
        return TeacherInfo(
            format=self.name,
            signature=signature,
            parameter_count=parameter_count(skeleton),
            scores_choice=ScoresChoice(output=signature.scores.name, by="only"),
            architecture=teacher_config.model_dump(mode="json"),
            feature_layers=feature_layers(teacher_config.architecture, signature),
        )

    def open(
        self,
        path: Path,
        signature: ModelSignature,
        architecture: dict[str, Any] | None,
        device: torch.device,
    ) -> TorchTeacher:
        from safetensors.torch import load_file

        teacher_config = TeacherConfig.model_validate(architecture)
        # Built on the meta device and given the stored tensors: no initialisation, so opening a
        # teacher neither costs time nor draws from the random generator the student is seeded by.
        with torch.device("meta"):
            model = build_model(teacher_config.architecture, signature)
        model.load_state_dict(load_file(str(path)), strict=True, assign=True)
        # The family's layout (channels-last convolutions) speeds the teacher as it does students.
        family_of(teacher_config.architecture).apply_memory_format(model)
        return TorchTeacher(model, signature, device)


SAFETENSORS = SafetensorsFormat()
