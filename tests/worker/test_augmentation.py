"""Training augmentation (``worker.augment``), the mixed-label loss, the online teacher in a job
run in process, and the refusals at submission."""

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from app.datasets.loading import load_builtin
from app.jobs.schemas import Augmentation, DistillationSpec
from tests.helpers.api import job_body, npz_bytes, upload_teacher
from tests.helpers.onnx_teachers import fit_mlp, write_onnx_teacher
from tests.helpers.teachers import TeacherFiles
from worker.augment import (
    Augmenter,
    color_jitter,
    crop_boxes,
    cutmix,
    cutmix_box,
    horizontal_flip,
    mixup,
    resized_crop,
    step_generator,
)
from worker.losses.kd import KDLoss
from worker.losses.mixed import mixed_cross_entropy, mixed_label_loss
from worker.pipeline import run_job
from worker.recipe import DistillationRecipe, OnlineTeacher, RecipeInputs
from worker.teachers import TeacherRecord


def images(n: int = 8, channels: int = 3, height: int = 12, width: int = 10) -> torch.Tensor:
    return torch.rand(n, channels, height, width, generator=torch.Generator().manual_seed(1))


def augmenter(seed: int = 0, **config: Any) -> Augmenter:
    return Augmenter(Augmentation.model_validate(config), seed, value_range=(0.0, 1.0))


# Each augmentation on a synthetic batch.


def test_every_augmentation_keeps_the_batch_shape() -> None:
    x, labels = images(), torch.arange(8)
    configs: list[dict[str, Any]] = [
        {"random_resized_crop": {}},
        {"horizontal_flip": True},
        {"color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}},
        {"mixup": {"alpha": 0.4}},
        {"cutmix": {"alpha": 1.0}},
        {"random_resized_crop": {}, "horizontal_flip": True, "mixup": {}},
    ]
    for config in configs:
        out, _ = augmenter(**config)(x, labels, step=3)
        assert out.shape == x.shape and out.dtype == x.dtype, config
        assert torch.isfinite(out).all()


def test_flip_mirrors_exactly_the_flipped_samples() -> None:
    x = images()
    flip = torch.tensor([True, False] * 4)
    out = horizontal_flip(x, flip)
    assert torch.equal(out[flip], x[flip].flip(-1))
    assert torch.equal(out[~flip], x[~flip])
    # Through the augmenter: each sample is either itself or its exact mirror, both occur.
    out, _ = augmenter(horizontal_flip=True)(images(64), torch.arange(64), step=0)
    x = images(64)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (mirrored | kept).all() and mirrored.any() and kept.any()


def test_crop_of_the_whole_image_is_the_identity() -> None:
    x = images(4, height=9, width=9)
    boxes = crop_boxes(4, 9, 9, (1.0, 1.0), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 0, 9, 9]] * 4
    torch.testing.assert_close(resized_crop(x, boxes), x, atol=1e-6, rtol=0)
    out, _ = augmenter(random_resized_crop={"scale": [1, 1], "ratio": [1, 1]})(
        x, torch.arange(4), step=5
    )
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_crop_boxes_fit_and_follow_scale_and_ratio() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes = crop_boxes(2000, 32, 32, (0.25, 0.5), (0.75, 4 / 3), generator)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 32**2
    assert area.min() >= 0.2 and area.max() <= 0.56  # rounding to whole pixels
    ratio = w.float() / h.float()
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6
    assert len(set(map(tuple, boxes.tolist()))) > 100  # positions and sizes vary


def test_a_crop_resizes_its_box_bilinearly() -> None:
    """The left half of a horizontal ramp, resized back to the full width, is the ramp's first
    half sampled at the output's pixel centres."""
    width = 8
    ramp = torch.arange(width, dtype=torch.float32).expand(1, 1, 4, width).clone()
    out = resized_crop(ramp, torch.tensor([[0, 0, 4, 4]]))
    # Output pixel o samples the box at (o + 0.5) / 2 - 0.5, clamped to the image's edge.
    expected = (torch.arange(width) + 0.5) / 2 - 0.5
    torch.testing.assert_close(out[0, 0, 0], expected.clamp_min(0), atol=1e-5, rtol=0)


