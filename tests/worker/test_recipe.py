"""The recipe in process, without a database or Celery: a whole job in seconds, its figures
reproduced by the artifact it wrote, its checkpoints resumed exactly."""

from pathlib import Path

import pytest
import torch

from app.datasets.loading import load_builtin
from app.jobs.schemas import DistillationSpec
from app.ml.predictor import load_predictor
from app.models import ArtifactFormat, JobPhase
from tests.helpers.teachers import TeacherFiles
from worker.recipe import DistillationRecipe, JobFailure, RecipeInputs, SilentEvents
from worker.teachers import TeacherRecord


def spec(**overrides: object) -> DistillationSpec:
    body: dict[str, object] = {
        "teacher": "t",
        "dataset": "builtin:digits",
        "student": {"architecture": "mlp", "hidden_sizes": [32]},
        "training": {"epochs": 3, "batch_size": 64, "learning_rate": 0.01, "seed": 0},
    }
    return DistillationSpec.model_validate(body | overrides)


class Recorder(SilentEvents):
    def __init__(self) -> None:
        self.phases: list[JobPhase] = []
        self.epochs: list[int] = []
        self.resumed_from: list[int] = []

    def phase(self, phase: JobPhase) -> None:
        self.phases.append(phase)

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.epochs.append(epoch)

    def resumed(self, epoch: int) -> None:
        self.resumed_from.append(epoch)


def test_a_job_runs_in_process_and_the_artifact_reproduces_its_figures(
    digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    data = load_builtin("builtin:digits")
    events = Recorder()
    output = DistillationRecipe(
        RecipeInputs(
            job_id="j",
            spec=spec(),
            teachers=[TeacherRecord.from_file(digits_teacher.onnx)],
            data=data,
            device=torch.device("cpu"),
            artifact_dir=tmp_path / "artifact",
            cache_dir=tmp_path / "cache",
        ),
        events,
    ).run()
    assert events.phases == [
        JobPhase.VALIDATING,
        JobPhase.TEACHER_OUTPUTS,
        JobPhase.TRAINING,
        JobPhase.EVALUATING,
        JobPhase.EXPORTING,
    ]
    assert events.epochs == [1, 2, 3] and events.resumed_from == [0]
    result = output.result
    assert result.teacher_accuracy == pytest.approx(digits_teacher.test_accuracy)
    assert result.student_accuracy > 0.85
    assert result.epochs_run == 3 and not result.teacher_outputs_cached
    assert result.speedup is not None and result.wall_seconds is not None
    # The served student reproduces the reported accuracy exactly.
    predictor = load_predictor(output.paths[ArtifactFormat.MANIFEST].parent)
    predictions, _ = predictor.predict(data.x_test)
    assert float((predictions == data.y_test).mean()) == pytest.approx(result.student_accuracy)
    assert predictor.manifest.classes == data.classes
    assert predictor.manifest.signature.inputs[0].shape == [1, 8, 8]


def test_teacher_outputs_come_from_the_cache_the_second_time(
    digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    inputs = RecipeInputs(
        job_id="j",
        spec=spec(),
        teachers=[TeacherRecord.from_file(digits_teacher.onnx)],
        data=load_builtin("builtin:digits"),
        device=torch.device("cpu"),
        artifact_dir=tmp_path / "a",
        cache_dir=tmp_path / "cache",
    )
    hits = []
    for _ in range(2):
        recipe = DistillationRecipe(inputs)
        recipe.prepare()
        recipe.teacher_outputs()
        hits.append(recipe.cache_hits)
    assert hits == [[False], [True]]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    def run(epochs: int, checkpoint: Path) -> DistillationRecipe:
        recipe = DistillationRecipe(
            RecipeInputs(
                job_id="j",
                spec=spec(training={"epochs": epochs, "batch_size": 64, "seed": 0}),
                teachers=[
                    TeacherRecord.from_file(digits_teacher.safetensors, digits_teacher.config)
                ],
                data=load_builtin("builtin:digits"),
                device=torch.device("cpu"),
                artifact_dir=tmp_path / "a",
                checkpoint=checkpoint,
            )
        )
        recipe.prepare()
        recipe.teacher_outputs()
        recipe.train()
        return recipe

    straight = run(4, tmp_path / "straight.safetensors")
    run(2, tmp_path / "resumed.safetensors")  # "killed" after epoch 2
    resumed = run(4, tmp_path / "resumed.safetensors")
    assert resumed.resumed_from_epoch == 2
    for name, tensor in straight.student.state_dict().items():
        assert torch.equal(tensor, resumed.student.state_dict()[name]), name


def test_data_that_does_not_fit_the_teacher_fails_before_training(
    digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    digits = load_builtin("builtin:digits")
    flat = type(digits)(
        digits.x_train.reshape(len(digits.x_train), -1),
        digits.y_train,
        digits.x_test.reshape(len(digits.x_test), -1),
        digits.y_test,
        digits.classes,
    )
    recipe = DistillationRecipe(
        RecipeInputs(
            job_id="j",
            spec=spec(),
            teachers=[TeacherRecord.from_file(digits_teacher.onnx)],
            data=flat,
            device=torch.device("cpu"),
            artifact_dir=tmp_path,
        )
    )
    with pytest.raises(JobFailure) as failure:
        recipe.prepare()
    assert failure.value.code == "shape_mismatch"
    assert "[64]" in failure.value.detail and "[1, 8, 8]" in failure.value.detail
