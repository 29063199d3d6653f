"""Errors tell the uploader what is wrong and how to fix it, never the server's paths or
onnxruntime's internal text."""

import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from app.errors import InvalidModel, problem
from app.ml.teacher_formats.onnx_errors import (
    explain_load_error,
    explain_parse_error,
    max_supported_opset,
)
from tests.helpers.stacks import Stack

INTERNAL_TEXT = ("onnxruntime::", "[ONNXRuntimeError]", "Load model from", "onnxruntime_src")


def make_model(
    op_type: str = "Identity",
    *,
    opset: int = 13,
    elem_type: int = TensorProto.FLOAT,
    domain: str = "",
    extra_imports: tuple[tuple[str, int], ...] = (),
) -> onnx.ModelProto:
    """A one-node model from ``input`` [batch, 4] to ``logits`` [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node(op_type, ["input"], ["logits"], name="node/secret:0", domain=domain)],
        "g",
        [helper.make_tensor_value_info("input", elem_type, ["batch", 4])],
        [helper.make_tensor_value_info("logits", elem_type, ["batch", 4])],
    )
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(d, v) for d, v in extra_imports]
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


def load_error(model: onnx.ModelProto, tmp_path: Path) -> Exception:
    """What onnxruntime really raises on this machine for ``model``, loaded from a file."""
    path = tmp_path / "staging" / "3f2a9c"
    path.parent.mkdir(exist_ok=True)
    onnx.save(model, str(path))
    with pytest.raises(Exception) as raised:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return raised.value


def assert_clean(text: str, *secrets: str) -> None:
    for fragment in (*INTERNAL_TEXT, *secrets):
        assert fragment not in text, (fragment, text)


def test_max_supported_opset_is_what_onnxruntime_loads() -> None:
    supported = max_supported_opset()
    assert supported >= 17
    assert max_supported_opset("ai.onnx") == supported
    ort.InferenceSession(make_model(opset=supported).SerializeToString())
    with pytest.raises(Exception, match=f"till opset {supported}"):
        ort.InferenceSession(make_model(opset=supported + 1).SerializeToString())


def test_an_opset_too_new_names_both_opsets_and_the_fix(tmp_path: Path) -> None:
    model = make_model(opset=99)
    error = load_error(model, tmp_path)  # really refused by this onnxruntime
    supported = max_supported_opset()
    text = explain_load_error(model, error, "teacher.onnx")
    assert text == (
        f"`teacher.onnx` uses ONNX opset 99, but this server's onnxruntime {ort.__version__} "
        f"supports opsets up to {supported}. Re-export with "
        f"`torch.onnx.export(..., opset_version={supported})` or convert it with "
        f"`onnx.version_converter.convert_version(model, {supported})`."
    )
    assert_clean(text, str(tmp_path))
    # Without the model, the opset onnxruntime names still gives the same answer.
    assert explain_load_error(None, error, "teacher.onnx") == text


def test_a_missing_kernel_names_the_operator_and_types_not_the_node(tmp_path: Path) -> None:
    model = make_model("Abs", elem_type=TensorProto.BFLOAT16)
    error = load_error(model, tmp_path)
    assert "Could not find an implementation for Abs(13)" in str(error)
    text = explain_load_error(model, error, "teacher.onnx")
    assert "`Abs` (opset 13) with bfloat16 inputs" in text and "float32" in text
    assert_clean(text, str(tmp_path), "secret", "node")
    assert "`Abs` (opset 13) for the types it is given" in explain_load_error(None, error, "t")


def test_a_custom_domain_operator_is_named_with_its_domain(tmp_path: Path) -> None:
    model = make_model("FancyAct", domain="my.ops", extra_imports=(("my.ops", 1),))
    error = load_error(model, tmp_path)
    text = explain_load_error(model, error, "teacher.onnx")
    assert "custom operator `FancyAct` from the `my.ops` domain" in text
    assert "standard ONNX operators" in text
    assert_clean(text, str(tmp_path), "secret")


def test_an_unknown_operator_is_named(tmp_path: Path) -> None:
    model = make_model("NoSuchOp")
    error = load_error(model, tmp_path)
    text = explain_load_error(model, error, "teacher.onnx")
    assert "operator `NoSuchOp`, which neither ONNX opset 13 nor onnxruntime" in text
    assert_clean(text, str(tmp_path), "secret")


@pytest.mark.parametrize("checker", [False, True])
def test_an_invalid_graph_suggests_the_checker(tmp_path: Path, checker: bool) -> None:
    model = make_model("Softmax", elem_type=TensorProto.INT32)  # Softmax takes no int32
    error: Exception
    if checker:
        with pytest.raises(Exception) as raised:
            onnx.checker.check_model(model, full_check=True)
        error = raised.value
    else:
        error = load_error(model, tmp_path)
    text = explain_load_error(model, error, "teacher.onnx")
    assert text.startswith("`teacher.onnx` is not a valid ONNX model: the graph is invalid")
    assert "(at a `Softmax` node)" in text
    assert "`onnx.checker.check_model(model, full_check=True)`" in text
    assert_clean(text, str(tmp_path), "secret", "int32")


def test_any_other_failure_is_generic_and_never_echoes_the_error() -> None:
    home = os.path.expanduser("~")
    error = RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : Load model from {home}/x failed")
    text = explain_load_error(make_model(), error, "dir/teacher.onnx")
    assert text.startswith(f"onnxruntime {ort.__version__} cannot load `teacher.onnx`.")
    assert "onnx.checker.check_model" in text and str(max_supported_opset()) in text
    assert_clean(text, home)


def test_unparseable_bytes_say_so_without_the_parser_text() -> None:
    text = explain_parse_error("teacher.onnx")
    assert text == (
        "`teacher.onnx` is not a valid ONNX model (truncated or corrupt: it does not parse as "
        "an ONNX protobuf). Upload an ONNX or safetensors file."
    )


def test_problem_cuts_owned_paths_to_file_names(stack: Stack) -> None:
    home = stack.home.resolve()
    body = problem(
        422,
        "invalid_model",
        f"Load model from {home}/staging/abc failed; scale 1/255, scale: 1/16, /etc/hosts",
        field=f"{tempfile.gettempdir()}/upload.onnx",
        errors=[{"msg": f"see {os.getcwd()}/app/main.py."}],
        count=3,
    )
    assert body["detail"] == "Load model from abc failed; scale 1/255, scale: 1/16, /etc/hosts"
    assert body["field"] == "upload.onnx"
    assert body["errors"] == [{"msg": "see main.py."}]
    assert body["count"] == 3
    assert body["type"] == "https://distill.dev/problems/invalid_model"
    assert InvalidModel(f"in {home}/storage/t/model.onnx").problem()["detail"] == "in model.onnx"
    url = "https://distill.dev/problems/x/tmp/y"
    assert problem(400, "x", url)["detail"] == url


def test_problem_renders_even_when_settings_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app import config

    def broken() -> None:
        raise ValueError("bad DISTILL_ setting")

    monkeypatch.setattr(config, "get_settings", broken)
    body = problem(422, "x", f"at {tempfile.gettempdir()}/staging/abc")
    assert body["detail"] == "at abc"


def test_an_upload_with_a_too_new_opset_is_explained(client: TestClient, stack: Stack) -> None:
    model = make_model("Softmax", opset=99)
    response = client.post(
        "/v1/teachers", files={"file": ("teacher.onnx", model.SerializeToString())}
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "invalid_model"
    detail = body["detail"]
    assert "99" in detail and f"up to {max_supported_opset()}" in detail
    assert_clean(response.text, str(stack.home), str(stack.home.resolve()), "/staging")