def test_color_jitter_with_zero_is_the_identity() -> None:
    x = images()
    out, _ = augmenter(color_jitter={"brightness": 0, "contrast": 0, "saturation": 0})(
        x, torch.arange(8), step=2
    )
    assert torch.equal(out, x)
    ones = {name: torch.ones(8) for name in ("brightness", "contrast", "saturation")}
    assert torch.equal(color_jitter(x, ones, list(ones), (0.0, 1.0)), x)


def test_color_jitter_follows_torchvision_formulas_and_clamps() -> None:
    x = images(2)
    factor = {"f": torch.tensor([1.5, 0.5])}
    f = factor["f"].view(-1, 1, 1, 1)
    bright = color_jitter(x, {"brightness": factor["f"]}, ["brightness"], (0.0, 1.0))
    torch.testing.assert_close(bright, (f * x).clamp(0, 1))
    gray = (x * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    saturated = color_jitter(x, {"saturation": factor["f"]}, ["saturation"], (0.0, 1.0))
    torch.testing.assert_close(saturated, (f * x + (1 - f) * gray).clamp(0, 1))
    contrast = color_jitter(x, {"contrast": factor["f"]}, ["contrast"], (0.0, 1.0))
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(contrast, (f * x + (1 - f) * mean).clamp(0, 1))
    # Pixels 0 to 255: the dataset's range is kept.
    jittered, _ = Augmenter(
        Augmentation.model_validate({"color_jitter": {"brightness": 1.0, "contrast": 1.0}}),
        0,
        value_range=(0.0, 255.0),
    )(x * 255, torch.arange(2), step=0)
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.equal(jittered, x * 255)


def test_mixup_is_the_formula_and_its_label_weights_match() -> None:
    x, perm = images(), torch.randperm(8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mixup(x, 0.3, perm), 0.3 * x + 0.7 * x[perm])
    labels = torch.arange(8) * 10
    out, mix = augmenter(mixup={"alpha": 0.4})(x, labels, step=7)
    assert mix is not None and 0 <= mix.lam <= 1
    torch.testing.assert_close(out, mix.lam * x + (1 - mix.lam) * x[mix.perm])
    assert torch.equal(mix.labels, labels[mix.perm])


def test_cutmix_pastes_a_box_of_one_minus_lambda_of_the_image() -> None:
    x = images(6, height=16, width=20)
    perm = torch.roll(torch.arange(6), 1)  # every sample's partner is another sample
    box = cutmix_box(16, 20, 0.6, torch.Generator().manual_seed(0))
    out, lam = cutmix(x, box, perm)
    pasted = (out != x).any(dim=1)  # [B, H, W]: pixels taken from the partner
    assert torch.equal(pasted.float().mean(dim=(1, 2)), torch.full((6,), 1 - lam))
    top, left, bottom, right = box
    assert torch.equal(out[..., top:bottom, left:right], x[perm][..., top:bottom, left:right])
    # Through the augmenter: lambda adjusted to the clipped box, labels of the partners.
    for step in range(20):
        labels = torch.arange(6)
        out, mix = augmenter(cutmix={"alpha": 1.0})(x, labels, step=step)
        assert mix is not None
        from_partner = (out != x).any(dim=1).float().mean(dim=(1, 2))
        moved = mix.perm != torch.arange(6)
        assert torch.allclose(from_partner[moved], torch.tensor(1 - mix.lam))
        assert torch.equal(mix.labels, labels[mix.perm])


def test_augmentation_is_reproducible_from_the_seed_and_step() -> None:
    config: dict[str, Any] = {
        "random_resized_crop": {},
        "horizontal_flip": True,
        "color_jitter": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3},
        "mixup": {"alpha": 1.0},
    }
    x, labels = images(), torch.arange(8)
    first, mix = augmenter(seed=4, **config)(x, labels, step=11)
    again, mix_again = augmenter(seed=4, **config)(x, labels, step=11)
    assert torch.equal(first, again)
    assert mix is not None and mix_again is not None and mix.lam == mix_again.lam
    assert not torch.equal(first, augmenter(seed=4, **config)(x, labels, step=12)[0])
    assert not torch.equal(first, augmenter(seed=5, **config)(x, labels, step=11)[0])
    assert torch.equal(step_generator(4, 11).get_state(), step_generator(4, 11).get_state())


