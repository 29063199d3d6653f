"""What serving a student costs, measured in one run.

Trains a tiny digits job in process (embedded stack in a temporary home), then times, on its
student:

- bare onnxruntime, batch 1 (the engine's session settings, no HTTP);
- an HTTP no-op route (``/v2/health/live``) on the same server;
- ``/v1/jobs/{id}/predict`` and ``/v2/models/{id}/infer`` at batch 1 (p50, p99);
- throughput of ``/v2/.../infer`` with 1 and with 64 concurrent single-sample clients, with
  micro-batching (``DISTILL_SERVE_MAX_BATCH=64``) and without (``=1``);
- what API keys cost: ``/v2/.../infer`` latency and 64-client throughput with keys required
  (``DISTILL_AUTH=required``, each request's key read from the database) against without;
- what the predict rate quota costs: the same figures with ``DISTILL_QUOTA_PREDICT_RPS`` unset
  against set too high to refuse anything, its count in memory and (when ``--redis-url``
  answers) in Redis; then, with the quota at 20/s, the statuses 64 clients get (429s with
  Retry-After, no 5xx).

Each server is ``distill serve`` (one uvicorn process); clients are processes of threads with
keep-alive connections, so that the client's own cost stays off the server's core.

    python benchmarks/serving.py [--requests 2000] [--seconds 5] [--client-processes 4]
        [--only latency|throughput|keys|quota ...] [--redis-url redis://127.0.0.1:6379/14]
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
from collections import Counter
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
    home: Path,
    max_batch: int,
    workers: int = 1,
    auth: str = "disabled",
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``distill serve`` on a free port, with ``env`` over this process's environment; its
    stderr (the logs) appended to ``log``, or dropped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = os.environ | {
        "DISTILL_HOME": str(home),
        "DISTILL_SERVE_MAX_BATCH": str(max_batch),
        "DISTILL_AUTH": auth,
        **(env or {}),
    }
    serve = ["serve", "--port", str(port), "--workers", str(workers)]
    with open(log or os.devnull, "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *serve],
            env=environment,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
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


NO_RETRY_AFTER = "429 without Retry-After"


def _client_process(
    args: tuple[int, str, bytes, int, float, float, dict[str, str]],
) -> Counter[str]:
    """``threads`` clients sending one request after another until ``stop_at``; the answers
    by status (a 429 lacking Retry-After counted as ``NO_RETRY_AFTER``)."""
    import http.client

    port, path, body, threads, start_at, stop_at, auth = args
    statuses = [Counter[str]() for _ in range(threads)]

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Content-Type": "application/json", **auth}
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < stop_at:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 429 and response.getheader("Retry-After") is None:
                statuses[i][NO_RETRY_AFTER] += 1
            else:
                statuses[i][str(response.status)] += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(statuses, Counter[str]())


def throughput(
    port: int,
    path: str,
    body: bytes,
    clients: int,
    seconds: float,
    processes: int,
    auth: dict[str, str] | None = None,
) -> tuple[float, Counter[str]]:
    """Successful answers per second, and all answers by status (``_client_process``)."""
    processes = max(1, min(processes, clients))
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(
            _client_process, [(port, path, body, s, start_at, stop_at, auth or {}) for s in shares]
        )
    statuses = sum(results, Counter[str]())
    return statuses["200"] / seconds, statuses


def _errors(statuses: Counter[str]) -> int:
    return statuses.total() - statuses["200"]


SECTIONS = ("latency", "throughput", "keys", "quota")
QUOTA_HIGH_RPS = 1_000_000
QUOTA_LOW_RPS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="per latency figure")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput figure")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument(
        "--server-workers", type=int, default=1, help="distill serve --workers (throughput)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="Redis for the quota's count (DISTILL_BROKER_URL); the Redis rows are left out "
        "when it does not answer",
    )
    args = parser.parse_args()
    sections = args.only or SECTIONS
    home = Path(tempfile.mkdtemp(prefix="distill-serving-bench-"))
    job_id = train_job(home)
    print(f"cores: {len(os.sched_getaffinity(0))}; job {job_id}; home {home}")
    bodies = _bodies(job_id)
    if "latency" in sections:
        latency_section(home, job_id, bodies, args.requests)
    if "throughput" in sections:
        throughput_section(home, bodies, args)
    if "keys" in sections:
        keys_section(home, bodies, args)
    if "quota" in sections:
        quota_section(home, bodies, args)


def latency_section(
    home: Path, job_id: str, bodies: dict[str, tuple[str, str, bytes]], requests: int
) -> None:
    rows: list[tuple[str, str, str]] = []
    bare = bare_onnxruntime(home, job_id, requests)
    rows.append(("bare onnxruntime, batch 1", _ms(bare, 50), _ms(bare, 99)))
    figures: dict[str, float] = {"bare_p99": percentile(bare, 99)}
    server, port = start_server(home, 64)
    try:
        latencies(port, *bodies["infer"], 20)  # loads the model
        for name, label in (
            ("noop", "HTTP no-op route (/v2/health/live)"),
            ("predict", "/v1/jobs/{id}/predict, batch 1"),
            ("infer", "/v2/models/{id}/infer, batch 1"),
        ):
            times = latencies(port, *bodies[name], requests)
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


def throughput_section(
    home: Path, bodies: dict[str, tuple[str, str, bytes]], args: argparse.Namespace
) -> None:
    print()
    print(f"{'throughput, /v2 infer, single samples':<42}{'1 client':>12}{'64 clients':>12}"
          f"{'ratio':>8}{'errors':>8}")  # fmt: skip
    method, path, body = bodies["infer"]
    for max_batch, label in ((64, "micro-batching (max batch 64)"), (1, "no micro-batching")):
        server, port = start_server(home, max_batch, args.server_workers)
        try:
            latencies(port, method, path, body, 20)
            one, s1 = throughput(port, path, body, 1, args.seconds, 1)
            many, s64 = throughput(port, path, body, 64, args.seconds, args.client_processes)
        finally:
            server.terminate()
            server.wait()
        errors = _errors(s1) + _errors(s64)
        print(f"{label:<42}{one:>10.0f}/s{many:>10.0f}/s{many / one:>8.2f}{errors:>8}")


def keys_section(
    home: Path, bodies: dict[str, tuple[str, str, bytes]], args: argparse.Namespace
) -> None:
    print()
    print(f"{'API keys, /v2 infer, single samples':<42}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'64 clients':>12}{'errors':>8}")  # fmt: skip
    method, path, body = bodies["infer"]
    key = api_key(home)
    for auth, label, headers in (
        ("disabled", "without keys", {}),
        ("required", "keys required (a key sent)", key),
    ):
        server, port = start_server(home, 64, args.server_workers, auth)
        try:
            latencies(port, method, path, body, 20, headers)
            times = latencies(port, method, path, body, args.requests, headers)
            many, statuses = throughput(
                port, path, body, 64, args.seconds, args.client_processes, headers
            )
        finally:
            server.terminate()
            server.wait()
        print(
            f"{label:<42}{_ms(times, 50):>10}{_ms(times, 99):>10}{many:>10.0f}/s"
            f"{_errors(statuses):>8}"
        )


def quota_section(
    home: Path, bodies: dict[str, tuple[str, str, bytes]], args: argparse.Namespace
) -> None:
    """``DISTILL_QUOTA_PREDICT_RPS`` unset against set beyond reach (what counting costs), the
    count in memory and in Redis (``DISTILL_BROKER_URL`` with the embedded database); then set
    low, where 64 clients must get 429s with Retry-After and no 5xx. The servers' logs are
    searched for anything but INFO lines (an event-loop or Redis warning, a traceback)."""
    method, path, body = bodies["infer"]
    storages: list[tuple[str, dict[str, str]]] = [("memory", {})]
    if _limits_keys(args.redis_url) is None:
        print(f"\nRedis at {args.redis_url} does not answer: the Redis rows are left out")
    else:
        storages.append(("Redis", {"DISTILL_BROKER_URL": args.redis_url}))
    log = home / "quota-servers.log"
    print()
    print(f"{'predict rate quota, /v2 infer, 1 sample':<42}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'64 clients':>12}{'errors':>8}   ratios p50 / p99 / 64 clients")  # fmt: skip
    configs: list[tuple[str, dict[str, str]]] = [("quota unset", {})] + [
        (f"{QUOTA_HIGH_RPS:,}/s, counted in {name}", env | _quota(QUOTA_HIGH_RPS))
        for name, env in storages
    ]
    base: tuple[float, float, float] | None = None
    for label, env in configs:
        server, port = start_server(home, 64, args.server_workers, env=env, log=log)
        try:
            fields = rate_limit_fields(port, method, path, body)
            assert bool(fields) == bool(env), f"{label}: RateLimit fields {fields}"
            latencies(port, method, path, body, 20)
            times = latencies(port, method, path, body, args.requests)
            many, statuses = throughput(port, path, body, 64, args.seconds, args.client_processes)
            if "DISTILL_BROKER_URL" in env:
                keys = _limits_keys(args.redis_url)
                assert keys, f"{label}: no limits keys in {args.redis_url}"
        finally:
            server.terminate()
            server.wait()
        figures = (percentile(times, 50), percentile(times, 99), many)
        base = base or figures
        ratios = " / ".join(f"{f / b:.2f}" for f, b in zip(figures, base, strict=True))
        print(
            f"{label:<42}{_ms(times, 50):>10}{_ms(times, 99):>10}{many:>10.0f}/s"
            f"{_errors(statuses):>8}   {ratios}"
        )

    print()
    print(f"quota {QUOTA_LOW_RPS}/s, 64 clients for {args.seconds:g} s: answers by status")
    for name, env in storages:
        server, port = start_server(
            home, 64, args.server_workers, env=env | _quota(QUOTA_LOW_RPS), log=log
        )
        try:
            many, statuses = throughput(port, path, body, 64, args.seconds, args.client_processes)
        finally:
            server.terminate()
            server.wait()
        counts = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"  counted in {name:<8}{counts}  ({many:.1f} successes/s)")
        assert statuses["429"] and not statuses[NO_RETRY_AFTER], statuses
        assert not any(status.startswith("5") for status in statuses), statuses

    others = [line for line in log.read_text().splitlines() if line and " INFO " not in line]
    print(f"server log lines other than INFO ({log}): {len(others)}")
    for line in list(dict.fromkeys(others))[:10]:
        print(f"  {line[:160]}")


def _quota(rps: int) -> dict[str, str]:
    return {"DISTILL_QUOTA_PREDICT_RPS": str(rps)}


def rate_limit_fields(port: int, method: str, path: str, body: bytes) -> dict[str, str]:
    """The RateLimit and RateLimit-Policy fields of one answer (none without a quota)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    assert response.status == 200, response.status
    return {
        name: value
        for name, value in response.getheaders()
        if name.lower() in ("ratelimit", "ratelimit-policy")
    }


def _limits_keys(url: str) -> int | None:
    """How many keys of the ``limits`` library Redis at ``url`` holds; None when it does not
    answer."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2) as client:
            return sum(1 for _ in client.scan_iter(match="LIMITS*"))
    except redis.RedisError:
        return None


def _ms(times: list[float], q: float) -> str:
    return f"{percentile(times, q) * 1e3:.3f}"


if __name__ == "__main__":
    main()
