"""Teachers and data as users really export them: each case of issue 9, through the API and a
job run in process (``worker.pipeline.run_job``) on both stacks.

The teacher is one MLP fitted on digits (inputs in [0, 1]) and exported to ONNX in the ways
users export it: as logits, ending in Softmax or LogSoftmax, with its features output first,
with unnamed outputs, with a batch of 1, taking float16 or float64, returning NaN or -inf.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.datasets.arrays import DatasetArrays
from app.datasets.loading import load_builtin
from tests.helpers.api import npz_bytes
from tests.helpers.onnx_teachers import MlpWeights, TeacherOptions, fit_mlp, write_onnx_teacher
from worker.pipeline import run_job

STUDENT = {"architecture": "mlp", "hidden_sizes": [32]}
TRAINING = {"epochs": 3, "batch_size": 64, "learning_rate": 0.01, "seed": 0}


@pytest.fixture(scope="module")
def digits() -> DatasetArrays:
    return load_builtin("builtin:digits")


@pytest.fixture(scope="module")
def weights(digits: DatasetArrays) -> MlpWeights:
    assert digits.y_train is not None
    return fit_mlp(digits.x_train, digits.y_train, 10, hidden=32, steps=200)


def teacher_accuracy(weights: MlpWeights, data: DatasetArrays) -> float:
    return float((weights.logits(data.x_test).argmax(-1) == data.y_test).mean())


def upload(
    client: TestClient,
    weights: MlpWeights,
    tmp_path: Path,
    input_shape: tuple[int, ...] = (1, 8, 8),
    form: dict[str, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    path = tmp_path / "teacher.onnx"
    export: TeacherOptions = options  # type: ignore[assignment]
    write_onnx_teacher(weights, input_shape, path, **export)
    with open(path, "rb") as f:
        response = client.post("/v1/teachers", files={"file": ("teacher.onnx", f)}, data=form or {})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def upload_dataset(
    client: TestClient, classes: list[str] | None = None, **arrays: np.ndarray
) -> str:
    form = {} if classes is None else {"classes": json.dumps(classes)}
    response = client.post(
        "/v1/datasets", files={"file": ("data.npz", npz_bytes(**arrays))}, data=form
    )
    assert response.status_code == 201, response.text
    ref: str = response.json()["ref"]
    return ref


def submit(client: TestClient, teacher: object, dataset: str = "builtin:digits") -> Any:
    body = {"teacher": teacher, "dataset": dataset, "student": STUDENT, "training": TRAINING}
    return client.post("/v1/jobs", json=body)


def run(client: TestClient, teacher: object, dataset: str = "builtin:digits") -> dict[str, Any]:
    response = submit(client, teacher, dataset)
    assert response.status_code == 202, response.text
    run_job(response.json()["id"])
    job: dict[str, Any] = client.get(f"/v1/jobs/{response.json()['id']}").json()
    return job


def served(client: TestClient, job_id: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    response = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    return np.array(body["predictions"]), np.array(body["probabilities"])


def warning_codes(job: dict[str, Any]) -> set[str]:
    return {w["code"] for w in job["preflight"]["warnings"]}


# 1. Constant input features.


def test_constant_features_keep_scale_one_at_serving(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """Flat [N, 64] digits: three pixel columns are zero in every training sample. A faint
    value (1/16) there at serving used to turn 0.958 into 0.092; now it barely moves."""
    flat_train = digits.x_train.reshape(-1, 64)
    flat_test = digits.x_test.reshape(-1, 64)
    constant = np.flatnonzero(flat_train.max(0) == flat_train.min(0))
    assert len(constant) == 3 and not flat_train[:, constant].any()
    teacher = upload(client, weights, tmp_path, input_shape=(64,))
    dataset = upload_dataset(
        client, x=flat_train, y=digits.y_train, x_test=flat_test, y_test=digits.y_test
    )
    job = run(client, teacher["id"], dataset)
    assert job["status"] == "succeeded", job["error"]
    assert "constant_features" in warning_codes(job)
    reported = job["result"]["student_accuracy"]
    predictions, _ = served(client, job["id"], flat_test)
    assert (predictions == digits.y_test).mean() == pytest.approx(reported)
    faint = flat_test.copy()
    faint[:, constant] = 1 / 16
    predictions, _ = served(client, job["id"], faint)
    assert (predictions == digits.y_test).mean() >= reported - 0.02


def test_a_three_sample_dataset_trains(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """The smallest upload (3 samples: 1 to train, 1 to validate, 1 to test) gave a NaN std and
    an internal error; now every statistic is defined."""
    right = np.flatnonzero(weights.logits(digits.x_train).argmax(-1) == digits.y_train)
    pick = right[[0, 1, 2]]
    teacher = upload(client, weights, tmp_path, input_shape=(1, 8, 8))
    dataset = upload_dataset(client, x=digits.x_train[pick], y=digits.y_train[pick])
    job = run(client, teacher["id"], dataset)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert (result["train_samples"], result["val_samples"], result["test_samples"]) == (1, 1, 1)
    assert all(np.isfinite(v) for v in result.values() if isinstance(v, float))


# 2. Probabilities and log-probabilities.


def test_softmax_and_log_softmax_teachers_give_the_logit_teachers_figures(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """Scores that are probabilities (a graph ending in Softmax) or log-probabilities are
    detected and turned into logits once: the job's teacher figures are the logit teacher's,
    and the served student is confident (its top-1 probability averaged 0.32 when they were
    softmaxed twice)."""
    jobs = {}
    for head in ("logits", "probabilities", "log_probabilities"):
        teacher = upload(client, weights, tmp_path, head=head)
        assert teacher["signature"]["outputs"][0]["kind"] == "logits"  # not yet seen
        jobs[head] = run(client, teacher["id"])
        assert jobs[head]["status"] == "succeeded", jobs[head]["error"]
        stored = client.get(f"/v1/teachers/{teacher['id']}").json()
        assert stored["signature"]["outputs"][0]["kind"] == head
        assert stored["scores_choice"]["kind_by"] == "detected"
    logit_result = jobs["logits"]["result"]
    assert logit_result["teacher_accuracy"] == pytest.approx(teacher_accuracy(weights, digits))
    for head in ("probabilities", "log_probabilities"):
        result = jobs[head]["result"]
        assert "output_kind_detected" in warning_codes(jobs[head])
        assert result["teacher_accuracy"] == logit_result["teacher_accuracy"]
        assert result["teacher_ece"] == pytest.approx(logit_result["teacher_ece"], abs=1e-4)
        assert result["student_accuracy"] == pytest.approx(
            logit_result["student_accuracy"], abs=0.02
        )
        _, probabilities = served(client, jobs[head]["id"], digits.x_test)
        assert probabilities.max(-1).mean() > 0.8


def test_a_declared_kind_the_scores_contradict_is_refused(
    client: TestClient, tmp_path: Path, weights: MlpWeights
) -> None:
    teacher = upload(client, weights, tmp_path, form={"output_kind": "probabilities"})
    assert teacher["scores_choice"]["kind_by"] == "declared"
    response = submit(client, teacher["id"])
    assert response.status_code == 422
    assert response.json()["code"] == "output_kind_mismatch"


# 3. Non-finite scores.


def test_nan_scores_are_refused_at_submission_with_their_count(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """The graph answers NaN for samples whose first pixel is set (every fourth, here): the
    preflight counts them in its sample of 512 and refuses."""
    assert digits.y_train is not None
    x = digits.x_train.copy()
    x[::4, 0, 0, 0] = 1.0
    teacher = upload(client, weights, tmp_path, non_finite="nan_rows", nan_threshold=0.5)
    dataset = upload_dataset(
        client, x=x, y=digits.y_train, x_test=digits.x_test, y_test=digits.y_test
    )
    sample = np.sort(np.random.default_rng(0).permutation(len(x))[:512])
    expected = int((x[sample, 0, 0, 0] > 0.5).sum())
    assert 100 < expected < 412
    response = submit(client, teacher["id"], dataset)
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["samples"]) == ("teacher_non_finite", expected)
    assert f"{expected} of 512" in body["detail"]
    # The rows named are rows of the dataset, not positions in the sample.
    nan_rows = sample[x[sample, 0, 0, 0] > 0.5][:5].tolist()
    assert body["rows"] == nan_rows and str(nan_rows) in body["detail"]


def test_nan_scores_fail_the_job_when_the_worker_runs_the_preflight(
    client: TestClient,
    tmp_path: Path,
    weights: MlpWeights,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.config import get_settings

    monkeypatch.setattr(get_settings(), "preflight_max_bytes", 0)
    teacher = upload(client, weights, tmp_path, non_finite="nan_rows", nan_threshold=-1.0)
    job = run(client, teacher["id"])
    assert job["preflight"] is None  # the worker's preflight refused: nothing recorded
    assert (job["status"], job["error"]["code"]) == ("failed", "teacher_non_finite")
    assert "512 of 512" in job["error"]["detail"]


def test_minus_inf_log_probabilities_are_zero_probabilities(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """Each row's least likely class is exactly -inf (the log of a zero probability): the job
    trains with finite losses, and no figure is stored as null."""
    teacher = upload(
        client, weights, tmp_path, head="log_probabilities", non_finite="neg_inf_entries"
    )
    job = run(client, teacher["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["teacher_accuracy"] == pytest.approx(teacher_accuracy(weights, digits))
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    assert metrics and all(
        isinstance(v, float) and np.isfinite(v) for m in metrics for v in m["values"].values()
    )
    assert job["result"]["kl_to_teacher"] is not None and job["result"]["teacher_ece"] is not None


# 4. The wrong output taken as the scores.


def test_outputs_named_logits_are_the_scores_whatever_their_order(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """Exported as (features[32], logits[10]): a 128-class model before; now 10 classes."""
    teacher = upload(client, weights, tmp_path, features="first")
    assert teacher["num_classes"] == 10 and teacher["output_name"] == "logits"
    assert teacher["scores_choice"]["by"] == "name"
    assert [layer["name"] for layer in teacher["feature_layers"]] == ["features"]
    job = run(client, teacher["id"])
    assert job["result"]["teacher_accuracy"] == pytest.approx(teacher_accuracy(weights, digits))
    result = job["result"]
    # 32100% when the 128 features were taken as scores; now the plain ratio, near 100%.
    assert result["accuracy_retained"] == pytest.approx(
        100 * result["student_accuracy"] / result["teacher_accuracy"]
    )
    assert 80 < result["accuracy_retained"] < 105
    _, probabilities = served(client, job["id"], digits.x_test[:5])
    assert probabilities.shape == (5, 10)


def test_unnamed_outputs_are_chosen_by_the_datasets_class_count(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    teacher = upload(
        client,
        weights,
        tmp_path,
        features="first",
        features_name="output_0",
        scores_name="output_1",
    )
    assert (teacher["output_name"], teacher["scores_choice"]["by"]) == ("output_0", "position")
    job = run(client, teacher["id"])
    assert job["status"] == "succeeded", job["error"]
    assert "scores_output_chosen" in warning_codes(job)
    assert job["result"]["teacher_accuracy"] == pytest.approx(teacher_accuracy(weights, digits))
    stored = client.get(f"/v1/teachers/{teacher['id']}").json()
    assert (stored["output_name"], stored["scores_choice"]["by"]) == ("output_1", "classes")
    assert [layer["name"] for layer in stored["feature_layers"]] == ["output_0"]


def test_the_output_field_chooses_the_scores(
    client: TestClient, tmp_path: Path, weights: MlpWeights
) -> None:
    options: dict[str, Any] = {
        "features": "first",
        "features_name": "output_0",
        "scores_name": "output_1",
    }
    teacher = upload(client, weights, tmp_path, form={"output": "output_1"}, **options)
    assert (teacher["output_name"], teacher["scores_choice"]["by"]) == ("output_1", "declared")
    path = tmp_path / "teacher.onnx"
    with open(path, "rb") as f:
        response = client.post(
            "/v1/teachers", files={"file": ("teacher.onnx", f)}, data={"output": "probs"}
        )
    assert (response.status_code, response.json()["field"]) == (422, "output")
    assert "output_1" in response.json()["detail"]


# 5. Labels that do not match the teacher.


def test_labels_shifted_against_the_teacher_fail_fast_naming_the_offset(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    assert digits.y_train is not None
    teacher = upload(client, weights, tmp_path)
    shifted = upload_dataset(
        client,
        x=digits.x_train,
        y=(digits.y_train + 1) % 10,
        x_test=digits.x_test,
        y_test=(digits.y_test + 1) % 10,
    )
    response = submit(client, teacher["id"], shifted)
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["label_offset"]) == ("teacher_below_chance", 1)
    assert "shifted by +1" in body["detail"]


def test_labels_from_one_are_refused_at_upload(client: TestClient, digits: DatasetArrays) -> None:
    assert digits.y_train is not None
    response = client.post(
        "/v1/datasets",
        files={"file": ("data.npz", npz_bytes(x=digits.x_train, y=digits.y_train + 1))},
    )
    assert response.status_code == 422
    assert (response.json()["code"], response.json()["field"]) == ("labels_not_zero_based", "y")
    assert "11" in response.json()["detail"]


def test_class_names_map_labels_to_the_teachers_classes(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    """The dataset numbers its classes in another order than the teacher: matched by name."""
    assert digits.y_train is not None
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    order = np.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])  # dataset label i names digit order[i]
    relabel = np.argsort(order)  # digit d -> dataset label
    teacher = upload(client, weights, tmp_path, form={"classes": json.dumps(names)})
    dataset = upload_dataset(
        client,
        classes=[names[d] for d in order],
        x=digits.x_train,
        y=relabel[digits.y_train],
        x_test=digits.x_test,
        y_test=relabel[digits.y_test],
    )
    job = run(client, teacher["id"], dataset)
    assert job["status"] == "succeeded", job["error"]
    assert job["preflight"]["label_map"] == order.tolist()
    assert job["result"]["teacher_accuracy"] == pytest.approx(teacher_accuracy(weights, digits))
    response = client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": digits.x_test.tolist()})
    labels = np.array(response.json()["labels"])
    assert (labels == np.array(names)[digits.y_test]).mean() == pytest.approx(
        job["result"]["student_accuracy"]
    )
    other = upload_dataset(
        client, classes=[f"class {i}" for i in range(10)], x=digits.x_train, y=digits.y_train
    )
    response = submit(client, teacher["id"], other)
    assert (response.status_code, response.json()["code"]) == (422, "class_names_mismatch")


# 6. A batch dimension fixed at 1.


def test_a_teacher_with_batch_one_runs_one_sample_at_a_time(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    teacher = upload(client, weights, tmp_path, batch=1)
    job = run(client, teacher["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["teacher_fixed_batch"] == 1
    assert "teacher_fixed_batch" in warning_codes(job)
    assert job["result"]["teacher_accuracy"] == pytest.approx(teacher_accuracy(weights, digits))


# 7. Pixels in 0..255 for a teacher trained on [0, 1].


def test_declared_image_scale_feeds_the_teacher_and_the_student_takes_stored_pixels(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights
) -> None:
    assert digits.y_train is not None
    pixels = {
        name: np.round(getattr(digits, name) * 255).astype(np.uint8)
        for name in ("x_train", "x_test")
    }
    dataset = client.post(
        "/v1/datasets",
        files={
            "file": (
                "pixels.npz",
                npz_bytes(
                    x=pixels["x_train"],
                    y=digits.y_train,
                    x_test=pixels["x_test"],
                    y_test=digits.y_test,
                ),
            )
        },
    ).json()
    assert dataset["input_stats"]["dtype"] == "uint8"
    assert (dataset["input_stats"]["min"], dataset["input_stats"]["max"]) == (0, 255)
    expected = float(
        (weights.logits(pixels["x_test"] / np.float32(255)).argmax(-1) == digits.y_test).mean()
    )

    undeclared = upload(client, weights, tmp_path)
    job = run(client, undeclared["id"], dataset["ref"])
    assert job["status"] == "succeeded", job["error"]
    assert "input_scale_suspect" in warning_codes(job)
    assert job["result"]["teacher_accuracy"] < expected - 0.01

    declared = upload(
        client,
        weights,
        tmp_path,
        form={"preprocessing": json.dumps({"kind": "image", "scale": 1 / 255})},
    )
    job = run(client, declared["id"], dataset["ref"])
    assert job["status"] == "succeeded", job["error"]
    assert not warning_codes(job) & {"input_scale_suspect", "input_range"}
    assert job["result"]["teacher_accuracy"] == pytest.approx(expected)
    predictions, _ = served(client, job["id"], pixels["x_test"].astype(np.float32))
    assert (predictions == digits.y_test).mean() == pytest.approx(job["result"]["student_accuracy"])


# 8. float16 and float64 inputs.


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_float16_and_float64_teachers_are_fed_their_dtype(
    client: TestClient, tmp_path: Path, digits: DatasetArrays, weights: MlpWeights, dtype: str
) -> None:
    teacher = upload(client, weights, tmp_path, input_dtype=dtype)
    assert teacher["signature"]["inputs"][0]["datatype"] == {"float16": "FP16"}.get(dtype, "FP64")
    job = run(client, teacher["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["teacher_accuracy"] == pytest.approx(
        teacher_accuracy(weights, digits), abs=0.01
    )
