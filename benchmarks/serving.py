"""What serving a student costs, measured in one run.

Trains a tiny digits job in process (embedded stack in a temporary home), then times, on its
student:

- bare onnxruntime, batch 1 (the engine's session settings, no HTTP);
- an HTTP no-op route (``/v2/health/live``) on the same server;
- ``/v1/jobs/{id}/predict`` and ``/v2/models/{id}/infer`` at batch 1 (p50, p99);
- throughput of ``/v2/.../infer`` with 1 and with 64 concurrent single-sample clients, with
  micro-batching (``DISTILL_SERVE_MAX_BATCH=64``) and without (``=1``);
- what API keys cost: ``/v2/.../infer`` latency and 64-client throughput with keys required
  (``DISTILL_AUTH=required``, each request's key read from the database) against without.

Each server is ``distill serve`` (one uvicorn process); clients are processes of threads with
keep-alive connections, so that the client's own cost stays off the server's core.

    python benchmarks/serving.py [--requests 2000] [--seconds 5] [--client-processes 4]
"""

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def train_job(home: Path) -> str:
    """A succeeded digits job in ``home`` (as tests/worker/test_pipeline.py makes one)."""
    os.environ["DISTILL_HOME"] = str(home)
    from fastapi.testclient import TestClient

    from app.cli import migrate
    from app.main import create_app
    from app.ml.students import MlpSpec
    from tests.helpers.api import job_body, upload_teacher
    from tests.helpers.teachers import train_digits_teacher
    from worker.pipeline import run_job

    migrate()
    (home / "teacher").mkdir()
    teacher = train_digits_teacher(MlpSpec(hidden_sizes=[64]), home / "teacher")
    with TestClient(create_app()) as client:
        teacher_id = upload_teacher(client, teacher)["id"]
        job_id: str = client.post("/v1/jobs", json=job_body(teacher_id)).json()["id"]
        run_job(job_id)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    return job_id


def bare_onnxruntime(home: Path, job_id: str, n: int) -> list[float]:
    from app.db import session_scope
    from app.models import DEFAULT_TENANT_ID
    from app.serving.engine import ServingEngine
    from app.serving.service import find_served_model
    from app.storage import get_store

    with session_scope() as session:
        model = find_served_model(session, get_store(), DEFAULT_TENANT_ID, job_id)
    engine = ServingEngine(max_batch=64, max_wait_ms=2, max_bytes=1 << 30)
    loaded = engine.get(model.key("1"), model.paths["1"], model.signature)
    x = {"input": np.zeros((1, 1, 8, 8), np.float32)}
    times = []
    for _ in range(n):
        start = time.perf_counter()
        loaded.run(x)
        times.append(time.perf_counter() - start)
    engine.close()
    return times


def start_server(
    home: Path, max_batch: int, workers: int = 1, auth: str = "disabled"
) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "DISTILL_HOME": str(home),
        "DISTILL_SERVE_MAX_BATCH": str(max_batch),
        "DISTILL_AUTH": auth,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import http.client

    deadline = time.monotonic() + 60
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v2/health/live")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("distill serve did not start")
        time.sleep(0.2)


def _bodies(job_id: str) -> dict[str, tuple[str, str, bytes]]:
    sample = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
    v2 = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": sample.reshape(-1).tolist()}]}  # fmt: skip
    return {
        "noop": ("GET", "/v2/health/live", b""),
        "predict": (
            "POST",
            f"/v1/jobs/{job_id}/predict",
            json.dumps({"inputs": sample.tolist()}).encode(),
        ),
        "infer": ("POST", f"/v2/models/{job_id}/infer", json.dumps(v2).encode()),
    }


def api_key(home: Path) -> dict[str, str]:
    """A new key of the ``default`` tenant (the job's, made without keys) in ``home``'s
    database, as a header."""
    from app.auth import create_key
    from app.db import session_scope

    with session_scope() as session:
        token = create_key(session, "default")[1]
    return {"Authorization": f"Bearer {token}"}


def latencies(
    port: int, method: str, path: str, body: bytes, n: int, auth: dict[str, str] | None = None
) -> list[float]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json", **(auth or {})}
    times = []
    for i in range(n + 50):
        start = time.perf_counter()
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{path}: {response.status}")
        if i >= 50:
            times.append(time.perf_counter() - start)
    return times


