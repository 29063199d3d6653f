"""The ``distill`` client commands against a real API (uvicorn) and a real Celery worker, on both
stacks: upload, submit and watch, list, show, metrics, download, predict, cancel; ``--json``
output and exit codes. ``distill keys`` on the stack's database, its keys used with --api-key
against an API that requires them; up, api and serve refusing to listen beyond loopback with
authentication off."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner, Result

from app.cli import EXIT_API_ERROR, EXIT_JOB_CANCELLED, EXIT_USAGE, app, may_listen
from app.config import Settings
from app.datasets.loading import load_builtin
from app.db import session_scope
from app.models import ApiKey, Tenant
from tests.helpers.api import job_body, npz_bytes
from tests.helpers.servers import free_port
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles
from tests.helpers.workers import StartWorker

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def distill(url: str, *args: str) -> Result:
    """``distill ARGS --url URL``, in process."""
    return CliRunner().invoke(app, [*args, "--url", url])


def as_json(result: Result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_upload_submit_watch_and_use_the_student(
    url: str, digits_teacher: TeacherFiles, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker()
    teacher = as_json(distill(url, "teachers", "upload", str(digits_teacher.onnx), "--json"))
    assert isinstance(teacher, dict) and teacher["format"] == "onnx"
    listed = distill(url, "teachers", "list")
    assert listed.exit_code == 0 and teacher["id"] in listed.stdout
    shown = distill(url, "teachers", "show", teacher["id"])
    assert shown.exit_code == 0 and teacher["sha256"] in shown.stdout

    data = load_builtin("builtin:digits")
    dataset_file = tmp_path / "digits.npz"
    dataset_file.write_bytes(npz_bytes(x=data.x_train, y=data.y_train))
    dataset = as_json(distill(url, "datasets", "upload", str(dataset_file), "--json"))
    assert isinstance(dataset, dict) and dataset["num_classes"] == 10
    datasets = as_json(distill(url, "datasets", "list", "--json"))
    assert isinstance(datasets, list)
    assert {"builtin:digits", dataset["ref"]} <= {d["ref"] for d in datasets}

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(job_body("replaced by --teacher")))
    watched = distill(url, "jobs", "submit", str(spec), "--teacher", teacher["id"], "--watch")
    assert watched.exit_code == 0, watched.output
    assert "teacher vs student" in watched.stdout and "test accuracy" in watched.stdout
    job_id = watched.stdout.split()[1]

    job = as_json(distill(url, "jobs", "show", job_id, "--json"))
    assert isinstance(job, dict) and job["status"] == "succeeded"
    assert f"{job['result']['student_accuracy']:.4f}" in watched.stdout
    page = as_json(distill(url, "jobs", "list", "--status", "succeeded", "--json"))
    assert isinstance(page, dict) and [j["id"] for j in page["items"]] == [job_id]
    metrics = as_json(distill(url, "jobs", "metrics", job_id, "--json"))
    assert isinstance(metrics, list) and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert "val_accuracy" in distill(url, "jobs", "metrics", job_id).stdout

    artifact = as_json(distill(url, "download", job_id, "-o", str(tmp_path), "--json"))
    assert isinstance(artifact, dict)
    onnx = Path(artifact["path"])
    assert onnx.parent == tmp_path and onnx.name == f"{job_id}-model.onnx"
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == artifact["sha256"]
    manifest = tmp_path / "manifest.json"
    fetched = distill(url, "download", job_id, "--format", "manifest", "-o", str(manifest))
    assert fetched.exit_code == 0 and json.loads(manifest.read_text())["format_version"] == 2

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"inputs": data.x_test[:20].tolist()}))
    answer = as_json(distill(url, "predict", job_id, str(inputs), "--json"))
    assert isinstance(answer, dict)
    accuracy = (np.array(answer["predictions"]) == data.y_test[:20]).mean()
    assert accuracy > 0.7 and len(answer["probabilities"]) == 20
    assert distill(url, "predict", job_id, str(inputs)).stdout.count("\n") > 20

    # The teacher is used by a finished job only: it may go.
    assert distill(url, "teachers", "rm", teacher["id"]).exit_code == 0
    missing = distill(url, "teachers", "show", teacher["id"])
    assert missing.exit_code == EXIT_API_ERROR and "not_found" in missing.stderr


def test_cancel_watch_and_errors(
    url: str, digits_teacher: TeacherFiles, client: TestClient, tmp_path: Path
) -> None:
    """No worker: a job stays queued, so a cancel ends it at once."""
    teacher = client.post(
        "/v1/teachers", files={"file": ("t.onnx", digits_teacher.onnx.read_bytes())}
    ).json()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(job_body(teacher["id"])))
    job = as_json(distill(url, "jobs", "submit", str(spec), "--json"))
    assert isinstance(job, dict) and job["status"] == "queued"

    cancelled = distill(url, "jobs", "cancel", job["id"])
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    watched = distill(url, "jobs", "watch", job["id"], "--json")
    assert watched.exit_code == EXIT_JOB_CANCELLED
    assert json.loads(watched.stdout)["status"] == "cancelled"

    again = distill(url, "jobs", "cancel", job["id"], "--json")
    assert again.exit_code == EXIT_API_ERROR
    # The last line: the server in this process logs to stderr too.
    problem = json.loads(again.stderr.splitlines()[-1])
    assert problem["status"] == 409 and problem["code"]
    not_ready = distill(url, "download", job["id"])
    assert not_ready.exit_code == EXIT_API_ERROR and "job_not_ready" in not_ready.stderr

    refused = tmp_path / "refused.json"
    refused.write_text(json.dumps(job_body(teacher["id"], dataset="builtin:nope")))
    invalid = distill(url, "jobs", "submit", str(refused))
    assert invalid.exit_code == EXIT_API_ERROR and "422" in invalid.stderr

    assert distill(url, "jobs", "submit", str(tmp_path / "missing.json")).exit_code == 2
    assert distill(url, "jobs", "list", "--limit", "0").exit_code == 2
    unreachable = CliRunner().invoke(
        app, ["jobs", "list"], env={"DISTILL_URL": "http://127.0.0.1:9"}
    )
    assert unreachable.exit_code == EXIT_API_ERROR and "cannot reach" in unreachable.stderr


def keys(*args: str) -> Result:
    """``distill keys ARGS``, in process, on the stack's database."""
    return CliRunner().invoke(app, ["keys", *args])


