"""What the preflight costs next to the teacher pass it guards, measured in one run.

The preflight runs the teacher on up to 512 samples before anything else (at submission when the
files are small). This script times, on the example Fashion-MNIST CNN teacher (ONNX) and the
builtin Fashion-MNIST data, with the same opened teacher:

- the preflight itself (``run_preflight``: sample, run, checks, the scaling probe when it applies),
- the submission's whole extra work (load the dataset, open the teacher, the preflight),
- the job's teacher pass on every train and test sample (what a job does next anyway),

and prints each as a ratio of the teacher pass. Only ratios of this one run are meaningful.

    python benchmarks/preflight.py [--repeats 5] [--threads 2]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.datasets.loading import load_builtin  # noqa: E402
from app.jobs.preflight import PreflightTeacher, run_preflight  # noqa: E402
from worker.teachers import TeacherRecord  # noqa: E402

DATASET = "builtin:fashion-mnist"
TEACHER = ROOT / "examples" / "fashion-mnist_teacher.onnx"


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not TEACHER.exists():
        raise SystemExit(f"{TEACHER} is missing: run `python examples/train_teacher.py` first.")
    record = TeacherRecord.from_file(TEACHER)
    cpu = torch.device("cpu")
    data = load_builtin(DATASET)
    backend = record.open(cpu)

    def preflight() -> object:
        teacher = PreflightTeacher(record.id, backend, record.choice, list(record.feature_layers))
        return run_preflight([teacher], data, stage="submission")

    def submission() -> object:
        loaded = load_builtin(DATASET)
        opened = record.open(cpu)
        teacher = PreflightTeacher(record.id, opened, record.choice, list(record.feature_layers))
        return run_preflight([teacher], loaded, stage="submission")

    def teacher_pass() -> object:
        return backend.logits(data.x_train), backend.logits(data.x_test)

    report = run_preflight(
        [PreflightTeacher(record.id, backend, record.choice, list(record.feature_layers))],
        data,
        stage="submission",
    )
    samples = len(data.x_train) + len(data.x_test)
    print(
        f"{DATASET}: {samples:,} samples; teacher {TEACHER.name}, {record.parameter_count:,} "
        f"parameters; preflight sample {report.samples}, teacher sample accuracy "
        f"{report.teachers[0].accuracy:.4f}, warnings {[w.code for w in report.warnings]}"
    )
    full = median_seconds(teacher_pass, max(1, args.repeats // 2))
    rows = [
        ("teacher pass, every train and test sample", full),
        ("preflight (run_preflight)", median_seconds(preflight, args.repeats)),
        (
            "submission: load data + open teacher + preflight",
            median_seconds(submission, args.repeats),
        ),
    ]
    print(f"\n{'':52s}{'s':>8s}{'x teacher pass':>16s}")
    for name, seconds in rows:
        print(f"{name:52s}{seconds:8.3f}{seconds / full:16.4f}")


if __name__ == "__main__":
    main()
