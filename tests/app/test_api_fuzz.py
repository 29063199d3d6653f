"""Schemathesis over the app's own OpenAPI document (issue 12, "Fuzzing in CI"), on both stacks.

What is fuzzed: every operation of ``/openapi.json``, called in process on the ASGI app
(``schemathesis.openapi.from_asgi``), with schema-valid and schema-invalid data (the examples,
coverage and fuzzing phases), then as stateful sequences following the links Schemathesis infers
between operations (an upload's id into the calls that take one). Path ids are drawn both at
random and from real objects seeded first: an ONNX teacher that a queued job holds, a free one,
an uploaded ``.npz`` dataset, the builtin one, a queued job and a job that ran to success in this
process (so artifacts, predictions and ``/v2`` models exist, by id and by an alias); job bodies
sometimes name the real teacher and dataset, and predictions and ``/v2`` inferences sometimes
send correctly shaped inputs. The queued job's event stream never ends: it is read for
``EVENTS_TIMEOUT_S`` and its events so far are checked.

Every response must be a non-5xx answer whose status code, content type, headers and body are
the ones the document declares for that operation. Hypothesis is derandomized, keeps no
database and has no deadline, so CI runs the same single calls every time; the sequences also
depend on what earlier scenarios left on the server (see the stateful test).
"""

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky
from schemathesis import Case
from schemathesis.core.parameters import ParameterLocation
from schemathesis.engine.errors import is_inconsistent_replay
from schemathesis.generation.meta import TestPhase
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import BaseSchema

from app.main import create_app
from tests.helpers.api import npz_bytes
from tests.helpers.onnx_teachers import centroid_teacher, write_onnx_teacher
from tests.helpers.stacks import Stack
from worker.pipeline import run_job

MAX_EXAMPLES = 25
STATEFUL_SCENARIOS, STATEFUL_STEPS = 25, 10
INPUT_SIZE, NUM_CLASSES = 4, 3
ALIAS = "fuzzed-student"
# A job's event stream ends with the job: the queued one's never does, so it is read this long.
EVENTS_TIMEOUT_S = 1
INFER_DATATYPES = ["FP32", "FP32", "FP32", "FP64", "FP16", "INT64", "UINT8", "BOOL", "BYTES"]

# Every response is checked by these (the stateless and the stateful tests alike).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",  # a request that breaks the schema is refused
    "missing_required_header",
    "unsupported_method",  # a method no route has: 405, with an `Allow` header
    "allow_header_conformance",
    "use_after_free",  # stateful: a deleted teacher is gone
    "ensure_resource_availability",  # stateful: what was created can be read back
    "ignored_auth",  # with API keys on (the server stack): none, or a bad one, is refused
]
# Not checked: a schema-valid request may well be refused with a 422 (a file that is no model, a
# job naming a teacher that does not exist); tenants' isolation is tests/app/test_tenants.py's.
UNCHECKED = ["positive_data_acceptance", "object_level_authorization"]

FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@dataclass(frozen=True)
class Seeded:
    """Real objects in the database, by the path parameter that names them; deletions are
    pointed at ``deletable`` ones instead (the succeeded job stays, for the calls after)."""

    ids: dict[str, list[str]]
    deletable: dict[str, list[str]]
    teacher_id: str
    dataset_ref: str


def _seed(client: TestClient, directory: Path) -> Seeded:
    rng = np.random.default_rng(0)
    centroids = rng.normal(scale=3.0, size=(NUM_CLASSES, INPUT_SIZE)).astype(np.float32)
    path = directory / "teacher.onnx"
    write_onnx_teacher(centroid_teacher(centroids), (INPUT_SIZE,), path)
    teachers = []
    for name in ("held", "free"):
        response = client.post(
            "/v1/teachers", files={"file": ("teacher.onnx", path.read_bytes())}, data={"name": name}
        )
        assert response.status_code == 201, response.text
        teachers.append(response.json()["id"])
    labels = np.arange(90) % NUM_CLASSES
    x = (centroids[labels] + rng.normal(scale=0.3, size=(90, INPUT_SIZE))).astype(np.float32)
    response = client.post("/v1/datasets", files={"file": ("data.npz", npz_bytes(x=x, y=labels))})
    assert response.status_code == 201, response.text
    dataset = response.json()["ref"]
    body = {
        "teacher": teachers[0],
        "dataset": dataset,
        "student": {"architecture": "mlp", "hidden_sizes": [8]},
        "training": {"epochs": 1, "batch_size": 32},
    }
    jobs = []
    for _ in range(3):
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        jobs.append(response.json()["id"])
    run_job(jobs[1])  # the first stays queued
    assert client.post(f"/v1/jobs/{jobs[2]}/cancel").status_code == 202
    succeeded = client.get(f"/v1/jobs/{jobs[1]}").json()
    assert succeeded["status"] == "succeeded", succeeded["error"]
    response = client.put(f"/v1/jobs/{jobs[1]}/alias", json={"alias": ALIAS})
    assert response.status_code == 200, response.text
    return Seeded(
        ids={
            "teacher_id": teachers,
            "job_id": jobs[:2],
            "ref": [dataset, "builtin:digits"],
            "name": [jobs[1], ALIAS, jobs[0]],  # /v2 models: by job id or alias
            "version": ["1", "int8"],
        },
        # Refused (a queued job, a dataset it uses), or gone for good (a cancelled job).
        deletable={"teacher_id": teachers, "job_id": [jobs[0], jobs[2]], "ref": [dataset]},
        teacher_id=teachers[0],
        dataset_ref=dataset,
    )


