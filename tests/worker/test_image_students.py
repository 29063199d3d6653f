"""The image student families `resnet` (CIFAR ResNet) and `mobilenet_v2`: shapes, parameter
counts, spec validation, training, ONNX export, feature-layer hooks and a job end to end."""

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.datasets.loading import load_builtin
from app.jobs.schemas import Training
from app.ml.hooks import FeatureTap
from app.ml.layers import feature_layers, last_feature_map
from app.ml.signature import ModelSignature, TextPreprocessing
from app.ml.students import (
    FAMILIES,
    MobilenetV2Spec,
    ResnetSpec,
    StudentSpecBase,
    architecture_of,
    build_model,
    build_student,
    family_of,
    parameter_count,
    parse_spec,
)
from app.ml.students.mobilenet import strides
from app.ml.text import text_model_signature
from app.models import ArtifactFormat
from tests.helpers.api import job_body, upload_safetensors_teacher, upload_teacher
from tests.helpers.teachers import TeacherFiles
from tests.helpers.training import Recorder
from worker.export import write_student
from worker.losses import KDLoss
from worker.pipeline import run_job
from worker.quantize import onnx_predictions, quantize_student
from worker.training.loop import Batch, train

SHAPES = [(3, 32, 32), (3, 12, 12), (1, 28, 28), (1, 8, 8)]
# Small members of each family, for the tests that train or export.
SMALL: dict[str, StudentSpecBase] = {
    "resnet": ResnetSpec(depth=8, width=8),
    "mobilenet_v2": MobilenetV2Spec(width_multiplier=0.5, expansion=4),
}


def resnet_parameters(depth: int, width: int, in_channels: int, classes: int) -> int:
    """He et al. 2016, section 4.2, option A shortcuts (no parameters): stem, 3 stages of n basic
    blocks (two 3x3 convs with batch norm each) of widths w, 2w, 4w, linear classifier."""
    n, w = (depth - 2) // 6, width

    def conv_bn(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout

    total = conv_bn(in_channels, w)
    channels = w
    for stage_width in (w, 2 * w, 4 * w):
        for _ in range(n):
            total += conv_bn(channels, stage_width) + conv_bn(stage_width, stage_width)
            channels = stage_width
    return total + 4 * w * classes + classes


@pytest.mark.parametrize("spec", [ResnetSpec(), MobilenetV2Spec()], ids=lambda s: s.architecture)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_defaults_build_for_image_shapes_and_give_logits(
    spec: StudentSpecBase, shape: tuple[int, int, int]
) -> None:
    signature = ModelSignature.for_tensor(shape, 7)
    assert family_of(spec).accepts(signature) is None
    model = family_of(spec).apply_memory_format(build_model(spec, signature)).eval()
    x = torch.rand(3, *shape).to(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56])
@pytest.mark.parametrize("width", [4, 16, 24])
def test_resnet_parameters_follow_the_formula(depth: int, width: int) -> None:
    model = build_model(
        ResnetSpec(depth=depth, width=width), ModelSignature.for_tensor(SHAPES[0], 10)
    )
    assert parameter_count(model) == resnet_parameters(depth, width, 3, 10)


def test_resnet_20_has_the_papers_parameter_count() -> None:
    cifar = ModelSignature.for_tensor((3, 32, 32), 10)
    resnet_20 = parameter_count(build_model(ResnetSpec(depth=20), cifar))
    assert resnet_20 == 269_722  # the docstring's figure
    assert abs(resnet_20 - 270_000) / 270_000 < 0.02  # the paper's "0.27M" (Table 6)
    assert parameter_count(build_model(ResnetSpec(depth=8), cifar)) < resnet_20
    assert parameter_count(build_model(ResnetSpec(depth=56), cifar)) == 853_018