# The mixed-label loss.


def test_mixed_cross_entropy_is_the_weighted_sum_and_its_gradient_matches() -> None:
    logits = torch.tensor(
        [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]], dtype=torch.float64
    ).requires_grad_()
    y_a, y_b, lam = torch.tensor([0, 2, 1]), torch.tensor([1, 2, 0]), 0.7
    loss = mixed_cross_entropy(logits, y_a, y_b, lam)
    # By hand: -log softmax at each label, averaged over the batch.
    log_p = logits.detach() - logits.detach().exp().sum(1, keepdim=True).log()
    ce_a = -log_p[torch.arange(3), y_a].mean()
    ce_b = -log_p[torch.arange(3), y_b].mean()
    torch.testing.assert_close(loss.detach(), lam * ce_a + (1 - lam) * ce_b)
    (grad,) = torch.autograd.grad(loss, logits)
    target = lam * F.one_hot(y_a, 3) + (1 - lam) * F.one_hot(y_b, 3)
    torch.testing.assert_close(grad, (log_p.exp() - target) / 3)
    # Through a method's loss: KD with alpha 0 is the mixed cross-entropy.
    kd_ce, terms = mixed_label_loss(KDLoss(alpha=0.0), logits, logits.detach(), y_a, y_b, lam)
    torch.testing.assert_close(kd_ce, loss)
    (kd_grad,) = torch.autograd.grad(kd_ce, logits)
    torch.testing.assert_close(kd_grad, grad)
    assert set(terms) == {"kd_loss", "ce_loss"}


def test_mixed_kd_keeps_the_teacher_term_and_mixes_the_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([3, 3, 1, 0, 2]), 0.25
    loss = KDLoss(temperature=4.0, alpha=0.9)
    total, terms = mixed_label_loss(loss, student, teacher, y_a, y_b, lam)
    kd = loss(student, teacher, y_a)[1]["kd_loss"]
    expected = 0.9 * kd + 0.1 * mixed_cross_entropy(student, y_a, y_b, lam)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["kd_loss"], kd)


# The recipe: reproducible, cutmix and colour jitter through the loop.


def test_an_augmented_recipe_is_reproducible(digits_teacher: TeacherFiles, tmp_path: Path) -> None:
    body = {
        "teacher": "t",
        "dataset": "builtin:digits",
        "student": {"architecture": "cnn", "channels": [8], "hidden_sizes": [16]},
        "training": {
            "epochs": 1,
            "batch_size": 128,
            "seed": 3,
            "augmentation": {
                "random_resized_crop": {"scale": [0.7, 1.0]},
                "color_jitter": {"brightness": 0.3, "contrast": 0.3},
                "cutmix": {"alpha": 1.0},
            },
        },
    }
    states = []
    for attempt in range(2):
        recipe = DistillationRecipe(
            RecipeInputs(
                job_id="j",
                spec=DistillationSpec.model_validate(body),
                teachers=[TeacherRecord.from_file(digits_teacher.onnx)],
                data=load_builtin("builtin:digits"),
                device=torch.device("cpu"),
                artifact_dir=tmp_path / str(attempt),
            )
        )
        recipe.prepare()
        recipe.teacher_outputs()
        outcome = recipe.train()
        assert recipe.online_teacher is not None
        assert recipe.online_teacher.calls == math.ceil(len(recipe.train_split) / 128)
        states.append(outcome.state.best_state)
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


# A job end to end, in process.


def augmented_body(teacher_id: object, augmentation: dict[str, Any] | None) -> dict[str, Any]:
    training: dict[str, Any] = {"epochs": 2, "batch_size": 64, "learning_rate": 0.01, "seed": 0}
    if augmentation is not None:
        training["augmentation"] = augmentation
    return job_body(
        teacher_id,
        student={"architecture": "cnn", "channels": [8], "hidden_sizes": [16]},
        training=training,
    )