@pytest.fixture
def seeded(client: TestClient, tmp_path: Path) -> Seeded:
    return _seed(client, tmp_path)


def _build_schema(seeded: Seeded, api_key: str | None) -> BaseSchema:
    """The app's document, fuzzed with ``api_key`` where the stack needs one."""
    auth = {} if api_key is None else {"auth": {"openapi": {"HTTPBearer": {"bearer": api_key}}}}
    config = schemathesis.Config.from_dict(
        {
            **auth,
            "seed": 0,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"stateful": {"max-steps": STATEFUL_STEPS}},
            "operations": [
                {"include-path": "/v1/jobs/{job_id}/events", "request-timeout": EVENTS_TIMEOUT_S}
            ],
            "checks": {
                **{name: {"enabled": True} for name in CHECKS},
                **{name: {"enabled": False} for name in UNCHECKED},
            },
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(), config=config)

    @schema.hook("map_case")
    def real_objects(_context: Any, case: Case[Any]) -> Case[Any]:
        """Point some cases at real objects, chosen by a hash of the case (every phase runs this
        hook, and the same case always gets the same choice). Components generated to violate
        the schema are left as they are: the violation is what their case tests; so are the
        ids of a sequence's steps."""
        meta = case.meta
        if meta is None:
            return case
        pick = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
        # Sequences take their ids from the responses they follow (the links): those stay.
        linked = meta.phase.name == TestPhase.STATEFUL
        if case.path_parameters and not linked and not meta.is_negative_at(ParameterLocation.PATH):
            parameters = dict(case.path_parameters)
            deletion = case.method.upper() == "DELETE" and not case.path.endswith("/alias")
            ids = seeded.deletable if deletion else seeded.ids
            for name in parameters.keys() & ids.keys():
                choices = [parameters[name], *ids[name]]
                parameters[name] = choices[pick % len(choices)]
            case.path_parameters = parameters
        rows = np.random.default_rng(pick).normal(scale=3.0, size=(1 + pick % 4, INPUT_SIZE))
        infer = case.path.endswith("/infer") and case.method.upper() == "POST"
        if infer and pick % 3 and not meta.is_negative_at(ParameterLocation.BODY):
            # A tensor shaped like the student's input, mostly of a datatype the protocol has
            # (the documented body is the protocol's, which knows no student).
            datatype = INFER_DATATYPES[pick % len(INFER_DATATYPES)]
            shape = [len(rows), INPUT_SIZE + (pick % 7 == 0)]
            data: list[Any] = rows.reshape(-1).tolist()
            if datatype == "BOOL":
                data = [value > 0 for value in data]
            elif datatype == "BYTES":
                data = [str(value) for value in data]
            tensor: dict[str, Any] = {"name": "input", "shape": shape, "datatype": datatype}
            tensor["data"] = data
            case.body = {"inputs": [tensor]}
            case.media_type = "application/json"
            return case
        if not isinstance(case.body, dict) or meta.is_negative_at(ParameterLocation.BODY):
            return case
        if case.path == "/v1/jobs" and pick % 2:
            body = {**case.body, "teacher": seeded.teacher_id, "dataset": seeded.dataset_ref}
            body.pop("teachers", None)
            case.body = body
        elif case.path == "/v1/jobs/{job_id}/predict" and pick % 2:
            case.body = {**case.body, "inputs": rows.tolist()}
        return case

    return schema


@pytest.fixture
def api_schema(stack: Stack, seeded: Seeded) -> Iterator[BaseSchema]:
    yield _build_schema(seeded, stack.api_key)
    # Schemathesis keeps the app it started (its lifespan) for the rest of the process.
    shutdown_lifespans()


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4 renames the running test after each operation through the node's private
    ``_nodeid``, which pytest 9.2 no longer has (it keeps the id elsewhere): give it one to use."""
    node: Any = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_answers_as_documented(case: Case[Any]) -> None:
    case.call_and_validate()


def test_stateful_sequences_answer_as_documented(api_schema: BaseSchema) -> None:
    """Sequences of calls along the links Schemathesis infers from the document (a created
    job's id into the calls on a job, a listed teacher's id into get and delete...).

    A failed check is recorded at the step that saw it. Hypothesis replays a scenario against a
    server that later scenarios have changed (a cancelled job, a deleted teacher), and
    Schemathesis follows links by chance and adapts its choices as it learns, so a replay need
    not take the first run's path: Hypothesis then raises ``Flaky``. Like Schemathesis's own
    runner, the test treats that as no failure of the API; the recorded failures decide."""
    failures: list[str] = []
    steps = 0

    class Recording(api_schema.as_state_machine()):  # type: ignore[misc]
        def step(self, input: StepInput) -> StepOutput:
            nonlocal steps
            steps += 1
            try:
                output: StepOutput = super().step(input)
            except Exception as exc:
                failures.append(f"{input.case.method} {input.case.formatted_path}: {exc}")
                raise
            return output

    try:
        Recording.run(
            settings=settings(
                FUZZ_SETTINGS,
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=STATEFUL_STEPS,
                # What a replay finds against the changed server would not be this failure.
                phases=[Phase.generate],
            )
        )
    except Exception as exc:
        if not (isinstance(exc, Flaky) or is_inconsistent_replay(exc)):
            raise
    assert not failures, "\n\n".join(failures)
    assert steps >= STATEFUL_SCENARIOS
