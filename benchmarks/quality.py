"""Student quality on Fashion-MNIST: the teacher, the student trained from scratch, and the student
distilled with each method, over several seeds (mean and spread).

Each run is a job spec run through the worker's own recipe (prepare, teacher outputs, train,
evaluate), with one teacher-output cache for all runs. The teacher is the example CNN: its ONNX
graph for the logit methods, its safetensors twin (same weights, hooked layers) for FitNets and AT.

    python benchmarks/quality.py --student mlp    # MLP [256], 20 epochs, the logit methods
    python benchmarks/quality.py --student cnn    # CNN [32, 64], 10 epochs, + FitNets and AT
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.datasets.arrays import DatasetArrays  # noqa: E402
from app.datasets.loading import load_builtin  # noqa: E402
from app.jobs.features import default_layer_pair  # noqa: E402
from app.jobs.methods import FeatureMethod  # noqa: E402
from app.jobs.schemas import DistillationSpec  # noqa: E402
from app.ml.layers import feature_layers  # noqa: E402
from app.ml.students import CnnSpec, MlpSpec, build_student, parameter_count  # noqa: E402
from app.ml.teacher_formats.safetensors import TeacherConfig  # noqa: E402
from worker.recipe import DistillationRecipe, RecipeInputs  # noqa: E402
from worker.teachers import TeacherRecord  # noqa: E402

DATASET = "builtin:fashion-mnist"

# "scratch" is the same student and loop with the teacher term switched off (plain cross-entropy).
LOGIT_METHODS: dict[str, dict[str, object]] = {
    "scratch (CE only)": {"method": "kd", "alpha": 0.0},
    "kd": {"method": "kd"},
    "mse": {"method": "mse"},
    "dkd": {"method": "dkd"},
    "dist": {"method": "dist"},
    "ls_kd": {"method": "ls_kd"},
}
STUDENTS: dict[str, tuple[MlpSpec | CnnSpec, int, dict[str, dict[str, object]]]] = {
    "mlp": (MlpSpec(hidden_sizes=[256]), 20, LOGIT_METHODS),
    "cnn": (
        CnnSpec(channels=[32, 64]),
        10,
        {
            **{k: v for k, v in LOGIT_METHODS.items() if k != "mse"},
            "fitnets": {"method": "fitnets"},
            "at": {"method": "at"},
        },
    ),
}


def job_spec(
    student: MlpSpec | CnnSpec, method: dict[str, object], training: dict[str, object], seed: int
) -> DistillationSpec:
    return DistillationSpec.model_validate(
        {
            "teacher": "t",
            "dataset": DATASET,
            "student": student.model_dump(),
            "distillation": method,
            "training": {**training, "seed": seed},
        }
    )


def run_job(
    spec: DistillationSpec,
    teacher: TeacherRecord,
    data: DatasetArrays,
    cache_dir: Path,
    work_dir: Path,
) -> tuple[float, float]:
    """The worker's recipe up to evaluation (no export: only accuracy is needed): the test
    accuracy of the best epoch's student, and the teacher's."""
    recipe = DistillationRecipe(
        RecipeInputs(
            job_id=f"quality-{spec.distillation.method}-{spec.training.seed}",
            spec=spec,
            teachers=[teacher],
            data=data,
            device=torch.device("cpu"),
            artifact_dir=work_dir,
            cache_dir=cache_dir,
        )
    )
    recipe.prepare()
    recipe.teacher_outputs()
    outcome = recipe.train()
    result = recipe.evaluate(outcome)
    return result.student_accuracy, result.teacher_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=sorted(STUDENTS), default="mlp")
    parser.add_argument("--epochs", type=int, help="default: 20 for mlp, 10 for cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="a subset of the table's rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--teacher", type=Path, default=ROOT / "examples" / "fashion-mnist_teacher.onnx"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec, default_epochs, methods = STUDENTS[args.student]
    epochs = args.epochs or default_epochs
    if args.methods:
        methods = {name: methods[name] for name in args.methods}

    data = load_builtin(DATASET)
    # Logit methods use the ONNX graph; feature methods its safetensors twin (same weights, same
    # logits), whose layers are hooked.
    onnx_teacher = TeacherRecord.from_file(args.teacher)
    twin = TeacherRecord.from_file(
        args.teacher.with_suffix(".safetensors"),
        json.loads(args.teacher.with_suffix(".config.json").read_text()),
    )
    signature = onnx_teacher.signature
    student_layers = feature_layers(spec, signature)
    twin_config = TeacherConfig.model_validate(twin.architecture)
    teacher_layers = feature_layers(twin_config.architecture, twin.signature)
    training = {"epochs": epochs, "batch_size": 128, "learning_rate": 1e-3, "schedule": "cosine"}

    results: dict[str, list[float]] = {}
    teacher_accuracies: dict[str, float] = {}
    started = time.perf_counter()
    # One cache for every run: each teacher file runs over the dataset once.
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, work_dir = Path(tmp) / "cache", Path(tmp) / "artifacts"
        for name, method in methods.items():
            parsed = job_spec(spec, method, training, 0).distillation
            teacher = onnx_teacher
            if isinstance(parsed, FeatureMethod):
                # Resolved as the API resolves a job's default layers at submission.
                pair = default_layer_pair(parsed, teacher_layers, student_layers)
                method = {**method, "layers": [pair.model_dump()]}
                teacher = twin
            for seed in args.seeds:
                recipe_spec = job_spec(spec, method, training, seed)
                accuracy, teacher_accuracy = run_job(
                    recipe_spec, teacher, data, cache_dir, work_dir
                )
                results.setdefault(name, []).append(accuracy)
                teacher_accuracies[teacher.format] = teacher_accuracy
                print(f"{name:20} seed {seed}: {results[name][-1]:.4f}", flush=True)

    parameters = parameter_count(build_student(spec, signature))
    teacher_accuracy = (
        teacher_accuracies.get(onnx_teacher.format) or teacher_accuracies[twin.format]
    )
    print(
        f"\nFashion-MNIST test accuracy; {spec.architecture.upper()} student "
        f"{spec.model_dump(exclude={'architecture', 'dropout'})} ({parameters:,} parameters), "
        f"{epochs} epochs, cosine schedule, seeds {args.seeds}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    if len(set(teacher_accuracies.values())) > 1:
        print(f"note: the teacher's formats disagree on its test accuracy: {teacher_accuracies}")
    print(f"{'':22}{'accuracy':>10}{'± sd':>8}{'retained':>10}{'compression':>13}")
    print(f"{'teacher (CNN)':22}{teacher_accuracy:10.4f}{'':8}{100.0:9.1f}%{1.0:12.1f}x")
    for name, values in results.items():
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"{name:22}{mean:10.4f}{spread:8.4f}{100 * mean / teacher_accuracy:9.1f}%"
            f"{onnx_teacher.parameter_count / parameters:12.1f}x"
        )


if __name__ == "__main__":
    main()