def _client_process(
    args: tuple[int, str, bytes, int, float, float, dict[str, str]],
) -> tuple[int, int]:
    """``threads`` clients sending one request after another until ``stop_at``."""
    import http.client

    port, path, body, threads, start_at, stop_at, auth = args
    counts = [0] * threads
    errors = [0] * threads

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Content-Type": "application/json", **auth}
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < stop_at:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                counts[i] += 1
            else:
                errors[i] += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts), sum(errors)


def throughput(
    port: int,
    path: str,
    body: bytes,
    clients: int,
    seconds: float,
    processes: int,
    auth: dict[str, str] | None = None,
) -> tuple[float, int]:
    processes = max(1, min(processes, clients))
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(
            _client_process, [(port, path, body, s, start_at, stop_at, auth or {}) for s in shares]
        )
    done = sum(r[0] for r in results)
    return done / seconds, sum(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="per latency figure")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput figure")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument(
        "--server-workers", type=int, default=1, help="distill serve --workers (throughput)"
    )
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="distill-serving-bench-"))
    job_id = train_job(home)
    print(f"cores: {len(os.sched_getaffinity(0))}; job {job_id}; home {home}")
    rows: list[tuple[str, str, str]] = []
    bare = bare_onnxruntime(home, job_id, args.requests)
    rows.append(("bare onnxruntime, batch 1", _ms(bare, 50), _ms(bare, 99)))

    bodies = _bodies(job_id)
    figures: dict[str, float] = {"bare_p99": percentile(bare, 99)}
    server, port = start_server(home, 64)
    try:
        latencies(port, *bodies["infer"], 20)  # loads the model
        for name, label in (
            ("noop", "HTTP no-op route (/v2/health/live)"),
            ("predict", "/v1/jobs/{id}/predict, batch 1"),
            ("infer", "/v2/models/{id}/infer, batch 1"),
        ):
            times = latencies(port, *bodies[name], args.requests)
            figures[f"{name}_p99"] = percentile(times, 99)
            rows.append((label, _ms(times, 50), _ms(times, 99)))
    finally:
        server.terminate()
        server.wait()
    print()
    print(f"{'latency':<42}{'p50 ms':>10}{'p99 ms':>10}")
    for label, p50, p99 in rows:
        print(f"{label:<42}{p50:>10}{p99:>10}")
    target = 2 * (figures["bare_p99"] + figures["noop_p99"])
    for name in ("predict", "infer"):
        ok = figures[f"{name}_p99"] <= target
        print(
            f"{name} p99 {figures[f'{name}_p99'] * 1e3:.3f} ms vs target "
            f"2 x (bare + no-op) = {target * 1e3:.3f} ms: {'met' if ok else 'MISSED'}"
        )

    print()
    print(f"{'throughput, /v2 infer, single samples':<42}{'1 client':>12}{'64 clients':>12}"
          f"{'ratio':>8}{'errors':>8}")  # fmt: skip
    method, path, body = bodies["infer"]
    for max_batch, label in ((64, "micro-batching (max batch 64)"), (1, "no micro-batching")):
        server, port = start_server(home, max_batch, args.server_workers)
        try:
            latencies(port, method, path, body, 20)
            one, e1 = throughput(port, path, body, 1, args.seconds, 1)
            many, e64 = throughput(port, path, body, 64, args.seconds, args.client_processes)
        finally:
            server.terminate()
            server.wait()
        print(f"{label:<42}{one:>10.0f}/s{many:>10.0f}/s{many / one:>8.2f}{e1 + e64:>8}")

    print()
    print(f"{'API keys, /v2 infer, single samples':<42}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'64 clients':>12}{'errors':>8}")  # fmt: skip
    key = api_key(home)
    for auth, label, headers in (
        ("disabled", "without keys", {}),
        ("required", "keys required (a key sent)", key),
    ):
        server, port = start_server(home, 64, args.server_workers, auth)
        try:
            latencies(port, method, path, body, 20, headers)
            times = latencies(port, method, path, body, args.requests, headers)
            many, errors = throughput(
                port, path, body, 64, args.seconds, args.client_processes, headers
            )
        finally:
            server.terminate()
            server.wait()
        print(f"{label:<42}{_ms(times, 50):>10}{_ms(times, 99):>10}{many:>10.0f}/s{errors:>8}")


def _ms(times: list[float], q: float) -> str:
    return f"{percentile(times, q) * 1e3:.3f}"


if __name__ == "__main__":
    main()
