"""User-facing explanations of why an ONNX upload was refused.

onnxruntime's exceptions carry C++ signatures, source paths and the server's staging path, so their
text never reaches a client. What is needed is read from the model itself (its opset imports, its
nodes) and, where the model cannot say, from the exception's *shape*: only operator names and
numbers are ever taken from its text, each matched by a strict pattern.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")
CHECKER_HINT = (
    "Run `onnx.checker.check_model(model, full_check=True)` on it to see which node fails, "
    "then fix and re-export it."
)

# Only identifiers and numbers are lifted out of onnxruntime's text.
_IDENT = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_DOMAIN = r"[A-Za-z_][A-Za-z0-9_.]{0,63}"
_OPSET_IN_TEXT = re.compile(r"\bOpset (\d{1,6}) is under development")
_SUPPORTED_IN_TEXT = re.compile(r"support for domain ai\.onnx is till opset (\d{1,6})\b")
_NO_KERNEL = re.compile(rf"Could not find an implementation for ({_IDENT})\((\d{{1,6}})\)")
_NO_KERNEL_NODE = re.compile(r"node with name '([^'\n]{0,512})'")
_UNREGISTERED = re.compile(
    rf"Fatal error: ({_DOMAIN}):({_IDENT})\(-?\d{{1,6}}\) is not a registered"
)
_NO_SCHEMA = re.compile(rf"No Op registered for ({_IDENT}) with domain_version of (\d{{1,6}})")
_IR_VERSION = re.compile(
    r"Unsupported model IR version: (\d{1,6}), max supported IR version: (\d{1,6})"
)
_INVALID_OP = (
    re.compile(rf"\bOp \(({_IDENT})\)"),
    re.compile(rf"\bop_type:({_IDENT})\b"),
    re.compile(rf"\bof operator \(({_IDENT})\)"),
)
_INVALID_MARKERS = (
    "ShapeInferenceError",
    "TypeInferenceError",
    "Type Error",
    "This is an invalid model",
    "Invalid model",
    "not a graph input, initializer, or output",
    "topologically sorted",
)
# Status names onnxruntime's Python exceptions take for a graph it rejects on validation.
_INVALID_ERROR_TYPES = ("InvalidGraph", "InvalidArgument", "ValidationError", "InferenceError")


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _probe_loads(domain: str, opset: int) -> bool:
    """Whether onnxruntime loads a one-Identity model importing ``domain`` at ``opset``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    imports = [helper.make_opsetid(domain, opset)]
    if domain not in DEFAULT_DOMAINS:
        imports.insert(0, helper.make_opsetid("", 13))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    # An old IR version every onnxruntime reads, so that only the opset is on trial.
    model = helper.make_model(graph, opset_imports=imports, ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a refused probe is expected; keep the log quiet
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


@lru_cache
def max_supported_opset(domain: str = "") -> int:
    """The highest opset of ``domain`` this onnxruntime loads.

    onnxruntime exposes no constant for it: it refuses opsets beyond the last *released* opset of
    the onnx it was built with (``ValidateOpsetForDomain``), and which onnx that is is not exposed
    either (``onnx.helper.VERSION_TABLE`` describes the separately installed ``onnx`` package, which
    may be newer or older). So a candidate comes from onnxruntime's own compiled-in operator schemas
    (the highest ``since_version`` in the domain), and onnxruntime itself is asked: tiny models
    importing candidate+2 down to candidate-6 are loaded until one is accepted (each load takes
    about a millisecond; the answer is cached for the process). If every probe fails, the
    candidate stands.
    """
    domain = "" if domain in DEFAULT_DOMAINS else domain
    candidate = 0
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        candidate = max(
            (s.since_version for s in ort_state.get_all_operator_schema() if s.domain == domain),
            default=0,
        )
    except Exception:  # a build without schema introspection
        candidate = 0
    if candidate == 0:
        if domain != "":
            return 0  # a domain onnxruntime defines no operators in: nothing to compare with
        import onnx.defs

        candidate = onnx.defs.onnx_opset_version()
    for opset in range(candidate + 2, max(candidate - 7, 0), -1):
        if _probe_loads(domain, opset):
            return opset
    return candidate


def _display_name(filename: str) -> str:
    """The upload's own name, without any directories or backticks."""
    name = re.split(r"[/\\]", filename)[-1].replace("`", "")[:200]
    return name or "the model"


def _default_opset(model: onnx.ModelProto | None) -> int | None:
    if model is None:
        return None
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _elem_type_names(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """The element types (e.g. ``float64``) the model declares for the tensors ``names``."""
    import onnx

    declared: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if info.type.HasField("tensor_type"):
            declared[info.name] = info.type.tensor_type.elem_type
    readable: dict[int, str] = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.DOUBLE: "float64",
    }
    types = [
        readable.get(elem) or onnx.TensorProto.DataType.Name(elem).lower()
        for elem in (declared.get(name, 0) for name in names)
        if elem
    ]
    return list(dict.fromkeys(types))


def _kernel_input_types(model: onnx.ModelProto | None, op_type: str, text: str) -> list[str]:
    """The input types of the node onnxruntime has no kernel for, when the model declares them."""
    if model is None:
        return []
    match = _NO_KERNEL_NODE.search(text)
    node_name = match.group(1) if match else None
    for node in model.graph.node:
        if node.op_type == op_type and (node_name is None or node.name == node_name):
            try:
                return _elem_type_names(model, [n for n in node.input if n])
            except Exception:
                return []
    return []


def _opset_too_new(name: str, opset: int, supported: int) -> str:
    return (
        f"`{name}` uses ONNX opset {opset}, but this server's onnxruntime {_ort_version()} "
        f"supports opsets up to {supported}. Re-export with "
        f"`torch.onnx.export(..., opset_version={supported})` or convert it with "
        f"`onnx.version_converter.convert_version(model, {supported})`."
    )


def explain_load_error(model: onnx.ModelProto | None, error: Exception, filename: str) -> str:
    """Why onnxruntime refused the model, for its uploader; never the exception's text."""
    name = _display_name(filename)
    text = str(error)
    version = _ort_version()

    # (a) An opset newer than this onnxruntime: the model says which it imports.
    opset = _default_opset(model)
    if opset is None and (match := _OPSET_IN_TEXT.search(text)):
        opset = int(match.group(1))
    if opset is not None:
        supported = max_supported_opset("")
        if opset > supported:
            return _opset_too_new(name, opset, supported)
    if model is not None:
        for imported in model.opset_import:
            if imported.domain not in DEFAULT_DOMAINS and re.fullmatch(_DOMAIN, imported.domain):
                supported_in_domain = max_supported_opset(imported.domain)
                if 0 < supported_in_domain < imported.version:
                    return (
                        f"`{name}` imports opset {imported.version} of the "
                        f"`{imported.domain}` domain, but this server's onnxruntime {version} "
                        f"supports it up to opset {supported_in_domain}. Re-export it targeting "
                        f"opset {supported_in_domain} of that domain."
                    )
    if opset is None and (match := _SUPPORTED_IN_TEXT.search(text)):
        return (
            f"`{name}` uses an ONNX opset newer than this server's onnxruntime {version} "
            f"supports (up to {match.group(1)}). Re-export with "
            f"`torch.onnx.export(..., opset_version={match.group(1)})`."
        )

    # An IR version newer than this onnxruntime reads.
    if match := _IR_VERSION.search(text):
        ir_version, max_ir = match.groups()
        return (
            f"`{name}` is saved with ONNX IR version {ir_version}, but this server's onnxruntime "
            f"{version} reads IR versions up to {max_ir}. Save it with an onnx release that "
            f"writes IR version {max_ir}, or set `model.ir_version = {max_ir}` before "
            "`onnx.save` if it uses nothing newer."
        )

    # (b) An operator onnxruntime has no kernel (or no definition) for.
    if match := _NO_KERNEL.search(text):
        op_type, since = match.groups()
        types = _kernel_input_types(model, op_type, text)
        typed = f" with {', '.join(types)} inputs" if types else " for the types it is given"
        return (
            f"`{name}` uses the operator `{op_type}` (opset {since}){typed}, which "
            f"onnxruntime {version} has no CPU implementation of. Cast its inputs to float32 "
            "or re-export the model with operators and types onnxruntime supports."
        )
    if match := _UNREGISTERED.search(text):
        domain, op_type = match.groups()
        return (
            f"`{name}` uses the custom operator `{op_type}` from the `{domain}` domain; this "
            f"server's onnxruntime {version} has no implementation of it and never loads "
            "custom-op libraries. Re-export the model with standard ONNX operators only."
        )
    if match := _NO_SCHEMA.search(text):
        op_type, since = match.groups()
        return (
            f"`{name}` uses the operator `{op_type}`, which neither ONNX opset {since} nor "
            f"onnxruntime {version} defines. Re-export the model with standard ONNX operators "
            f"(opsets up to {max_supported_opset('')})."
        )

    # (c) The graph fails onnx's checker or shape/type inference.
    error_type = type(error).__name__
    if error_type in _INVALID_ERROR_TYPES or any(marker in text for marker in _INVALID_MARKERS):
        op_type = next((m.group(1) for p in _INVALID_OP if (m := p.search(text))), None)
        where = f" (at a `{op_type}` node)" if op_type else ""
        return (
            f"`{name}` is not a valid ONNX model: the graph is invalid{where}: its types or "
            f"shapes do not check out. {CHECKER_HINT}"
        )

    # (d) Anything else.
    return (
        f"onnxruntime {version} cannot load `{name}`. {CHECKER_HINT} Models exported with ONNX "
        f"opset {max_supported_opset('')} or older, using standard operators, load here."
    )


def explain_parse_error(filename: str) -> str:
    """Why bytes that are not an ONNX protobuf were refused; never the parser's text."""
    return (
        f"`{_display_name(filename)}` is not a valid ONNX model (truncated or corrupt: it does "
        "not parse as an ONNX protobuf). Upload an ONNX or safetensors file."
    )