def test_mobilenet_parameter_counts_and_strides() -> None:
    cifar = ModelSignature.for_tensor((3, 32, 32), 10)
    assert parameter_count(build_model(MobilenetV2Spec(), cifar)) == 584_010
    half = MobilenetV2Spec(width_multiplier=0.5)
    assert parameter_count(build_model(half, cifar)) == 162_922
    # Strides follow the input: CIFAR 32 -> 4, ImageNet 224 -> 7, 12 -> 6, tiny inputs none.
    assert strides(32, 32) == [2, 2, 2, 1, 1]
    assert strides(224, 224) == [2, 2, 2, 2, 2]
    assert strides(12, 12) == [2, 1, 1, 1, 1]
    assert strides(6, 6) == [1, 1, 1, 1, 1]
    for shape, grid in [((3, 32, 32), 4), ((3, 224, 224), 7), ((3, 12, 12), 6), ((1, 8, 8), 4)]:
        layers = feature_layers(MobilenetV2Spec(), ModelSignature.for_tensor(shape, 10))
        assert next(la for la in layers if la.name == "stages.4").shape[1:] == [grid, grid]


def test_specs_are_validated_with_reasons() -> None:
    with pytest.raises(ValidationError, match=r"depth must be 6n \+ 2.*got 10"):
        ResnetSpec(depth=10)
    for bad in ({"width": 2}, {"width": 512}, {"dropout": 1.0}, {"layers": 3}):
        with pytest.raises(ValidationError):
            parse_spec({"architecture": "resnet", **bad})
    for bad in ({"width_multiplier": 0.0}, {"expansion": 0}, {"dropout": -0.1}, {"t": 6}):
        with pytest.raises(ValidationError):
            parse_spec({"architecture": "mobilenet_v2", **bad})
    assert parse_spec({"architecture": "resnet", "depth": 32}) == ResnetSpec(depth=32)
    spec = MobilenetV2Spec(width_multiplier=0.75, dropout=0.2)
    assert parse_spec(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_only_image_inputs_are_accepted(name: str) -> None:
    family = FAMILIES[name]
    assert family.memory_format == "channels_last"
    flat = family.accepts(ModelSignature.for_tensor((64,), 10))
    assert flat is not None and "[C, H, W]" in flat and name in flat
    text = family.accepts(
        text_model_signature(2, preprocessing=TextPreprocessing(max_length=16), token_type_ids=True)
    )
    assert text is not None and "text" in text
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        family.build(family.spec(), ModelSignature.for_tensor((64,), 10))


def synthetic_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 3x12x12 noise told apart by a brighter top half."""
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.rand(n, 3, 12, 12, generator=generator)
    x[:, :, :6] += y.reshape(-1, 1, 1, 1).float()
    return x, y


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_a_short_training_run_lowers_the_loss(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = synthetic_images(96, generator)
    logits = torch.nn.functional.one_hot(y, 2).float() * 4
    signature = ModelSignature.for_tensor((3, 12, 12), 2)
    torch.manual_seed(0)
    spec = SMALL[name]
    student = family_of(spec).apply_memory_format(build_student(spec, signature, fit_inputs=x))
    recorder = Recorder()
    train(
        student,
        KDLoss(),
        Batch(inputs={"input": x[:64]}, labels=y[:64], teacher_logits=logits[:64]),
        Batch(inputs={"input": x[64:]}, labels=y[64:], teacher_logits=logits[64:]),
        Training(epochs=4, batch_size=16, learning_rate=0.01, seed=0),
        recorder,
    )
    losses = [values["train_loss"] for _, values in recorder.epochs]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)], ids=str)
def test_onnx_export_takes_nchw_and_matches_torch(
    name: str, shape: tuple[int, int, int], tmp_path: Path
) -> None:
    """Trained channels-last, exported through the job's path (``write_student``): the graph
    takes ``[batch, C, H, W]`` as the signature says and gives torch's logits."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, *shape, generator=generator) * 255
    signature = ModelSignature.for_tensor(shape, 10)
    torch.manual_seed(0)
    spec = SMALL[name]
    student = family_of(spec).apply_memory_format(build_student(spec, signature, fit_inputs=x))
    # A few training steps, so batch norm's running statistics are not the identity.
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        student(x.to(memory_format=torch.channels_last)).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        expected = student.eval()(x).numpy()
    paths = write_student(tmp_path, student, signature)
    session = ort.InferenceSession(
        str(paths[ArtifactFormat.ONNX]), providers=["CPUExecutionProvider"]
    )
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "input" and graph_input.shape[1:] == list(shape)
    logits = session.run(None, {"input": x.numpy()})[0]
    assert np.allclose(logits, expected, atol=1e-4), np.abs(logits - expected).max()


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_static_int8_quantisation_works(name: str, tmp_path: Path) -> None:
    """What their jobs run (``StudentFamily.int8``: ``static``, as for `cnn`)."""
    assert FAMILIES[name].int8 == "static"
    generator = torch.Generator().manual_seed(0)
    x, _ = synthetic_images(64, generator)
    signature = ModelSignature.for_tensor((3, 12, 12), 2)
    torch.manual_seed(0)
    student = build_student(SMALL[name], signature, fit_inputs=x)
    paths = write_student(tmp_path, student, signature)
    int8 = tmp_path / "model.int8.onnx"
    quantize_student(paths[ArtifactFormat.ONNX], int8, "static", x.numpy())
    inputs = x.numpy()
    agreement = (
        onnx_predictions(int8, inputs) == onnx_predictions(paths[ArtifactFormat.ONNX], inputs)
    ).mean()
    assert agreement >= 0.9


@pytest.mark.parametrize(
    ("spec", "stages"),
    [
        (ResnetSpec(), [[16, 32, 32], [32, 16, 16], [64, 8, 8]]),
        (MobilenetV2Spec(), [[16, 32, 32], [24, 16, 16], [32, 8, 8], [64, 4, 4], [96, 4, 4]]),
    ],
    ids=lambda s: getattr(s, "architecture", ""),
)
def test_stages_are_named_hookable_layers(spec: StudentSpecBase, stages: list[list[int]]) -> None:
    """Feature methods list the stages as ``stages.<i>`` and hook them by that path."""
    signature = ModelSignature.for_tensor((3, 32, 32), 10)
    layers = {layer.name: layer for layer in feature_layers(spec, signature)}
    names = [f"stages.{i}" for i in range(len(stages))]
    assert [layers[name].shape for name in names] == stages
    assert all(layers[name].kind == "Identity" for name in names)
    # The deepest map (FitNets' and AT's default) is the last stage's or the 1x1 head's.
    deepest = last_feature_map(list(layers.values()))
    assert deepest is not None and deepest.name == (
        "stages.2" if spec.architecture == "resnet" else "head.2"
    )
    student = build_student(spec, signature).eval()
    tap = FeatureTap(student, names, root=architecture_of(student))
    logits, features = tap(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [list(f.shape[1:]) for f in features] == stages


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_a_digits_job_with_each_family_succeeds_and_predicts(
    client: TestClient, digits_teacher: TeacherFiles, name: str
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    student = SMALL[name].model_dump(mode="json")
    response = client.post("/v1/jobs", json=job_body(teacher["id"], student=student))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["phase"]) == ("succeeded", "done"), job["error"]
    result = job["result"]
    assert result["student_parameters"] == parameter_count(
        build_model(SMALL[name], ModelSignature.for_tensor((1, 8, 8), 10))
    )
    assert result["student_accuracy"] > 0.5
    data = load_builtin("builtin:digits")
    predicted = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": data.x_test.tolist()})
    assert predicted.status_code == 200, predicted.text
    accuracy = (np.array(predicted.json()["predictions"]) == data.y_test).mean()
    assert accuracy == pytest.approx(result["student_accuracy"])


@pytest.mark.parametrize(
    ("name", "layers", "stored"),
    [
        ("resnet", [{"teacher": "3", "student": "stages.1"}], "stages.1"),
        ("mobilenet_v2", None, "head.2"),  # default: the last feature maps, both 4x4
    ],
)
def test_a_fitnets_job_hooks_a_student_stage(
    client: TestClient,
    digits_cnn_teacher: TeacherFiles,
    name: str,
    layers: list[dict[str, str]] | None,
    stored: str,
) -> None:
    teacher = upload_safetensors_teacher(client, digits_cnn_teacher)
    method: dict[str, Any] = {"method": "fitnets"} | ({"layers": layers} if layers else {})
    body = job_body(
        teacher["id"],
        student=SMALL[name].model_dump(mode="json"),
        distillation=method,
        training={"epochs": 2, "batch_size": 64, "learning_rate": 0.01, "seed": 0},
    )
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["distillation"]["layers"] == [
        {"teacher": "3", "student": stored}
    ]
    job_id = response.json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    assert all(m["values"]["train_fitnets_loss"] > 0 for m in metrics)
