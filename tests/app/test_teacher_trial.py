"""An ONNX upload is run once on zeros in a separate process under time and memory limits
(issue 12, case 3), and its parameters are what its nodes read.

The sandbox is tested with standard-library functions as the isolated work (they pickle by
reference and import nothing heavy in the child); the uploads build hostile graphs with
``onnx.helper``.
"""

import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from app.config import get_settings
from app.ml.sandbox import (
    MAX_RESULT_BYTES,
    TrialFailed,
    TrialOutOfMemory,
    TrialTimeout,
    onnx_output_shapes,
    run_isolated,
)
from app.ml.teacher_formats import inspect_teacher
from tests.helpers.onnx_teachers import InputDtype, MlpWeights, centroid_teacher, write_onnx_teacher
from tests.helpers.stacks import Stack

GIB = 1 << 30
OPSET = [helper.make_opsetid("", 17)]
INTERNAL_TEXT = ("onnxruntime", "bad_alloc", "Failed to allocate", "/", "\\", "staging")


# --- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _children(parent: int) -> dict[int, str]:
    """This parent's child processes and their states (multiprocessing's resource tracker, one
    per process for its whole life, is not counted)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and (stat := _stat(int(entry.name)))
            and stat[1] == parent
            and "resource_tracker" not in _cmdline(int(entry.name))
        ):
            found[int(entry.name)] = stat[0]
    return found


def _assert_no_leftovers(before: dict[int, str]) -> None:
    assert multiprocessing.active_children() == []
    left = {pid: state for pid, state in _children(os.getpid()).items() if pid not in before}
    assert left == {}, f"children left behind (pid: state, Z = zombie): {left}"


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fails the test if it leaves a child process of this one, running or zombie."""
    before = _children(os.getpid())
    yield
    _assert_no_leftovers(before)


def _wait_gone(pid: int, timeout_s: float) -> str | None:
    """Wait for a process to be gone or dead (a zombie); its last state."""
    deadline = time.monotonic() + timeout_s
    while (stat := _stat(pid)) is not None and stat[0] not in ("Z", "X"):
        if time.monotonic() > deadline:
            return stat[0]
        time.sleep(0.05)
    return None if stat is None else stat[0]


# --- the sandbox ----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_leftovers")
def test_a_normal_return_comes_back() -> None:
    assert run_isolated(sum, [1, 2, 3], timeout_s=30, memory_bytes=GIB) == 6
    assert run_isolated(divmod, 17, 5, timeout_s=30, memory_bytes=GIB) == (3, 2)


@pytest.mark.usefixtures("no_leftovers")
def test_a_timeout_kills_the_child() -> None:
    start = time.monotonic()
    with pytest.raises(TrialTimeout) as raised:
        run_isolated(time.sleep, 60, timeout_s=1.5, memory_bytes=GIB)
    assert 1.5 <= time.monotonic() - start < 5
    assert raised.value.timeout_s == 1.5


@pytest.mark.usefixtures("no_leftovers")
def test_a_timeout_kills_what_the_child_started() -> None:
    """The child leads its own process group, and the whole group is killed."""
    marker = f"{time.time_ns() % 10**6 + 3600}"  # a sleep length nothing else uses
    with pytest.raises(TrialTimeout):
        run_isolated(subprocess.call, ["sleep", marker], timeout_s=2, memory_bytes=GIB)
    deadline = time.monotonic() + 5
    while any(
        _cmdline(int(p.name)).strip() == f"sleep {marker}"
        and (_stat(int(p.name)) or ("X", 0))[0] != "Z"
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
    ):
        assert time.monotonic() < deadline, "the grandchild outlived the trial"
        time.sleep(0.05)


@pytest.mark.usefixtures("no_leftovers")
def test_memory_error_is_out_of_memory() -> None:
    with pytest.raises(TrialOutOfMemory) as raised:
        run_isolated(bytearray, 2 * GIB, timeout_s=30, memory_bytes=GIB)
    assert raised.value.memory_bytes == GIB and raised.value.signal is None


@pytest.mark.usefixtures("no_leftovers")
def test_a_death_by_signal_is_out_of_memory() -> None:
    with pytest.raises(TrialOutOfMemory) as raised:
        run_isolated(os.kill, 0, signal.SIGKILL, timeout_s=30, memory_bytes=GIB)
    assert raised.value.signal == signal.SIGKILL