def test_keys_create_list_revoke(stack: Stack) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    admin = as_json(
        keys(
            "create",
            *("--tenant", tenant, "--role", "admin", "--name", "ci", "--expires-in-days", "30"),
            "--json",
        )
    )
    assert isinstance(admin, dict) and admin["key"].startswith(f"dsk_{admin['prefix']}_")
    assert (admin["tenant"], admin["role"], admin["name"]) == (tenant, "admin", "ci")
    lifetime = datetime.fromisoformat(admin["expires_at"]) - datetime.fromisoformat(
        admin["created_at"]
    )
    assert abs(lifetime - timedelta(days=30)) < timedelta(minutes=1)

    shown = keys("create", "--tenant", tenant)
    assert shown.exit_code == 0, shown.output
    assert "store it now: it is not shown again" in shown.stdout and "never" in shown.stdout
    member = shown.stdout.splitlines()[-1]
    member_prefix = member.split("_")[1]
    assert member.startswith("dsk_") and member_prefix in shown.stdout.splitlines()[0]

    listed = as_json(keys("list", "--tenant", tenant, "--json"))
    assert isinstance(listed, list)
    assert [k["prefix"] for k in listed] == [member_prefix, admin["prefix"]]  # newest first
    assert [k["role"] for k in listed] == ["member", "admin"]
    assert set(listed[1]) == set(admin) - {"key"} and listed[1]["revoked_at"] is None
    with session_scope() as session:
        hashes = session.scalars(
            select(ApiKey.hash).join(Tenant).where(Tenant.name == tenant)
        ).all()
    table = keys("list")
    assert table.exit_code == 0 and member_prefix in table.stdout
    assert len(hashes) == 2
    assert not any(secret in table.stdout for secret in [*hashes, member, admin["key"]])

    revoked = keys("revoke", member)  # the whole key does as well as its prefix
    assert revoked.exit_code == 0 and f"Key {member_prefix} of tenant {tenant} revoked" in (
        revoked.stdout
    )
    listed = as_json(keys("list", "--tenant", tenant, "--json"))
    assert isinstance(listed, list)
    assert [k["revoked_at"] is not None for k in listed] == [True, False]

    unknown = keys("revoke", "0000beef")
    assert unknown.exit_code == EXIT_API_ERROR
    assert "No key has the prefix '0000beef'" in unknown.stderr
    too_long = keys("create", "--tenant", "t" * 65, "--json")
    assert too_long.exit_code == EXIT_API_ERROR
    assert json.loads(too_long.stderr.splitlines()[-1])["field"] == "tenant"
    assert keys("create", "--tenant", tenant, "--role", "owner").exit_code == 2
    assert keys("create", "--role", "admin").exit_code == 2  # --tenant is required


