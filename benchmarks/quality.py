"""Student quality on Fashion-MNIST: the teacher, the student trained from scratch, and the student
distilled with each method, over several seeds (mean and spread).

Uses the worker's own loop, teacher-output cache and feature-method setup. The teacher is the
example CNN: its ONNX graph gives the logits, its safetensors twin the hooked layers.

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

from app.jobs.features import default_layer_pair  # noqa: E402
from app.jobs.schemas import DistillationSpec, FeatureMethod, Training  # noqa: E402
from app.ml.architectures import CnnSpec, MlpSpec, build_student, parameter_count  # noqa: E402
from app.ml.layers import feature_layers  # noqa: E402
from app.storage import sha256_file  # noqa: E402
from app.teachers.inspection import TeacherConfig, inspect_teacher  # noqa: E402
from worker.data import load_builtin  # noqa: E402
from worker.evaluation import accuracy  # noqa: E402
from worker.losses import build_loss  # noqa: E402
from worker.pipeline import prepare_feature_method, split_validation, to_split  # noqa: E402
from worker.teacher_cache import cache_key, cached_teacher_logits  # noqa: E402
from worker.teachers import TeacherRunner  # noqa: E402
from worker.training.loop import predict_logits, train  # noqa: E402

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


class Quiet:
    def progress(self, fraction: float) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        pass


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

    data = load_builtin("builtin:fashion-mnist")
    cpu = torch.device("cpu")
    runner = TeacherRunner(args.teacher, "onnx", None, cpu)
    config = json.loads(args.teacher.with_suffix(".config.json").read_text())
    hooked = TeacherRunner(args.teacher.with_suffix(".safetensors"), "safetensors", config, cpu)
    teacher_layers = feature_layers(
        TeacherConfig.model_validate(config).architecture, data.input_shape, 10
    )
    with tempfile.TemporaryDirectory() as cache:
        logits, _ = cached_teacher_logits(
            Path(cache),
            cache_key(sha256_file(args.teacher), data.digest()),
            {"train": data.x_train, "test": data.x_test},
            runner.logits,
        )
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    labels = data.y_train
    assert labels is not None
    teacher_accuracy = accuracy(torch.from_numpy(logits["test"]), y_test)
    teacher_parameters = inspect_teacher(args.teacher, args.teacher.name, None).parameter_count
    training = {"epochs": epochs, "batch_size": 128, "learning_rate": 1e-3, "schedule": "cosine"}

    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    for name, method in methods.items():
        parsed = DistillationSpec.model_validate(
            {"teacher": "t", "dataset": "d", "student": spec.model_dump(), "distillation": method}
        ).distillation
        for seed in args.seeds:
            train_arrays, val_arrays = split_validation(data.x_train, labels, logits["train"], seed)
            train_split, val_split = to_split(train_arrays, cpu), to_split(val_arrays, cpu)
            torch.manual_seed(seed)
            student = build_student(spec, data.input_shape, 10, fit_inputs=train_split.x)
            if isinstance(spec, CnnSpec):
                student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            tap = None
            if isinstance(parsed, FeatureMethod):
                student_layers = feature_layers(spec, data.input_shape, 10)
                parsed.layers = [default_layer_pair(parsed, teacher_layers, student_layers)]
                train_split, loss_fn, tap = prepare_feature_method(
                    parsed, hooked, train_split, student, spec
                )
            else:
                loss_fn = build_loss(**parsed.model_dump())
            outcome = train(
                student,
                loss_fn,
                train_split,
                val_split,
                Training(seed=seed, **training),
                Quiet(),
                lambda: False,
                lambda state: None,
                student_tap=tap,
            )
            if tap is not None:
                tap.remove()
            student.load_state_dict(outcome.state.best_state)
            results.setdefault(name, []).append(accuracy(predict_logits(student, x_test), y_test))
            print(f"{name:20} seed {seed}: {results[name][-1]:.4f}", flush=True)

    parameters = parameter_count(build_student(spec, data.input_shape, 10))
    print(
        f"\nFashion-MNIST test accuracy; {spec.architecture.upper()} student "
        f"{spec.model_dump(exclude={'architecture', 'dropout'})} ({parameters:,} parameters), "
        f"{epochs} epochs, cosine schedule, seeds {args.seeds}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(f"{'':22}{'accuracy':>10}{'± sd':>8}{'retained':>10}{'compression':>13}")
    print(f"{'teacher (CNN)':22}{teacher_accuracy:10.4f}{'':8}{100.0:9.1f}%{1.0:12.1f}x")
    for name, values in results.items():
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"{name:22}{mean:10.4f}{spread:8.4f}{100 * mean / teacher_accuracy:9.1f}%"
            f"{teacher_parameters / parameters:12.1f}x"
        )


if __name__ == "__main__":
    main()