def test_a_job_with_augmentation_runs_its_teacher_online_once_per_step(
    client: TestClient, digits_teacher: TeacherFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    call = OnlineTeacher.__call__

    def counted(self: OnlineTeacher, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return call(self, x)

    monkeypatch.setattr(OnlineTeacher, "__call__", counted)
    teacher = upload_teacher(client, digits_teacher)["id"]
    augmentation = {
        "random_resized_crop": {"scale": [0.6, 1.0]},
        "horizontal_flip": True,
        "mixup": {"alpha": 0.4},
    }
    response = client.post("/v1/jobs", json=augmented_body(teacher, augmentation))
    assert response.status_code == 202, response.text
    run_job(response.json()["id"])
    job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["teacher_outputs"] == "online"
    assert result["online_teacher_seconds"] > 0
    steps = math.ceil(result["train_samples"] / 64) * result["epochs_run"]
    assert len(calls) == steps
    assert all(shape[1:] == (1, 8, 8) for shape in calls)
    assert result["student_accuracy"] > 0.5  # it learned from the augmented batches
    assert job["spec"]["training"]["augmentation"]["mixup"] == {"alpha": 0.4}

    calls.clear()
    plain = client.post("/v1/jobs", json=augmented_body(teacher, None)).json()["id"]
    run_job(plain)
    result = client.get(f"/v1/jobs/{plain}").json()["result"]
    assert result["teacher_outputs"] == "cached" and result["online_teacher_seconds"] is None
    assert calls == []


# Refusals at submission.


def test_augmentation_of_a_flat_dataset_is_refused(client: TestClient, tmp_path: Path) -> None:
    data = load_builtin("builtin:digits")
    assert isinstance(data.x_train, np.ndarray) and data.y_train is not None
    flat = data.x_train.reshape(-1, 64)
    weights = fit_mlp(flat, data.y_train, 10, hidden=16, steps=20)
    write_onnx_teacher(weights, (64,), tmp_path / "flat.onnx")
    with open(tmp_path / "flat.onnx", "rb") as f:
        teacher = client.post("/v1/teachers", files={"file": ("flat.onnx", f)}).json()["id"]
    upload = client.post(
        "/v1/datasets", files={"file": ("flat.npz", npz_bytes(x=flat, y=data.y_train))}
    )
    assert upload.status_code == 201, upload.text
    body = job_body(
        teacher,
        dataset=upload.json()["ref"],
        training={"epochs": 1, "augmentation": {"horizontal_flip": True}},
    )
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "training.augmentation"
    assert "image inputs" in response.json()["detail"]


@pytest.mark.parametrize(
    ("augmentation", "field"),
    [
        ({"random_resized_crop": {"scale": [0.9, 0.5]}}, "random_resized_crop.scale"),
        ({"random_resized_crop": {"scale": [0, 1]}}, "random_resized_crop.scale.0"),
        ({"random_resized_crop": {"ratio": [2, 1]}}, "random_resized_crop.ratio"),
        ({"mixup": {"alpha": 0}}, "mixup.alpha"),
        ({"cutmix": {"alpha": -1}}, "cutmix.alpha"),
        ({"mixup": {"alpha": 0.2}, "cutmix": {"alpha": 1}}, ""),
        ({"color_jitter": {"brightness": 1.5}}, "color_jitter.brightness"),
        ({"horizontal_flip": True, "rotate": 10}, "rotate"),
        ({}, ""),
    ],
)
def test_bad_augmentation_values_are_422s_naming_the_field(
    client: TestClient, augmentation: dict[str, Any], field: str
) -> None:
    body = job_body("anything", training={"augmentation": augmentation})
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    expected = "training.augmentation" + (f".{field}" if field else "")
    assert response.json()["field"] == expected


def test_saturation_on_grey_images_and_feature_methods_are_refused(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)["id"]
    grey = job_body(teacher, training={"augmentation": {"color_jitter": {"saturation": 0.4}}})
    response = client.post("/v1/jobs", json=grey)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "training.augmentation.color_jitter.saturation"
    fitnets = job_body(
        teacher,
        student={"architecture": "cnn", "channels": [8], "hidden_sizes": [16]},
        distillation={"method": "fitnets"},
        training={"augmentation": {"horizontal_flip": True}},
    )
    response = client.post("/v1/jobs", json=fitnets)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "training.augmentation"
    assert "fitnets" in response.json()["detail"]