@pytest.mark.usefixtures("no_leftovers")
def test_an_exception_keeps_only_its_type_name() -> None:
    with pytest.raises(TrialFailed) as raised:
        run_isolated(int, "/srv/secret/path is not a number", timeout_s=30, memory_bytes=GIB)
    assert raised.value.error_type == "ValueError"
    assert "secret" not in str(raised.value)


@pytest.mark.usefixtures("no_leftovers")
def test_only_plain_data_comes_back() -> None:
    """The parent never unpickles a class or function the child names: no code runs in it."""
    with pytest.raises(TrialFailed) as raised:
        run_isolated(PurePosixPath, "/a/path", timeout_s=30, memory_bytes=GIB)
    assert raised.value.error_type == "UnpicklingError"
    with pytest.raises(TrialFailed) as raised:
        run_isolated(bytes, MAX_RESULT_BYTES + 1, timeout_s=30, memory_bytes=GIB)
    assert raised.value.error_type == "ResultTooLarge"
    assert run_isolated(
        dict, {"a": (1, 2.5, None, b"x", frozenset({True}))}, timeout_s=30, memory_bytes=GIB
    ) == {"a": (1, 2.5, None, b"x", frozenset({True}))}


@pytest.mark.usefixtures("no_leftovers")
def test_an_exit_without_a_result_fails() -> None:
    with pytest.raises(TrialFailed) as raised:
        run_isolated(os._exit, 3, timeout_s=30, memory_bytes=GIB)
    assert raised.value.error_type == "exit 3"


@pytest.mark.usefixtures("no_leftovers")
def test_the_limit_is_set_in_the_child_only() -> None:
    limit = run_isolated(resource.getrlimit, resource.RLIMIT_AS, timeout_s=30, memory_bytes=GIB)
    assert limit == (GIB, GIB)  # hard too: the work cannot raise it again
    assert resource.getrlimit(resource.RLIMIT_AS) != (GIB, GIB)


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed outright (no ``finally``) leaves no trial running behind it."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from app.ml.sandbox import run_isolated; "
            "run_isolated(time.sleep, 600, timeout_s=600, memory_bytes=1 << 30)",
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 30
        while not (children := _children(parent.pid)):
            assert time.monotonic() < deadline, "the trial never started"
            time.sleep(0.05)
        time.sleep(0.5)  # past the child's start-up, when it sets its death signal
    finally:
        parent.kill()
        parent.wait()
    for pid in children:
        assert _wait_gone(pid, 10) in (None, "Z", "X"), f"trial {pid} outlived its parent"


# --- graphs ---------------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _io(classes: int = 4) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    return (
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
    )


