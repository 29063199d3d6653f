"""Recognise and check an uploaded teacher without running anything it contains.

Pickle-based checkpoints (``torch.save`` files, raw pickles) are recognised by their bytes and
refused: unpickling runs arbitrary code. ONNX is checked by onnxruntime (no custom-op libraries
are ever registered); safetensors is parsed by the safetensors library and loaded into an
architecture that Distill builds itself.
"""

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidModel, PickleRefused, UnsupportedFormat
from app.ml.architectures import ModelSpec, build_model, parameter_count
from app.ml.layers import FeatureLayer, feature_layers
from app.models import TeacherFormat

EXPORT_HELP = (
    "Export the model instead: to ONNX with "
    "`torch.onnx.export(model.eval(), (example_batch,), 'teacher.onnx', input_names=['input'], "
    "output_names=['logits'], dynamic_shapes=({0: torch.export.Dim('batch')},))`, or, for an "
    "`mlp` or `cnn` architecture, to safetensors with "
    "`safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors')` uploaded with a "
    "`config` describing the architecture."
)
PICKLE_PROTOCOL_OPCODE = 0x80
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class TeacherConfig(BaseModel):
    """The ``config`` sent with a safetensors teacher: the architecture and its input/output."""

    model_config = ConfigDict(extra="forbid")
    architecture: ModelSpec
    input_shape: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(min_length=1, max_length=4)
    num_classes: int = Field(ge=2, le=100_000)


@dataclass(frozen=True)
class TeacherInfo:
    format: TeacherFormat
    input_shape: list[int]
    num_classes: int
    parameter_count: int
    input_name: str | None = None
    output_name: str | None = None
    architecture: dict[str, Any] | None = None
    feature_layers: list[FeatureLayer] = field(default_factory=list)


