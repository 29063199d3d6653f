"""Tiny teachers trained on digits, saved as ONNX and as safetensors."""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.ml.onnx_io import export_onnx
from app.ml.signature import ModelSignature
from app.ml.students import CnnSpec, MlpSpec, build_model


@dataclass(frozen=True)
class TeacherFiles:
    onnx: Path
    safetensors: Path
    config: dict[str, object]
    test_accuracy: float


def train_digits_teacher(
    spec: MlpSpec | CnnSpec, directory: Path, onnx_features: str | None = None
) -> TeacherFiles:
    """Full-batch Adam on digits for a few seconds; saved as ONNX and as safetensors. With
    ``onnx_features`` (a module path), the ONNX graph also outputs that layer as ``features``."""
    from app.datasets.loading import load_builtin

    data = load_builtin("builtin:digits")
    torch.manual_seed(0)
    signature = ModelSignature.for_tensor(data.input_shape, 10)
    model = build_model(spec, signature)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(data.x_test)).argmax(-1).numpy()
    if onnx_features is None:
        export_onnx(model, signature, directory / "teacher.onnx")
    else:
        torch.onnx.export(
            WithFeatures(model, onnx_features).eval(),
            (torch.zeros(2, *data.input_shape),),
            str(directory / "teacher.onnx"),
            input_names=["input"],
            output_names=["logits", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    save_file(model.state_dict(), str(directory / "teacher.safetensors"))
    teacher_config = {
        "architecture": spec.model_dump(mode="json"),
        "input_shape": [1, 8, 8],
        "num_classes": 10,
    }
    return TeacherFiles(
        onnx=directory / "teacher.onnx",
        safetensors=directory / "teacher.safetensors",
        config=teacher_config,
        test_accuracy=float((predictions == data.y_test).mean()),
    )


class WithFeatures(torch.nn.Module):
    """A model that returns ``(logits, output of the layer at path)``: how a user exports an
    ONNX teacher whose intermediate features a feature method can match."""

    def __init__(self, model: torch.nn.Module, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        handle = self.model.get_submodule(self.path).register_forward_hook(
            lambda module, args, output: features.append(output)
        )
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, features[0]
