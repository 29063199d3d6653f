"""Feature methods in the loop: hooks, teacher outputs from either format, adapters trained with
the student and restored on resume."""

from pathlib import Path

import numpy as np
import torch

from app.datasets.loading import load_builtin
from app.jobs.methods import FitNets
from app.jobs.schemas import Training
from app.ml.hooks import FeatureTap
from app.ml.signature import ModelSignature
from app.ml.students import CnnSpec, build_model, build_student
from app.ml.teacher_formats import FORMATS
from app.ml.teacher_formats.safetensors import TorchTeacher
from tests.helpers.teachers import TeacherFiles
from tests.helpers.training import Recorder
from worker.checkpoints import load_checkpoint, save_checkpoint
from worker.losses import build_loss
from worker.training.loop import Batch, LoopState, train

IMAGE = (1, 8, 8)
SIGNATURE = ModelSignature.for_tensor(IMAGE, 3)


def test_tap_returns_the_named_outputs_and_keeps_nothing_after() -> None:
    model = build_model(CnnSpec(channels=[4], hidden_sizes=[6]), SIGNATURE).eval()
    x = torch.randn(5, *IMAGE)
    tap = FeatureTap(model, ["3", "6", "3"])
    logits, (pooled, hidden, again) = tap(x)
    assert torch.equal(logits, model(x))
    assert torch.equal(pooled, model[:4](x)) and pooled is again
    assert torch.equal(hidden, model[:7](x))
    assert tap._outputs is None  # a plain call in between holds nothing
    tap.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_onnx_extra_outputs_equal_the_hooked_torch_layer(digits_cnn_teacher: TeacherFiles) -> None:
    x = load_builtin("builtin:digits").x_train[:100]
    cpu = torch.device("cpu")
    signature = ModelSignature.for_tensor(IMAGE, 10)
    onnx = FORMATS["onnx"].open(digits_cnn_teacher.onnx, signature, None, cpu)
    torch_twin = FORMATS["safetensors"].open(
        digits_cnn_teacher.safetensors, signature, digits_cnn_teacher.config, cpu
    )
    (from_onnx,) = onnx.features(x, ["features"], batch_size=32)
    (from_torch,) = torch_twin.features(x, ["3"], batch_size=32)
    assert from_onnx.shape == (100, 16, 4, 4) and from_onnx.dtype == np.float32
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-5)
    assert isinstance(torch_twin, TorchTeacher) and not torch_twin.model.training
    assert not any(m._forward_hooks for m in torch_twin.model.modules())  # tap removed


def feature_splits() -> tuple[Batch, Batch]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, *IMAGE, generator=generator)
    torch.manual_seed(1)
    teacher = build_model(CnnSpec(channels=[4]), SIGNATURE).eval()
    with torch.no_grad():
        logits, (maps,) = FeatureTap(teacher, ["3"])(x)
    y = logits.argmax(-1)
    return (
        Batch({"input": x[:96]}, y[:96], logits[:96], (maps[:96],)),
        Batch({"input": x[96:]}, y[96:], logits[96:]),
    )


def fresh_student_and_loss() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_student(CnnSpec(channels=[2]), SIGNATURE)
    loss = build_loss(
        FitNets(method="fitnets", temperature=4.0, alpha=0.5, weight=1.0), [((2, 4, 4), (4, 4, 4))]
    )
    return student, loss


def fitnets_run(
    training: Training, resume: LoopState | None = None, checkpoints: list[LoopState] | None = None
) -> tuple[torch.nn.Module, torch.nn.Module, Recorder]:
    student, loss = fresh_student_and_loss()
    recorder = Recorder()
    train_split, val_split = feature_splits()
    train(
        student,
        loss,
        train_split,
        val_split,
        training,
        recorder,
        resume=resume,
        student_tap=FeatureTap(student, ["3"], root=student[1]),
    )
    if checkpoints is not None:
        checkpoints += recorder.checkpoints
    return student, loss, recorder


def test_fitnets_trains_its_adapter_and_resumes_exactly(tmp_path: Path) -> None:
    training = Training(epochs=4, batch_size=16, learning_rate=0.01)
    _, untrained = fresh_student_and_loss()
    checkpoints: list[LoopState] = []
    straight, straight_loss, recorder = fitnets_run(training, checkpoints=checkpoints)
    losses = [values["train_fitnets_loss"] for _, values in recorder.epochs]
    assert losses[-1] < losses[0]
    assert {"train_ce_loss", "train_kd_loss", "train_fitnets_loss"} <= set(recorder.epochs[0][1])
    adapter = "criterion.adapters.0.weight"
    assert adapter in straight_loss.state_dict()
    assert straight_loss.state_dict()[adapter].shape == (4, 2, 1, 1)
    assert not torch.equal(straight_loss.state_dict()[adapter], untrained.state_dict()[adapter])

    path = tmp_path / "last.safetensors"
    save_checkpoint(checkpoints[1], path)  # as if the worker died after epoch 2
    state = load_checkpoint(path)
    assert state is not None and adapter in state.loss_state
    resumed, resumed_loss, recorder = fitnets_run(training, resume=state)
    assert [epoch for epoch, _ in recorder.epochs] == [3, 4]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert torch.equal(straight_loss.state_dict()[adapter], resumed_loss.state_dict()[adapter])