def endless_loop_teacher(path: Path) -> Path:
    """The logits come out of a Loop of 10^15 iterations whose body passes them on unchanged."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["x_in"], ["x_out"]),
        ],
        "identity_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    inputs, outputs = _io()
    return _save(
        helper.make_graph(
            [helper.make_node("Loop", ["trips", "keep_going", "input"], ["logits"], body=body)],
            "endless_loop",
            inputs,
            outputs,
            initializer=[
                numpy_helper.from_array(np.array(10**15, np.int64), "trips"),
                numpy_helper.from_array(np.array(True), "keep_going"),
            ],
        ),
        path,
    )


def huge_constant_teacher(path: Path) -> Path:
    """The logits are the input plus the sum of a ConstantOfShape of 10^12 zeros (4 TB)."""
    inputs, outputs = _io()
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    return _save(
        helper.make_graph(
            [
                helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=zero),
                helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
                helper.make_node("Add", ["input", "total"], ["logits"]),
            ],
            "huge_constant",
            inputs,
            outputs,
            initializer=[numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "shape")],
        ),
        path,
    )


def folded_constants_teacher(path: Path, nodes: int = 3) -> Path:
    """``nodes`` Expands of a constant to 15000 x 15000 (0.9 GB each, under onnxruntime's
    1 GiB constant-folding limit): loading it with optimizations on computes them."""
    inputs, outputs = _io()
    graph_nodes, initializers, previous = (
        [],
        [numpy_helper.from_array(np.array(1, np.float32), "one")],
        "input",
    )
    for i in range(nodes):
        initializers.append(numpy_helper.from_array(np.array([15000 + i, 15000]), f"shape{i}"))
        graph_nodes += [
            helper.make_node("Expand", ["one", f"shape{i}"], [f"big{i}"]),
            helper.make_node("ReduceSum", [f"big{i}"], [f"sum{i}"], keepdims=0),
            helper.make_node("Add", [previous, f"sum{i}"], [f"added{i}"]),
        ]
        previous = f"added{i}"
    graph_nodes.append(helper.make_node("Identity", [previous], ["logits"]))
    return _save(
        helper.make_graph(graph_nodes, "folded", inputs, outputs, initializer=initializers), path
    )


def reshape_teacher(path: Path) -> Path:
    """Reshapes [batch, 4] to [-1, 3]: loads, but fails on any batch of 2."""
    inputs, outputs = _io(classes=3)
    return _save(
        helper.make_graph(
            [helper.make_node("Reshape", ["input", "target"], ["logits"])],
            "bad_reshape",
            inputs,
            outputs,
            initializer=[numpy_helper.from_array(np.array([-1, 3], np.int64), "target")],
        ),
        path,
    )


def batch_mean_teacher(path: Path) -> Path:
    """Declares [batch, 4] scores but averages over the batch: one row whatever the batch."""
    inputs, outputs = _io()
    return _save(
        helper.make_graph(
            [helper.make_node("ReduceMean", ["input"], ["logits"], axes=[0], keepdims=1)],
            "batch_mean",
            inputs,
            outputs,
        ),
        path,
    )


def centroids() -> MlpWeights:
    return centroid_teacher(np.random.default_rng(0).normal(size=(3, 1, 4, 4)))


def mlp_parameters(weights: MlpWeights) -> int:
    return sum(w.size for w in (weights.w1, weights.b1, weights.w2, weights.b2))


def with_unused_initializer(source: Path, path: Path, shape: tuple[int, ...]) -> Path:
    """The teacher at ``source`` with a float initializer of zeros no node reads."""
    model = onnx.load(str(source))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), "unused"))
    onnx.save(model, str(path))
    return path


def loop_with_weights_teacher(path: Path) -> Path:
    """Three iterations of ``x + w_outer + w_body`` (``w_outer`` [4] read from the main graph,
    ``w_body`` [4] the body's own), with an unused [100] initializer in each graph."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["x_in", "w_outer"], ["x_mid"]),
            helper.make_node("Add", ["x_mid", "w_body"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 4]),
        ],
        initializer=[
            numpy_helper.from_array(np.ones(4, np.float32), "w_body"),
            numpy_helper.from_array(np.zeros(100, np.float32), "unused_in_body"),
        ],
    )
    inputs, outputs = _io()
    return _save(
        helper.make_graph(
            [helper.make_node("Loop", ["trips", "", "input"], ["logits"], body=body)],
            "loop_with_weights",
            inputs,
            outputs,
            initializer=[
                numpy_helper.from_array(np.array(3, np.int64), "trips"),
                numpy_helper.from_array(np.ones(4, np.float32), "w_outer"),
                numpy_helper.from_array(np.zeros(100, np.float32), "unused_outside"),
            ],
        ),
        path,
    )


# --- uploads --------------------------------------------------------------------------------


def _upload(client: TestClient, path: Path) -> tuple[int, dict[str, object], float]:
    start = time.monotonic()
    with open(path, "rb") as f:
        response = client.post("/v1/teachers", files={"file": ("teacher.onnx", f)})
    return response.status_code, response.json(), time.monotonic() - start


def _assert_refused(client: TestClient, stack: Stack, status: int, body: dict[str, object]) -> str:
    assert status == 422, body
    assert body["code"] == "invalid_model" and body["field"] == "file", body
    detail = str(body["detail"])
    for fragment in (*INTERNAL_TEXT, str(stack.home)):
        assert fragment not in detail, (fragment, detail)
    assert client.get("/v1/teachers").json()["items"] == []
    staging = get_settings().resolved_storage_dir / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []
    return detail


@pytest.mark.usefixtures("no_leftovers")
def test_an_endless_loop_is_refused_in_time(
    client: TestClient, stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "teacher_trial_timeout_s", 3)
    status, body, elapsed = _upload(client, endless_loop_teacher(tmp_path / "loop.onnx"))
    detail = _assert_refused(client, stack, status, body)
    assert "did not finish a 2-sample inference within 3 s (a loop that never ends?)" in detail
    assert 3 <= elapsed < 3 + 5, elapsed


@pytest.mark.usefixtures("no_leftovers")
def test_a_huge_allocation_is_refused_as_memory(
    client: TestClient, stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "teacher_trial_memory_bytes", GIB)
    status, body, _ = _upload(client, huge_constant_teacher(tmp_path / "huge.onnx"))
    detail = _assert_refused(client, stack, status, body)
    assert "needed more than 1 GiB of memory for a 2-sample inference" in detail


