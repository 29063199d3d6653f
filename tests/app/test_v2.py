"""Serving a real succeeded job's student over the Open Inference Protocol v2 (REST), talked to
with Triton's own client (``tritonclient[http]``) on a uvicorn server, on both stacks; the
engine's micro-batching and its memory-bounded least-recently-used set."""

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from app.datasets.loading import load_builtin
from app.db import session_scope
from app.serving.engine import ServingEngine, estimate_bytes, get_serving_engine
from app.serving.service import find_served_model
from app.storage import get_store
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.servers import serving, v2_client
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job


@dataclass(frozen=True)
class Served:
    job_id: str
    url: str  # http://host:port
    accuracy: float
    tenant_id: str
    headers: dict[str, str]  # the stack's key, where it needs one


@pytest.fixture
def served(stack: Stack, client: TestClient, digits_teacher: TeacherFiles) -> Iterator[Served]:
    """A succeeded digits job, and the app served by uvicorn in a thread."""
    from app.main import create_app

    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    with serving(create_app()) as address:
        accuracy = job["result"]["student_accuracy"]
        yield Served(job_id, address, accuracy, stack.tenant_id, stack.headers)


def fp32_input(x: np.ndarray, name: str = "input") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32), binary_data=False)
    return tensor


def test_a_student_is_served_over_the_open_inference_protocol(
    client: TestClient, served: Served
) -> None:
    data = load_builtin("builtin:digits")
    triton_client = v2_client(served.url, served.headers)
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.get_server_metadata()["name"] == "distill"
    assert triton_client.is_model_ready(served.job_id)
    assert triton_client.is_model_ready(served.job_id, model_version="1")
    assert not triton_client.is_model_ready(served.job_id, model_version="7")
    assert not triton_client.is_model_ready("no-such-model")

    # An alias names the same student; another job cannot take it.
    put = client.put(f"/v1/jobs/{served.job_id}/alias", json={"alias": "digits-v1"})
    assert put.status_code == 200 and put.json() == {"job_id": served.job_id, "alias": "digits-v1"}
    assert client.get(f"/v1/jobs/{served.job_id}").json()["alias"] == "digits-v1"
    assert client.put(f"/v1/jobs/{served.job_id}/alias", json={"alias": "Bad!"}).status_code == 422
    other = client.put("/v1/jobs/00000000-0000-0000-0000-000000000000/alias", json={"alias": "x"})
    assert other.status_code == 404 and other.headers["content-type"].startswith(
        "application/problem+json"
    )
    assert triton_client.is_model_ready("digits-v1")

    meta = triton_client.get_model_metadata("digits-v1")
    assert meta["name"] == "digits-v1" and meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] in (["1"], ["1", "int8"])  # int8 when the job quantised it
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert triton_client.get_model_metadata(served.job_id, model_version="1")["versions"] == ["1"]

    x = data.x_test.astype(np.float32)
    result = triton_client.infer(
        served.job_id,
        [fp32_input(x)],
        outputs=[triton.InferRequestedOutput("logits", binary_data=False)],
        request_id="req-1",
    )
    response = result.get_response()
    assert response["id"] == "req-1" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["logits"]
    logits = result.as_numpy("logits")
    assert logits is not None and logits.shape == (len(x), 10)
    v2_predictions = logits.argmax(axis=1)
    v1_response = client.post(f"/v1/jobs/{served.job_id}/predict", json={"inputs": x.tolist()})
    assert v1_response.status_code == 200, v1_response.text
    v1 = v1_response.json()
    assert v2_predictions.tolist() == v1["predictions"]
    assert (v2_predictions == data.y_test).mean() == pytest.approx(served.accuracy)
    assert len(v1["labels"]) == len(x) and len(v1["probabilities"][0]) == 10

    both = triton_client.infer("digits-v1", [fp32_input(x[:3])])
    probabilities = both.as_numpy("probabilities")
    assert probabilities is not None and probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        probabilities, np.asarray(v1["probabilities"][:3], np.float32), atol=1e-5
    )

    if "int8" in meta["versions"]:  # the quantised student, as version int8
        quantised = triton_client.infer("digits-v1", [fp32_input(x)], model_version="int8")
        int8_logits = quantised.as_numpy("logits")
        assert int8_logits is not None and quantised.get_response()["model_version"] == "int8"
        assert (int8_logits.argmax(axis=1) == v2_predictions).mean() > 0.9

    # BYTES: parsed as the protocol's strings, refused by an FP32 model with a clear message.
    text = triton.InferInput("input", [1, 1, 8, 8], "BYTES")
    text.set_data_from_numpy(np.full((1, 1, 8, 8), b"a", dtype=object), binary_data=False)
    with pytest.raises(InferenceServerException, match="is BYTES, but this model takes FP32"):
        triton_client.infer(served.job_id, [text])

    # The alias goes; the id still serves.
    assert client.delete(f"/v1/jobs/{served.job_id}/alias").status_code == 204
    assert not triton_client.is_model_ready("digits-v1")
    assert triton_client.is_model_ready(served.job_id)


