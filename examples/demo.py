"""The whole Distill flow over HTTP, as a user would run it (``make demo``).

Trains a teacher (once), starts Distill embedded, uploads the teacher, distills it into a small MLP,
downloads the student, checks it with /predict on the test set, prints teacher vs student, and shuts
Distill down.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.client import DistillClient, DistillError  # noqa: E402
from app.datasets.builtins import is_available  # noqa: E402
from app.datasets.loading import load_builtin  # noqa: E402
from app.jobs.schemas import JobOut, JobResult  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    client: DistillClient, server: subprocess.Popen[bytes] | None, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit("Distill exited during start-up; see the log above.")
        if client.ready():
            return
        time.sleep(0.5)
    raise SystemExit("Distill did not become ready in time.")


def follow(client: DistillClient, job_id: str) -> JobOut:
    """Poll the job, printing each phase and epoch once."""
    last = None
    while True:
        job = client.get_job(job_id)
        metrics = job.latest_metrics or {}
        line = f"  {job.status:<10} {job.phase:<16} {100 * job.progress:5.1f}%"
        if metrics:
            line += (
                f"  epoch {metrics['epoch']}: val accuracy {metrics['val_accuracy']:.4f}, "
                f"agreement with teacher {metrics['val_agreement']:.4f}"
            )
        if line != last:
            print(line, flush=True)
            last = line
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)


def table(result: JobResult, predict_accuracy: float) -> str:
    def megabytes(size: int | None) -> str:
        return f"{(size or 0) / 1e6:.2f} MB"

    rows = [
        ("test accuracy", f"{result.teacher_accuracy:.4f}", f"{result.student_accuracy:.4f}"),
        ("parameters", f"{result.teacher_parameters:,}", f"{result.student_parameters:,}"),
        (
            "size on disk",
            megabytes(result.teacher_size_bytes),
            megabytes(result.student_size_bytes),
        ),
        (
            "latency / sample",
            f"{result.teacher_latency_ms:.3f} ms",
            f"{result.student_latency_ms:.3f} ms",
        ),
    ]
    lines = [f"{'':<18}{'teacher':>14}{'student':>14}", "-" * 46]
    lines += [f"{name:<18}{t:>14}{s:>14}" for name, t, s in rows]
    lines += [
        "-" * 46,
        f"accuracy retained   {result.accuracy_retained:.1f}%",
        f"compression         {result.compression_ratio:.1f}x fewer parameters",
        f"speed-up            {result.speedup:.1f}x (onnxruntime, 1 thread, batch 1)",
        f"/predict accuracy   {predict_accuracy:.4f} on the test set (the job reported "
        f"{result.student_accuracy:.4f})",
        f"job wall time       {result.wall_seconds:.1f} s on {result.device}",
    ]
    return "\n".join(lines)


def distill(
    client: DistillClient, teacher_path: Path, dataset: str, epochs: int, out: Path
) -> None:
    """Steps 3 to 6: upload, distil, download, predict, print the table."""
    print("3. Uploading the teacher", flush=True)
    teacher = client.upload_teacher(teacher_path)
    print(
        f"   {teacher.format}, {teacher.parameter_count:,} parameters, "
        f"sha256 {teacher.sha256[:12]}…"
    )

    spec = {
        "teacher": teacher.id,
        "dataset": dataset,
        "student": {"architecture": "mlp", "hidden_sizes": [128]},
        "distillation": {"method": "kd", "temperature": 4.0, "alpha": 0.9},
        "training": {"epochs": epochs, "batch_size": 128, "learning_rate": 0.001, "seed": 0},
    }
    submitted = client.submit_job(spec)
    print(f"4. Job submitted: /v1/jobs/{submitted.id}", flush=True)
    preflight = submitted.preflight
    if preflight is not None:
        checked = preflight.teachers[0]
        print(
            f"   preflight: the teacher gets {checked.accuracy:.3f} of "
            f"{preflight.samples} training samples (chance {preflight.chance:.3f}); "
            f"scores `{checked.output}` are {checked.output_kind}"
        )
        for warning in preflight.warnings:
            print(f"   warning {warning.code}: {warning.detail}")
    job = follow(client, submitted.id)
    if job.status != "succeeded" or job.result is None:
        raise SystemExit(f"The job ended {job.status}: {job.error}")

    out.mkdir(parents=True, exist_ok=True)
    student = client.download_artifact(job.id, out / "student.onnx")
    print(f"5. Student downloaded to {student.path} (sha256 verified)")

    data = load_builtin(dataset)
    x_test = np.asarray(data.x_test)  # builtin datasets are arrays
    correct = 0
    for start in range(0, len(x_test), 1000):
        batch = x_test[start : start + 1000]
        predictions = client.predict(job.id, batch.tolist()).predictions
        correct += sum(
            int(p == y) for p, y in zip(predictions, data.y_test[start : start + 1000], strict=True)
        )
    for warning in job.result.warnings:
        print(f"   warning {warning.code}: {warning.detail}")
    print(f"6. /predict on {len(data.x_test):,} test samples\n")
    print(table(job.result, correct / len(data.x_test)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--epochs", type=int, help="default: 5 on Fashion-MNIST, 30 on the small digits set"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output")
    parser.add_argument(
        "--url", help="use a Distill already running there (server mode) instead of starting one"
    )
    args = parser.parse_args()

    dataset = "builtin:fashion-mnist" if is_available("builtin:fashion-mnist") else "builtin:digits"
    epochs = args.epochs or (5 if dataset == "builtin:fashion-mnist" else 30)
    name = dataset.removeprefix("builtin:")
    teacher_path = ROOT / "examples" / f"{name}_teacher.onnx"
    print(f"1. Teacher: a CNN trained on {dataset} ({teacher_path.name})", flush=True)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_teacher.py"),
            "--dataset",
            dataset,
            "--out",
            str(teacher_path),
        ],
        check=True,
    )

    server = None
    if args.url is None:
        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        print(f"2. Starting Distill (embedded) on port {port}", flush=True)
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    else:
        print(f"2. Using Distill at {args.url}", flush=True)
    try:
        with DistillClient(args.url) as client:
            wait_ready(client, server)
            distill(client, teacher_path, dataset, epochs, args.out)
    except DistillError as e:
        raise SystemExit(f"Distill refused: {e}") from None
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
            print("\nDistill stopped.")


if __name__ == "__main__":
    main()
