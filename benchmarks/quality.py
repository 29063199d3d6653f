"""Student quality on Fashion-MNIST: the teacher, the student trained from scratch, and the student
distilled with each logit method, over several seeds (mean and spread).

Uses the worker's own loop and teacher-output cache; the teacher is the example CNN (ONNX).

    python benchmarks/quality.py [--epochs 20] [--seeds 0 1 2] [--hidden 256]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.jobs.schemas import DistillationSpec, Training  # noqa: E402
from app.ml.architectures import MlpSpec, build_student, parameter_count  # noqa: E402
from app.storage import sha256_file  # noqa: E402
from worker.data import load_builtin  # noqa: E402
from worker.evaluation import accuracy  # noqa: E402
from worker.losses import build_loss  # noqa: E402
from worker.pipeline import split_validation  # noqa: E402
from worker.teacher_cache import cache_key, cached_teacher_logits  # noqa: E402
from worker.teachers import TeacherRunner  # noqa: E402
from worker.training.loop import Split, predict_logits, train  # noqa: E402

# "scratch" is the same student and loop with the teacher term switched off (plain cross-entropy).
METHODS: dict[str, dict[str, object]] = {
    "scratch (CE only)": {"method": "kd", "alpha": 0.0},
    "kd": {"method": "kd"},
    "mse": {"method": "mse"},
    "dkd": {"method": "dkd"},
    "dist": {"method": "dist"},
    "ls_kd": {"method": "ls_kd"},
}


class Quiet:
    def progress(self, fraction: float) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--teacher", type=Path, default=ROOT / "examples" / "fashion-mnist_teacher.onnx"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_builtin("builtin:fashion-mnist")
    runner = TeacherRunner(args.teacher, "onnx", None, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as cache:
        logits, _ = cached_teacher_logits(
            Path(cache),
            cache_key(sha256_file(args.teacher), data.digest()),
            {"train": data.x_train, "test": data.x_test},
            runner.logits,
        )
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    teacher_accuracy = accuracy(torch.from_numpy(logits["test"]), y_test)
    teacher_parameters = 1_630_090  # the ONNX graph's weights (batch norm folded)
    spec = MlpSpec(hidden_sizes=args.hidden)
    training = {
        "epochs": args.epochs,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "schedule": "cosine",
    }

    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    for name, method in METHODS.items():
        parsed = DistillationSpec.model_validate(
            {"teacher": "t", "dataset": "d", "student": spec.model_dump(), "distillation": method}
        ).distillation
        for seed in args.seeds:
            train_arrays, val_arrays = split_validation(
                data.x_train, data.y_train, logits["train"], seed
            )
            train_split = Split(*(torch.from_numpy(np.ascontiguousarray(a)) for a in train_arrays))
            val_split = Split(*(torch.from_numpy(np.ascontiguousarray(a)) for a in val_arrays))
            torch.manual_seed(seed)
            student = build_student(spec, (1, 28, 28), 10, fit_inputs=train_split.x)
            outcome = train(
                student,
                build_loss(**parsed.model_dump()),
                train_split,
                val_split,
                Training(seed=seed, **training),
                Quiet(),
                lambda: False,
                lambda state: None,
            )
            student.load_state_dict(outcome.state.best_state)
            results.setdefault(name, []).append(accuracy(predict_logits(student, x_test), y_test))
            print(f"{name:20} seed {seed}: {results[name][-1]:.4f}", flush=True)

    parameters = parameter_count(build_student(spec, (1, 28, 28), 10))
    print(
        f"\nFashion-MNIST test accuracy; MLP {args.hidden} student ({parameters:,} parameters), "
        f"{args.epochs} epochs, cosine schedule, seeds {args.seeds}; "
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
