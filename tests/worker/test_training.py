"""The loop on tiny data: schedules, early stopping, checkpoints, exact resume; the teacher cache;
a frozen teacher; the evaluation metrics on known cases."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.jobs.schemas import Training
from app.ml.signature import ModelSignature
from app.ml.students import MlpSpec, build_model, build_student
from app.ml.teacher_formats import FORMATS
from app.ml.teacher_formats.safetensors import TorchTeacher
from tests.helpers.training import Recorder
from worker.checkpoints import load_checkpoint, save_checkpoint
from worker.evaluation import expected_calibration_error, kl_to_teacher, per_class_accuracy
from worker.losses import KDLoss
from worker.teacher_cache import cache_key, cached_teacher_logits, compress_top_k, expand_top_k
from worker.teachers import ensemble_logits
from worker.training.loop import Batch, LoopState, learning_rate, train


def batch(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> Batch:
    return Batch(inputs={"input": x}, labels=y, teacher_logits=logits)


def splits() -> tuple[Batch, Batch]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator)
    teacher = torch.nn.Linear(6, 3)
    with torch.no_grad():
        logits = teacher(x)
    y = logits.argmax(-1)
    return batch(x[:160], y[:160], logits[:160]), batch(x[160:], y[160:], logits[160:])


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(MlpSpec(hidden_sizes=[8]), ModelSignature.for_tensor((6,), 3))


def run(
    training: Training, resume: LoopState | None = None, checkpoints: list[LoopState] | None = None
) -> tuple[torch.nn.Module, Recorder, LoopState]:
    model, recorder = student(), Recorder()
    train_split, val_split = splits()
    outcome = train(
        model,
        KDLoss(),
        train_split,
        val_split,
        training,
        recorder,
        resume=resume,
    )
    if checkpoints is not None:
        checkpoints += recorder.checkpoints
    return model, recorder, outcome.state


def test_resume_from_a_checkpoint_is_exact(tmp_path: Path) -> None:
    training = Training(epochs=4, batch_size=16, learning_rate=0.01, schedule="cosine")
    straight, _, _ = run(training)
    checkpoints: list[LoopState] = []
    run(training.model_copy(update={"epochs": 4}), checkpoints=checkpoints)
    path = tmp_path / "last.safetensors"
    save_checkpoint(checkpoints[1], path)  # as if the worker died after epoch 2
    state = load_checkpoint(path)
    assert state is not None and state.epoch == 2
    resumed, recorder, final = run(training, resume=state)
    assert [epoch for epoch, _ in recorder.epochs] == [3, 4]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert final.epoch == 4


def test_sgd_checkpoint_round_trip(tmp_path: Path) -> None:
    checkpoints: list[LoopState] = []
    run(
        Training(epochs=1, batch_size=32, optimizer="sgd", weight_decay=1e-4),
        checkpoints=checkpoints,
    )
    save_checkpoint(checkpoints[0], tmp_path / "c.safetensors")
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded is not None
    assert loaded.optimizer_state["param_groups"][0]["momentum"] == 0.9  # type: ignore[index]
    assert load_checkpoint(tmp_path / "missing.safetensors") is None


def test_metrics_per_epoch_and_best_student() -> None:
    _, recorder, state = run(Training(epochs=3, batch_size=16, learning_rate=0.01))
    assert [e for e, _ in recorder.epochs] == [1, 2, 3]
    values = recorder.epochs[-1][1]
    for key in (
        "train_loss",
        "train_kd_loss",
        "train_ce_loss",
        "val_accuracy",
        "val_agreement",
        "val_kl_to_teacher",
        "val_ece",
        "teacher_val_accuracy",
        "learning_rate",
    ):
        assert key in values
    assert values["teacher_val_accuracy"] == 1.0
    best = max(v["val_accuracy"] for _, v in recorder.epochs)
    assert state.best_val_accuracy == best


def test_early_stopping() -> None:
    # A learning rate of ~0 cannot improve on epoch 1: patience 2 stops after epoch 3.
    training = Training(epochs=10, batch_size=16, learning_rate=1e-12, early_stopping_patience=2)
    _, recorder, state = run(training)
    assert [e for e, _ in recorder.epochs] == [1, 2, 3]
    assert state.best_epoch == 1


def test_learning_rate_schedules() -> None:
    cosine = Training(learning_rate=0.1, schedule="cosine")
    assert learning_rate(cosine, 0, 100, 10) == pytest.approx(0.1)
    assert learning_rate(cosine, 50, 100, 10) == pytest.approx(0.05)
    assert learning_rate(cosine, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = Training(learning_rate=0.1, schedule="step", step_epochs=2, step_gamma=0.5)
    assert [learning_rate(step, s, 100, 10) for s in (0, 19, 20, 40)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.025]
    )
    assert learning_rate(Training(learning_rate=0.3), 77, 100, 10) == 0.3


def test_gradient_clipping_bounds_the_update() -> None:
    _, recorder, _ = run(Training(epochs=1, batch_size=16, grad_clip_norm=1e-6, learning_rate=0.01))
    assert recorder.epochs


def test_teacher_cache_computes_once(tmp_path: Path) -> None:
    calls = []

    def compute(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, :2] * 2

    splits_ = {"train": np.ones((5, 3), np.float32), "test": np.zeros((2, 3), np.float32)}
    key = cache_key("teacher-sha", "dataset-digest")
    first, hit = cached_teacher_logits(tmp_path, key, splits_, compute)
    assert not hit and calls == [5, 2]
    second, hit = cached_teacher_logits(tmp_path, key, splits_, compute)
    assert hit and calls == [5, 2]
    assert np.array_equal(first["train"], second["train"])
    assert cache_key("teacher-sha", "other") != key


def test_teacher_cache_evicts_the_least_recently_used(tmp_path: Path) -> None:
    splits = {"train": np.zeros((4, 2), np.float32)}

    def compute(x: np.ndarray) -> np.ndarray:
        return np.ones((len(x), 3), np.float32)

    for key in ("a", "b"):
        cached_teacher_logits(tmp_path, key, splits, compute)
    entry = {key: tmp_path / f"{key}.safetensors" for key in "abc"}
    os.utime(entry["a"], (1000, 1000))
    os.utime(entry["b"], (2000, 2000))
    _, hit = cached_teacher_logits(tmp_path, "a", splits, compute)  # a is used again
    assert hit
    size = entry["a"].stat().st_size
    cached_teacher_logits(tmp_path, "c", splits, compute, max_bytes=2 * size)
    assert entry["a"].exists() and entry["c"].exists() and not entry["b"].exists()
    _, hit = cached_teacher_logits(tmp_path, "b", splits, compute, max_bytes=size // 2)
    assert not hit and entry["b"].exists()  # the entry just written stays, whatever its size
    assert not entry["a"].exists() and not entry["c"].exists()


def test_safetensors_teacher_is_frozen_in_eval_mode(tmp_path: Path) -> None:
    spec = MlpSpec(hidden_sizes=[16], dropout=0.5)
    signature = ModelSignature.for_tensor((4,), 3)
    model = build_model(spec, signature)
    save_file(model.state_dict(), str(tmp_path / "t.safetensors"))
    config = {"architecture": spec.model_dump(), "input_shape": [4], "num_classes": 3}
    runner = FORMATS["safetensors"].open(
        tmp_path / "t.safetensors", signature, config, torch.device("cpu")
    )
    assert isinstance(runner, TorchTeacher) and not runner.model.training
    assert not any(p.requires_grad for p in runner.model.parameters())
    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    assert np.array_equal(runner.logits(x), runner.logits(x))  # dropout is off
    (first,) = runner.features(x, ["2"])  # the ReLU before dropout: its outputs as stored
    (again,) = runner.features(x, ["3"])  # after dropout: identical in eval mode
    assert np.array_equal(first, again) and first.shape == (32, 16)
    assert not runner.model.training and all(p.grad is None for p in runner.model.parameters())


def test_kl_to_teacher_known_case() -> None:
    student, teacher = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_to_teacher(student, teacher) == pytest.approx(expected)
    assert kl_to_teacher(teacher, teacher) == pytest.approx(0.0, abs=1e-12)


def test_expected_calibration_error_known_cases() -> None:
    # Confidence 0.75 on every sample (2 classes, logits [0, ln 3]); 3 of 4 correct: ECE 0.
    logits = torch.tensor([[0.0, math.log(3.0)]] * 4)
    assert expected_calibration_error(logits, torch.tensor([1, 1, 1, 0])) == pytest.approx(
        0.0, abs=1e-6
    )
    # All wrong at confidence 0.75: ECE 0.75. All right: ECE 0.25.
    assert expected_calibration_error(logits, torch.tensor([0, 0, 0, 0])) == pytest.approx(0.75)
    assert expected_calibration_error(logits, torch.tensor([1, 1, 1, 1])) == pytest.approx(0.25)


def test_per_class_accuracy() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    assert per_class_accuracy(logits, labels, 3) == [1.0, 0.5, None]


def test_ensemble_logits_average_softened_distributions() -> None:
    a = np.array([[0.0, math.log(3.0)]], dtype=np.float32)  # softmax at T=1: [1/4, 3/4]
    b = np.array([[0.0, 0.0]], dtype=np.float32)  # [1/2, 1/2]
    z = ensemble_logits([a, b], [0.5, 0.5], temperature=1.0)
    assert np.allclose(torch.softmax(torch.from_numpy(z), -1).numpy(), [[0.375, 0.625]], atol=1e-6)
    # At T=2 the mixture is of softmax(z_i / 2), and softmax(z / 2) reproduces it.
    z2 = ensemble_logits([a, b], [0.25, 0.75], temperature=2.0)
    p_a = torch.softmax(torch.from_numpy(a) / 2, -1)
    expected = 0.25 * p_a + 0.75 * torch.tensor([[0.5, 0.5]])
    assert torch.allclose(torch.softmax(torch.from_numpy(z2) / 2, -1), expected, atol=1e-6)
    assert ensemble_logits([a], [1.0], 4.0) is a


def test_top_k_keeps_the_head_exact_and_the_tail_mass() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 2000)).astype(np.float32) * 3
    dense = expand_top_k(compress_top_k(logits, 64))
    p_true = torch.softmax(torch.from_numpy(logits).double(), -1)
    p_back = torch.softmax(torch.from_numpy(dense).double(), -1)
    top = torch.topk(p_true, 64, dim=-1).indices
    assert torch.allclose(p_back.gather(-1, top), p_true.gather(-1, top), rtol=1e-4, atol=1e-7)
    tail_true = 1 - p_true.gather(-1, top).sum(-1)
    tail_back = 1 - p_back.gather(-1, top).sum(-1)
    assert torch.allclose(tail_back, tail_true, rtol=1e-3, atol=1e-6)
    assert (dense.argmax(-1) == logits.argmax(-1)).all()


def test_large_output_spaces_are_cached_as_top_k(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    wide = rng.normal(size=(4, 5000)).astype(np.float32)
    first, hit = cached_teacher_logits(tmp_path, "k", {"train": x}, lambda _: wide)
    second, hit_again = cached_teacher_logits(tmp_path, "k", {"train": x}, lambda _: wide)
    assert (hit, hit_again) == (False, True)
    assert np.array_equal(first["train"], second["train"])  # the first job saw the cached form
    assert first["train"].shape == (4, 5000)
    on_disk = (tmp_path / "k.safetensors").stat().st_size
    assert on_disk < wide.nbytes / 10


def test_compiled_training_matches_eager_with_plain_state_keys() -> None:
    """`compile` trains through torch.compile; checkpoints and exports see the plain student."""
    training = Training(epochs=1, batch_size=16, learning_rate=0.01)
    eager, _, _ = run(training)
    compiled, _, state = run(training.model_copy(update={"compile": True}))
    assert compiled.state_dict().keys() == eager.state_dict().keys() == state.best_state.keys()
    for key, value in eager.state_dict().items():
        assert torch.allclose(value, compiled.state_dict()[key], atol=1e-5), key