def test_protocol_errors_are_its_own_json(served: Served) -> None:
    base = f"http://{served.url}/v2/models"
    sample = [0.0] * 64

    def infer(body: object, name: str = served.job_id) -> httpx.Response:
        return httpx.post(f"{base}/{name}/infer", json=body, headers=served.headers)

    def tensor(**overrides: object) -> dict[str, object]:
        return {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": sample} | (
            overrides
        )

    cases = {
        "unknown model": (infer({"inputs": [tensor()]}, "nope"), 404, "Unknown model"),
        "unknown version": (
            httpx.post(
                f"{base}/{served.job_id}/versions/7/infer",
                json={"inputs": [tensor()]},
                headers=served.headers,
            ),
            404,
            "no version '7'",
        ),
        "length": (infer({"inputs": [tensor(data=sample[:-1])]}), 400, "63 elements"),
        "shape": (infer({"inputs": [tensor(shape=[1, 64], data=sample)]}), 400, "has shape"),
        "datatype": (infer({"inputs": [tensor(datatype="INT32")]}), 400, "datatype INT32"),
        "unknown datatype": (infer({"inputs": [tensor(datatype="FP8")]}), 400, "unknown"),
        "strings as FP32": (infer({"inputs": [tensor(data=["a"] * 64)]}), 400, "FP32 numbers"),
        "input name": (infer({"inputs": [tensor(name="x")]}), 400, "Unknown input"),
        "output name": (
            infer({"inputs": [tensor()], "outputs": [{"name": "embedding"}]}),
            400,
            "Unknown output",
        ),
        "not a request": (infer({"inputs": "x"}), 400, "Invalid inference request"),
        "not JSON": (
            httpx.post(f"{base}/{served.job_id}/infer", content=b"{", headers=served.headers),
            400,
            "Invalid inference request",
        ),
        "no such route": (
            httpx.get(f"{base}/{served.job_id}/nothing", headers=served.headers),
            404,
            "Not Found",
        ),
        "NUL in a name": (httpx.get(f"{base}/a%00b", headers=served.headers), 404, "U+0000"),
    }
    for case, (response, status, message) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert response.headers["content-type"] == "application/json", case
        body = response.json()
        assert list(body) == ["error"] and message in body["error"], (case, body)

    # BYTES tensors parse as JSON strings (nested data is accepted, as the protocol allows).
    nested = infer({"inputs": [tensor(shape=[1, 1, 8, 8], data=[[[sample[:8]] * 8]])]})
    assert nested.status_code == 200, nested.text
    assert infer({"inputs": [tensor(datatype="BYTES", data=["x"] * 64)]}).status_code == 400


def test_concurrent_requests_are_micro_batched(served: Served) -> None:
    data = load_builtin("builtin:digits")
    triton_client = v2_client(served.url, served.headers, concurrency=32)
    assert triton_client.is_model_ready(served.job_id)
    model = get_serving_engine().cached((served.job_id, "1"))
    assert model is not None
    runs, requests = model.runs, model.requests
    samples = data.x_test[:32].astype(np.float32)

    body = [fp32_input(samples[i : i + 1]) for i in range(32)]
    barrier = threading.Barrier(32)

    def one(i: int) -> int:
        # tritonclient's HTTP client is not thread-safe: one per thread.
        own = v2_client(served.url, served.headers)
        assert own.is_server_live()
        barrier.wait()
        logits = own.infer(served.job_id, [body[i]]).as_numpy("logits")
        assert logits is not None
        return int(logits.argmax())

    with ThreadPoolExecutor(32) as pool:
        predictions = list(pool.map(one, range(32)))
    single = triton_client.infer(served.job_id, [fp32_input(samples)]).as_numpy("logits")
    assert single is not None and predictions == single.argmax(axis=1).tolist()
    assert model.requests - requests == 33
    batched_runs = model.runs - runs - 1
    print(f"32 concurrent requests in {batched_runs} runs")
    assert batched_runs < 32


def test_the_engine_evicts_the_least_recently_used_model_by_memory(served: Served) -> None:
    with session_scope() as session:
        model = find_served_model(session, get_store(), served.tenant_id, served.job_id)
    path, signature = model.paths["1"], model.signature
    one = estimate_bytes(path)
    engine = ServingEngine(max_batch=8, max_wait_ms=1, max_bytes=2 * one + one // 2)
    try:
        for name in ("a", "b"):
            engine.get((name, "1"), path, signature)
        engine.get(("a", "1"), path, signature)  # a is now the most recently used
        engine.get(("c", "1"), path, signature)  # three do not fit: b goes
        assert engine.loaded() == [("a", "1"), ("c", "1")] and engine.evictions == 1
        assert engine.loaded_bytes == 2 * one
        counted = ServingEngine(max_batch=8, max_wait_ms=1, max_bytes=10**12, max_models=1)
        counted.get(("a", "1"), path, signature)
        counted.get(("b", "1"), path, signature)
        assert counted.loaded() == [("b", "1")]
        counted.close()
        x = np.zeros((2, 1, 8, 8), np.float32)
        evicted = engine.cached(("a", "1"))
        assert evicted is not None and evicted.submit({"input": x}).result().shape == (2, 10)
    finally:
        engine.close()