def test_api_key_option_and_the_hint(keyed_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_API_KEY", raising=False)
    key = as_json(keys("create", "--tenant", f"cli-{uuid.uuid4().hex[:8]}", "--json"))
    assert isinstance(key, dict)

    assert distill(keyed_url, "teachers", "list", "--api-key", key["key"]).exit_code == 0
    from_env = CliRunner().invoke(
        app, ["jobs", "list", "--url", keyed_url], env={"DISTILL_API_KEY": key["key"]}
    )
    assert from_env.exit_code == 0, from_env.output

    anonymous = distill(keyed_url, "teachers", "list")
    assert anonymous.exit_code == EXIT_API_ERROR
    assert "401 unauthorized" in anonymous.stderr
    assert "this server needs an API key: --api-key or DISTILL_API_KEY" in anonymous.stderr

    assert keys("revoke", key["prefix"]).exit_code == 0
    refused = distill(keyed_url, "jobs", "list", "--api-key", key["key"], "--json")
    assert refused.exit_code == EXIT_API_ERROR
    problem = json.loads(refused.stderr.splitlines()[-1])
    assert (problem["status"], problem["code"]) == (401, "key_revoked")
    assert "Hint" not in refused.stderr  # --json: the problem only


def test_who_may_listen_where() -> None:
    embedded = Settings(database_url=None, auth=None)
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost", "LocalHost"):
        assert may_listen(host, embedded), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com", ""):
        assert not may_listen(host, embedded), host
        assert may_listen(host, Settings(database_url=None, auth="disabled")), host
        assert may_listen(host, Settings(database_url=None, auth="required")), host
        server = Settings(database_url="postgresql+psycopg://db/distill", auth=None)
        assert may_listen(host, server), host


@pytest.mark.parametrize("command", ["up", "api", "serve"])
def test_servers_refuse_to_listen_beyond_loopback_without_auth(
    command: str, tmp_path: Path
) -> None:
    """Embedded, authentication off by default: 0.0.0.0 is refused before anything starts."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    args = [sys.executable, "-m", "app.cli", command, "--host", "0.0.0.0", "--port"]
    process = subprocess.Popen(
        [*args, str(free_port())],
        cwd=ROOT,
        env=env | {"DISTILL_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # it started after all: take its whole session down
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == EXIT_USAGE, stdout + stderr
    assert f"distill {command}: refusing to listen on 0.0.0.0" in stderr
    assert "DISTILL_AUTH=disabled" in stderr and stdout == ""
    assert not home.exists()  # not migrated, nothing started
