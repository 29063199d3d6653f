"""``GET /metrics``: jobs read from the database at scrape time, serving and HTTP figures
written per process and summed over every process of the deployment, on both stacks."""

import os
import subprocess
import sys
import textwrap
import uuid

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest import approx

from app.metrics import process_metrics
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ONE_DIGIT = [[[0.0] * 8] * 8]  # one sample of builtin:digits, [1, 8, 8]


def scrape(client: TestClient) -> Samples:
    """Every sample of a scrape, by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_jobs_and_predictions_are_counted(client: TestClient, digits_teacher: TeacherFiles) -> None:
    before = scrape(client)
    assert value(before, "distill_database_up") == 1
    teacher = upload_teacher(client, digits_teacher)
    done, cancelled, waiting = (
        client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"] for _ in range(3)
    )
    run_job(done)
    assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code < 300
    for _ in range(3):
        predict = client.post(f"/v1/jobs/{done}/predict", json={"inputs": [ONE_DIGIT] * 2})
        assert predict.status_code == 200, predict.text

    after = scrape(client)
    for status, count in {"succeeded": 1, "cancelled": 1, "queued": 1, "running": 0}.items():
        assert value(after, "distill_jobs", status=status) == count
    assert value(after, "distill_job_queue_depth") == 1
    assert 0 <= value(after, "distill_job_queue_oldest_age_seconds") < 600
    # Only the job that ran has a duration: the cancelled one never started.
    succeeded = {"status": "succeeded"}
    assert value(after, "distill_job_duration_seconds_count", **succeeded) == 1
    assert value(after, "distill_job_duration_seconds_bucket", le="+Inf", **succeeded) == 1
    assert 0 < value(after, "distill_job_duration_seconds_sum", **succeeded) < 600
    assert value(after, "distill_job_duration_seconds_count", status="cancelled") == 0
    # Each phase it went through, once; together no longer than the job.
    phases = ("validating", "teacher_outputs", "training", "evaluating", "exporting")
    for phase in phases:
        assert value(after, "distill_job_phase_duration_seconds_count", phase=phase) == 1, phase
    spent = sum(value(after, "distill_job_phase_duration_seconds_sum", phase=p) for p in phases)
    assert 0 < spent <= value(after, "distill_job_duration_seconds_sum", **succeeded)
    assert waiting not in str(after)  # no job ids among the database's labels

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = {"model": done, "version": "1"}
    assert delta("distill_predict_duration_seconds_count", **model) == 3
    assert delta("distill_predict_duration_seconds_bucket", le="+Inf", **model) == 3
    assert delta("distill_predict_duration_seconds_sum", **model) > 0
    # Requests one after the other: one run each, of their 2 samples.
    assert delta("distill_serving_batch_size_count") == 3
    assert delta("distill_serving_batch_size_sum") == 6
    assert delta("distill_serving_batch_size_bucket", le="2.0") == 3
    assert delta("distill_serving_model_loads_total") == 1
    assert delta("distill_serving_models_loaded") == 1
    assert delta("distill_serving_models_loaded_bytes") > 0
    route = {"method": "POST", "route": "/v1/jobs/{job_id}/predict"}
    assert delta("distill_http_requests_total", status="200", **route) == 3
    assert delta("distill_http_request_duration_seconds_count", **route) == 3


def test_openmetrics_is_served_to_who_asks_for_it(client: TestClient) -> None:
    response = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "distill_jobs{status=" in response.text


# A process of the deployment: it serves predictions of one model, loads it, then waits for its
# stdin to close before exiting.
CHILD = textwrap.dedent(
    """
    import sys
    from app import metrics

    model, requests = sys.argv[1], int(sys.argv[2])
    for _ in range(requests):
        metrics.observe_predict((model, "1"), 0.2)
    metrics.model_loaded(1000)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_one_scrape_sums_every_process(client: TestClient) -> None:
    """What several processes observed is summed by whichever one is scraped; the gauges of
    processes that ended are dropped, their counts kept."""
    model = f"model-{uuid.uuid4().hex[:8]}"
    directory = process_metrics().directory  # this process's, shared with its children
    base = scrape(client)

    def start(requests: int) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, model, str(requests)],
            env={**os.environ, "DISTILL_METRICS_DIR": str(directory)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        return child

    first, second = start(2), start(5)

    def check(alive: int) -> None:
        samples = scrape(client)

        def delta(name: str) -> float:
            return value(samples, name) - value(base, name)

        served = {"model": model, "version": "1"}
        # The counts of processes that ended stay in the sums.
        assert value(samples, "distill_predict_duration_seconds_count", **served) == 7
        assert value(samples, "distill_predict_duration_seconds_sum", **served) == approx(1.4)
        assert delta("distill_serving_model_loads_total") == 2
        # Gauges are those of live processes only.
        assert delta("distill_serving_models_loaded") == alive
        assert delta("distill_serving_models_loaded_bytes") == 1000 * alive

    check(alive=2)
    first.communicate("")
    check(alive=1)
    second.communicate("")
    check(alive=0)
