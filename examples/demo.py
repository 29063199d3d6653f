"""The whole Distill flow over HTTP, as a user would run it (``make demo``).

Trains a teacher (once), starts Distill embedded, uploads the teacher, distills it into a small MLP,
downloads the student, checks it with /predict on the test set, prints teacher vs student, and shuts
Distill down.
"""

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.datasets.builtins import is_available  # noqa: E402
from app.datasets.loading import load_builtin  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    client: httpx.Client, server: subprocess.Popen[bytes] | None, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit("Distill exited during start-up; see the log above.")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("Distill did not become ready in time.")


def check(response: httpx.Response) -> dict[str, object]:
    if response.is_error:
        raise SystemExit(f"{response.request.method} {response.request.url}: {response.text}")
    body: dict[str, object] = response.json()
    return body


def follow(client: httpx.Client, job_id: str) -> dict[str, object]:
    """Poll the job, printing each phase and epoch once."""
    last = None
    while True:
        job = check(client.get(f"/v1/jobs/{job_id}"))
        metrics = job["latest_metrics"] or {}
        progress = job["progress"]
        assert isinstance(metrics, dict) and isinstance(progress, int | float)
        line = f"  {job['status']:<10} {job['phase']:<16} {100 * progress:5.1f}%"
        if metrics:
            line += (
                f"  epoch {metrics['epoch']}: val accuracy {metrics['val_accuracy']:.4f}, "
                f"agreement with teacher {metrics['val_agreement']:.4f}"
            )
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)


def table(result: dict[str, float], predict_accuracy: float) -> str:
    rows = [
        ("test accuracy", f"{result['teacher_accuracy']:.4f}", f"{result['student_accuracy']:.4f}"),
        ("parameters", f"{result['teacher_parameters']:,}", f"{result['student_parameters']:,}"),
        (
            "size on disk",
            f"{result['teacher_size_bytes'] / 1e6:.2f} MB",
            f"{result['student_size_bytes'] / 1e6:.2f} MB",
        ),
        (
            "latency / sample",
            f"{result['teacher_latency_ms']:.3f} ms",
            f"{result['student_latency_ms']:.3f} ms",
        ),
    ]
    lines = [f"{'':<18}{'teacher':>14}{'student':>14}", "-" * 46]
    lines += [f"{name:<18}{t:>14}{s:>14}" for name, t, s in rows]
    lines += [
        "-" * 46,
        f"accuracy retained   {result['accuracy_retained']:.1f}%",
        f"compression         {result['compression_ratio']:.1f}x fewer parameters",
        f"speed-up            {result['speedup']:.1f}x (onnxruntime, 1 thread, batch 1)",
        f"/predict accuracy   {predict_accuracy:.4f} on the test set (the job reported "
        f"{result['student_accuracy']:.4f})",
        f"job wall time       {result['wall_seconds']:.1f} s on {result['device']}",
    ]
    return "\n".join(lines)


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
        with httpx.Client(base_url=args.url, timeout=120) as client:
            wait_ready(client, server)
            print("3. Uploading the teacher", flush=True)
            with open(teacher_path, "rb") as f:
                teacher = check(client.post("/v1/teachers", files={"file": (teacher_path.name, f)}))
            print(
                f"   {teacher['format']}, {teacher['parameter_count']:,} parameters, "
                f"sha256 {str(teacher['sha256'])[:12]}…"
            )

            spec = {
                "teacher": teacher["id"],
                "dataset": dataset,
                "student": {"architecture": "mlp", "hidden_sizes": [128]},
                "distillation": {"method": "kd", "temperature": 4.0, "alpha": 0.9},
                "training": {
                    "epochs": epochs,
                    "batch_size": 128,
                    "learning_rate": 0.001,
                    "seed": 0,
                },
            }
            response = client.post("/v1/jobs", json=spec)
            submitted = check(response)
            job_id = str(submitted["id"])
            print(f"4. Job submitted: {response.headers['location']}", flush=True)
            preflight = submitted["preflight"]
            if isinstance(preflight, dict):
                checked = preflight["teachers"][0]
                print(
                    f"   preflight: the teacher gets {checked['accuracy']:.3f} of "
                    f"{preflight['samples']} training samples (chance {preflight['chance']:.3f}); "
                    f"scores `{checked['output']}` are {checked['output_kind']}"
                )
                for warning in preflight["warnings"]:
                    print(f"   warning {warning['code']}: {warning['detail']}")
            job = follow(client, job_id)
            if job["status"] != "succeeded":
                raise SystemExit(f"The job ended {job['status']}: {job['error']}")

            args.out.mkdir(parents=True, exist_ok=True)
            download = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "onnx"})
            digest = hashlib.sha256(download.content).hexdigest()
            if digest != download.headers["x-content-sha256"]:
                raise SystemExit("The downloaded student does not match its sha256.")
            (args.out / "student.onnx").write_bytes(download.content)
            print(f"5. Student downloaded to {args.out / 'student.onnx'} (sha256 verified)")

            data = load_builtin(dataset)
            x_test = np.asarray(data.x_test)  # builtin datasets are arrays
            correct = 0
            for start in range(0, len(x_test), 1000):
                batch = x_test[start : start + 1000]
                answer = check(
                    client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": batch.tolist()})
                )
                predictions = answer["predictions"]
                assert isinstance(predictions, list)
                correct += sum(
                    int(p == y)
                    for p, y in zip(predictions, data.y_test[start : start + 1000], strict=True)
                )
            result = job["result"]
            assert isinstance(result, dict)
            for warning in result["warnings"]:
                print(f"   warning {warning['code']}: {warning['detail']}")
            print(f"6. /predict on {len(data.x_test):,} test samples\n")
            print(table(result, correct / len(data.x_test)))
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
            print("\nDistill stopped.")


if __name__ == "__main__":
    main()