def _zip_kind(path: Path) -> str | None:
    """'pickle' for a torch.save zip, 'torchscript', 'other' for any other zip; None if no zip."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "other"
    if any(n.startswith("code/") or "/code/" in n for n in names):
        return "torchscript"
    return "pickle" if any(n.endswith(".pkl") for n in names) else "other"


def _safetensors_header(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= min(size - 8, MAX_SAFETENSORS_HEADER) and head[8:9] == b"{"


def inspect_teacher(path: Path, filename: str, config: str | None) -> TeacherInfo:
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:1] == bytes([PICKLE_PROTOCOL_OPCODE]) and 2 <= head[1] <= 5:
        raise PickleRefused(
            f"`{filename}` is a Python pickle, which Distill never loads. {EXPORT_HELP}"
        )
    zip_kind = _zip_kind(path)
    if zip_kind == "pickle":
        raise PickleRefused(
            f"`{filename}` is a torch.save checkpoint (a zip holding a pickle), which Distill "
            f"never loads. {EXPORT_HELP}"
        )
    if zip_kind == "torchscript":
        raise UnsupportedFormat(
            f"`{filename}` is a TorchScript archive: it is code, and Distill does not run uploaded "
            f"code. {EXPORT_HELP}"
        )
    if zip_kind == "other":
        raise UnsupportedFormat(f"`{filename}` is a zip archive, not a model. {EXPORT_HELP}")
    if _safetensors_header(head, size):
        return _inspect_safetensors(path, config)
    if config is not None:
        raise InvalidModel("`config` goes with a safetensors file, and this is not one.")
    if Path(filename).suffix.lower() in {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}:
        raise PickleRefused(
            f"`{filename}` is neither ONNX nor safetensors; files of this kind usually hold a "
            f"pickle, which Distill never loads. {EXPORT_HELP}"
        )
    return _inspect_onnx(path, filename)


def _static_dims(shape: list[Any], what: str) -> list[int]:
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise InvalidModel(
            f"The model's {what} must have fixed sizes beyond the batch dimension; got {shape}."
        )
    return list(shape)


def _inspect_onnx(path: Path, filename: str) -> TeacherInfo:
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types on corrupt bytes
        raise InvalidModel(
            f"`{filename}` is not a valid ONNX model (truncated or corrupt): {e}. Upload an ONNX "
            "or safetensors file."
        ) from e
    from onnx.external_data_helper import _get_all_tensors

    # Anywhere in the graph (initializers, node attributes, subgraphs): external data would make
    # onnxruntime read files beside the upload.
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
        raise InvalidModel(
            "ONNX models with external data files are not accepted; save it as one file."
        )
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InvalidModel(f"onnxruntime cannot load `{filename}`: {e}") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise InvalidModel(
            f"A teacher takes one input tensor and returns logits first; this model has "
            f"{len(inputs)} inputs and {len(outputs)} outputs."
        )
    if inputs[0].type != "tensor(float)":
        raise InvalidModel(f"The model's input must be float32, not {inputs[0].type}.")
    input_shape = _static_dims(list(inputs[0].shape[1:]), "input")
    output_shape = list(outputs[0].shape)
    if len(output_shape) != 2:
        raise InvalidModel(
            f"The model's first output must be logits [batch, classes]; got {output_shape}."
        )
    num_classes = _static_dims(output_shape[1:], "output")[0]
    # Weights are the floating-point initializers; integer ones are shapes and indices.
    float_types = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
    parameters = sum(
        math.prod(t.dims) for t in model.graph.initializer if t.data_type in float_types
    )
    return TeacherInfo(
        format=TeacherFormat.ONNX,
        input_shape=input_shape,
        num_classes=num_classes,
        parameter_count=parameters,
        input_name=inputs[0].name[:255],
        output_name=outputs[0].name[:255],
        # Intermediate tensors a feature method can match are the graph's further outputs.
        feature_layers=[
            FeatureLayer(name=output.name, shape=list(output.shape[1:]))
            for output in outputs[1:]
            if len(output.shape) >= 2
            and output.type == "tensor(float)"
            and all(isinstance(d, int) and d > 0 for d in output.shape[1:])
            and len(output.name) <= 255
        ],
    )


def _inspect_safetensors(path: Path, config: str | None) -> TeacherInfo:
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if config is None:
        raise InvalidModel(
            "A safetensors teacher needs a `config` form field: "
            '{"architecture": {"architecture": "cnn", "channels": [32, 64], '
            '"hidden_sizes": [512]}, '
            '"input_shape": [1, 28, 28], "num_classes": 10}.'
        )
    try:
        teacher_config = TeacherConfig.model_validate(json.loads(config))
    except (ValueError, ValidationError) as e:
        raise InvalidModel(f"`config` is not a valid teacher config: {e}", field="config") from e
    shape = tuple(teacher_config.input_shape)
    try:
        # On the meta device first: the config's shapes are compared with the file's header
        # before any memory is taken, so a tiny upload cannot make the API allocate gigabytes.
        with torch.device("meta"):
            skeleton = build_model(teacher_config.architecture, shape, teacher_config.num_classes)
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
    state = load_file(str(path))
    model = build_model(teacher_config.architecture, shape, teacher_config.num_classes)
    model.load_state_dict(state, strict=True)
    if any(not t.is_floating_point() and t.numel() > 1 for t in state.values()):
        raise InvalidModel("Weights must be floating point.")
    with torch.inference_mode():
        model.eval()(torch.zeros(1, *teacher_config.input_shape))
    if not all(
        np.isfinite(t.float().numpy()).all() for t in state.values() if t.is_floating_point()
    ):
        raise InvalidModel("The weights contain NaN or infinite values.")
    return TeacherInfo(
        format=TeacherFormat.SAFETENSORS,
        input_shape=teacher_config.input_shape,
        num_classes=teacher_config.num_classes,
        parameter_count=parameter_count(model),
        architecture=teacher_config.model_dump(mode="json"),
        feature_layers=feature_layers(
            teacher_config.architecture, shape, teacher_config.num_classes
        ),
    )