def test_the_inspecting_process_never_computes_the_graphs_constants(tmp_path: Path) -> None:
    """Constant folding happens in the trial (which runs out of its memory), not in the process
    that inspects (a fresh one here, so that its peak memory is its own)."""
    path = folded_constants_teacher(tmp_path / "folded.onnx")
    script = (
        "import resource, sys\n"
        "from app.config import get_settings\n"
        "from app.errors import InvalidModel\n"
        "from app.ml.teacher_formats import inspect_teacher\n"
        "get_settings().teacher_trial_memory_bytes = 1 << 30\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    inspect_teacher(__import__('pathlib').Path(sys.argv[1]), 'folded.onnx', None)\n"
        "except InvalidModel as e:\n"
        "    print(e.detail)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    detail, grown_mib = done.stdout.strip().splitlines()[-2:]
    assert "needed more than 1 GiB of memory" in detail
    assert int(grown_mib) < 300, f"the inspecting process grew by {grown_mib} MiB"


@pytest.mark.usefixtures("no_leftovers")
def test_a_graph_that_fails_on_zeros_is_refused_by_exception_type(
    client: TestClient, stack: Stack, tmp_path: Path
) -> None:
    status, body, _ = _upload(client, reshape_teacher(tmp_path / "reshape.onnx"))
    detail = _assert_refused(client, stack, status, body)
    assert "failed on a 2-sample inference of zeros: " in detail
    assert detail.rstrip(".").rsplit(": ", 1)[1].isidentifier(), detail


@pytest.mark.usefixtures("no_leftovers")
def test_scores_must_come_out_batch_by_classes(
    client: TestClient, stack: Stack, tmp_path: Path
) -> None:
    status, body, _ = _upload(client, batch_mean_teacher(tmp_path / "mean.onnx"))
    detail = _assert_refused(client, stack, status, body)
    assert "`logits` is declared [batch, 4], but a 2-sample inference returned [1, 4]" in detail


@pytest.mark.usefixtures("no_leftovers")
def test_a_normal_teacher_uploads_and_its_trial_is_short(
    client: TestClient, tmp_path: Path
) -> None:
    weights = centroids()
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(weights, (1, 4, 4), path)
    status, body, _ = _upload(client, path)
    assert status == 201, body
    assert body["parameter_count"] == mlp_parameters(weights)
    timings = []
    for _ in range(3):
        start = time.monotonic()
        shapes = run_isolated(
            onnx_output_shapes, str(path), (2, 1, 4, 4), "float32", timeout_s=60, memory_bytes=GIB
        )
        timings.append(time.monotonic() - start)
        assert shapes == {"logits": (2, 3)}
    print(f"trial of a small teacher: {', '.join(f'{t:.2f} s' for t in timings)}")
    assert min(timings) < 1.5, timings


@pytest.mark.parametrize(
    ("batch", "input_dtype"), [(1, "float32"), (3, "float16"), (None, "float64")]
)
@pytest.mark.usefixtures("no_leftovers")
def test_fixed_batches_and_dtypes_are_tried_as_declared(
    tmp_path: Path, batch: int | None, input_dtype: InputDtype
) -> None:
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(
        centroids(), (1, 4, 4), path, batch=batch, input_dtype=input_dtype, features="last"
    )
    info = inspect_teacher(path, path.name, None)
    assert info.signature.num_classes == 3
    assert [layer.name for layer in info.feature_layers] == ["features"]


@pytest.mark.usefixtures("no_leftovers")
def test_an_unused_initializer_adds_no_parameters(client: TestClient, tmp_path: Path) -> None:
    weights = centroids()
    write_onnx_teacher(weights, (1, 4, 4), tmp_path / "teacher.onnx")
    path = with_unused_initializer(
        tmp_path / "teacher.onnx", tmp_path / "padded.onnx", (2000, 2000)
    )
    assert path.stat().st_size > 2000 * 2000 * 4
    status, body, _ = _upload(client, path)
    assert status == 201, body
    assert body["parameter_count"] == mlp_parameters(weights)


def test_initializers_read_inside_a_loop_body_count(tmp_path: Path) -> None:
    info = inspect_teacher(loop_with_weights_teacher(tmp_path / "loop.onnx"), "loop.onnx", None)
    assert info.parameter_count == 4 + 4  # w_outer and w_body; neither unused [100]
