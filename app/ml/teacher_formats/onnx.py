"""ONNX teachers: checked and run by onnxruntime, with no custom-op libraries ever registered.

The signature comes from the graph's first input and output; further float outputs are the
intermediate tensors feature methods can match.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import InvalidModel
from app.ml.layers import FeatureLayer
from app.ml.onnx_io import onnx_latency_ms
from app.ml.signature import MAX_RANK, ModelSignature
from app.ml.teacher_formats.base import TeacherBackend, TeacherInfo


def _static_dims(shape: list[Any], what: str) -> list[int]:
    if not all(isinstance(d, int) and d > 0 for d in shape) or len(shape) > MAX_RANK:
        raise InvalidModel(
            f"The model's {what} must have fixed sizes beyond the batch dimension (at most "
            f"{MAX_RANK} of them); got {shape}."
        )
    return list(shape)


class OnnxTeacher(TeacherBackend):
    def __init__(self, path: Path, signature: ModelSignature, device: torch.device) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path, self.signature = path, signature
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray, names: list[str] | None) -> list[np.ndarray]:
        outputs = list(self.session.run(names, {self.input_name: batch}))
        return outputs if names is not None else outputs[:1]  # the scores come first

    def latency_ms(self) -> float:
        return onnx_latency_ms(self.path, self.signature)


class OnnxFormat:
    name = "onnx"

    def sniff(self, head: bytes, size: int) -> bool:
        return True  # protobuf has no magic bytes: ONNX is what is tried last

    def inspect(self, path: Path, filename: str, config: str | None) -> TeacherInfo:
        import onnx
        import onnxruntime as ort
        from onnx.external_data_helper import _get_all_tensors

        if config is not None:
            raise InvalidModel("`config` goes with a safetensors file, and this is not one.")
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises several types on corrupt bytes
            raise InvalidModel(
                f"`{filename}` is not a valid ONNX model (truncated or corrupt): {e}. Upload an "
                "ONNX or safetensors file."
            ) from e
        # Anywhere in the graph (initializers, node attributes, subgraphs): external data would
        # make onnxruntime read files beside the upload.
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
            raise InvalidModel(
                "ONNX models with external data files are not accepted; save it as one file "
                "(`torch.onnx.export(..., external_data=False)`, or "
                "`onnx.save(model, path, save_as_external_data=False)`).",
                field="file",
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
            format=self.name,
            signature=ModelSignature.for_tensor(
                input_shape,
                num_classes,
                input_name=inputs[0].name[:255],
                output_name=outputs[0].name[:255],
            ),
            parameter_count=parameters,
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

    def open(
        self,
        path: Path,
        signature: ModelSignature,
        architecture: dict[str, Any] | None,
        device: torch.device,
    ) -> OnnxTeacher:
        return OnnxTeacher(path, signature, device)


ONNX = OnnxFormat()
