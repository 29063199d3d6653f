"""Hypothesis-generated uploads to ``/v1/teachers`` and ``/v1/datasets`` (issue 12, "Fuzzing in
CI"), on both stacks.

What is fuzzed:

- ``.npz`` datasets: a valid dataset or arrays of random names, dtypes (object, unicode, bytes,
  complex, bool, datetime, void, structured, big-endian...) and shapes (0-sized, scalar, rank up
  to 18), then edited (arrays dropped, replaced, added, cast), saved compressed or not, and the
  bytes mutated (truncated, flipped, zip entries marked encrypted or given another compression
  method, garbage around them); with a random ``name`` and ``classes``.
- ONNX teachers: a valid tiny graph (``tests.helpers.onnx_teachers``: head, features, input
  dtype, fixed batch, opset vary), mutated (truncated, bytes flipped or inserted) or replaced by
  random protobuf-looking bytes; with random ``name``, ``output``, ``output_kind``, ``classes``,
  ``preprocessing`` and ``config`` form fields (junk text, JSON of the wrong form, deep nesting).
- safetensors teachers: a header written by hand for the weights of a small ``mlp`` or ``cnn``,
  with tensors of random dtypes (float8 ones included), shapes and names, broken offsets, a
  header length that is huge, zero or wrong, truncated files; with a ``config`` that fits, one
  that does not, random JSON or text.
- multipart bodies written by hand: random boundaries, parts with odd names (quotes, CR/LF, NUL),
  file names, content types and values (huge ones too), the file missing or repeated, the closing
  boundary missing, the wrong content type.

The property, for every upload: a 201 with a new row, or a 4xx ``application/problem+json``
carrying its ``status`` and a ``code``; never a 5xx. A refused upload leaves nothing behind: no
new teacher or dataset row, no file in the store's staging folder, no new file under its
``teachers/`` or ``datasets/`` folders. Hypothesis is derandomized, keeps no database and has no
deadline, so CI runs the same examples every time.

``test_known_refusals`` pins the 5xx answers the generated uploads found, one minimal request
each (see its cases).
"""

import hashlib
import io
import json
import logging
import math
import os
import string
import struct
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app import db
from app.config import get_settings
from app.ml.students import CnnSpec, MlpSpec, build_model
from app.ml.teacher_formats.safetensors import TeacherConfig
from app.models import Dataset, Teacher
from app.storage import get_store
from tests.helpers.onnx_teachers import (
    FeaturesPosition,
    Head,
    InputDtype,
    centroid_teacher,
    write_onnx_teacher,
)

PROBLEM_JSON = "application/problem+json"
TEACHERS, DATASETS = "/v1/teachers", "/v1/datasets"

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- What is sent, and what must come back --------------------------------------------------------


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...<{len(text)} chars>"


def _describe_bytes(content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()[:12]
    return f"<{len(content)} bytes sha256:{digest} head={content[:24]!r} tail={content[-16:]!r}>"


@dataclass(frozen=True)
class Upload:
    """One upload: a file part (none when ``filename`` is None) and form fields; ``how`` says
    how the file was made, for the report of a failing example."""

    route: str
    filename: str | None
    content: bytes
    fields: dict[str, str] = field(default_factory=dict)
    how: tuple[str, ...] = ()

    def __repr__(self) -> str:
        fields = {k: _short(v) for k, v in self.fields.items()}
        return (
            f"Upload({self.route}, filename={self.filename!r}, "
            f"file={_describe_bytes(self.content)}, fields={fields}, how={list(self.how)})"
        )

    def send(self, client: TestClient) -> httpx.Response:
        files = None if self.filename is None else {"file": (self.filename, self.content)}
        response: httpx.Response = client.post(self.route, files=files, data=self.fields)
        return response


@dataclass(frozen=True)
class RawUpload:
    """A request body written by hand, with its own content type."""

    route: str
    body: bytes
    content_type: str
    how: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"RawUpload({self.route}, content_type={self.content_type!r}, "
            f"body={_describe_bytes(self.body)}, how={list(self.how)})"
        )

    def send(self, client: TestClient) -> httpx.Response:
        headers = {"content-type": self.content_type}
        response: httpx.Response = client.post(self.route, content=self.body, headers=headers)
        return response


def _rows(route: str) -> int:
    table = Teacher if route == TEACHERS else Dataset
    with db.session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def _staged() -> list[Path]:
    staging = get_store().staging
    return sorted(staging.iterdir()) if staging.is_dir() else []


def _kept() -> set[Path]:
    root = get_settings().resolved_storage_dir
    return {p for folder in ("teachers", "datasets") for p in (root / folder).rglob("*")}


class ServerErrors(logging.Filter):
    """Keeps the errors the app logs for its 500s (``request.unhandled_error``) for the failure
    message, instead of a traceback in the report for every example Hypothesis tries while it
    shrinks a failure."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.records.append(record)
        return False

    def explain(self) -> str:
        """The last error: its type and message, and where in ``app`` it was raised."""
        if not self.records or not self.records[-1].exc_info:
            return "(nothing logged)"
        _, error, tb = self.records[-1].exc_info
        frames = [f for f in traceback.extract_tb(tb) if f"{os.sep}app{os.sep}" in f.filename]
        where = "".join(f"\n    {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames)
        return "".join(traceback.format_exception_only(error)).strip() + where


@dataclass(frozen=True)
class Api:
    """The stack's app answering a 500 instead of raising in the test, and what it logged."""

    client: TestClient
    errors: ServerErrors


# The stated bound on the API's memory for any upload here (each under 2 MB): the growth of its
# peak resident set while answering it. Graph trials run in their own, limited process.
UPLOAD_MEMORY_BOUND = 256 * 1024 * 1024


def _status_bytes(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024


def assert_answered(api: Api, upload: Upload | RawUpload) -> None:
    """Send ``upload``; a 201 adds one row, a refusal is a 4xx problem+json and adds nothing; the
    API's peak memory grows by less than ``UPLOAD_MEMORY_BOUND`` either way."""
    rows, kept = _rows(upload.route), _kept()
    api.errors.records.clear()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) := the current RSS
    rss_before = _status_bytes("VmRSS")
    response = upload.send(api.client)
    growth = _status_bytes("VmHWM") - rss_before
    status, text = response.status_code, response.text[:600]
    context = f"{upload!r}\n-> {status} {response.headers.get('content-type')}: {text}"
    assert growth < UPLOAD_MEMORY_BOUND, f"the API's memory grew by {growth} bytes:\n{context}"
    assert status < 500, f"server error on an upload:\n{context}\n{api.errors.explain()}"
    assert _staged() == [], f"left in staging: {_staged()}\n{context}"
    if 200 <= status < 300:
        assert status == 201, context
        assert response.headers["content-type"] == "application/json", context
        body = response.json()
        assert body.get("id") or body.get("ref"), context
        assert _rows(upload.route) == rows + 1, context
        return
    assert 400 <= status < 500, context
    assert response.headers["content-type"] == PROBLEM_JSON, context
    problem = response.json()
    assert problem["status"] == status, context
    assert isinstance(problem.get("code"), str) and problem["code"], context
    assert _rows(upload.route) == rows, f"a refused upload added a row\n{context}"
    assert _kept() == kept, f"a refused upload left files: {_kept() - kept}\n{context}"


@pytest.fixture
def api(client: TestClient) -> Iterator[Api]:
    logger, errors = logging.getLogger("app.main"), ServerErrors()
    logger.addFilter(errors)
    try:
        with TestClient(
            client.app, raise_server_exceptions=False, headers=client.headers
        ) as answering:
            yield Api(answering, errors)
    finally:
        logger.removeFilter(errors)


# --- Shared strategies ----------------------------------------------------------------------------

# Text any client can send in a form (no lone surrogates: they cannot be encoded).
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def deep_json(opening: str) -> st.SearchStrategy[str]:
    """JSON nested deeper than a parser's recursion allows, closed or not."""
    closing = "]" if opening == "[" else "}"
    unit = opening if opening == "[" else '{"a":'
    return st.tuples(st.integers(900, 20_000), st.booleans()).map(
        lambda t: unit * t[0] + (("0" if opening == "{" else "") + closing * t[0] if t[1] else "")
    )


def json_field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """A JSON form field: of the right form, of any form, not JSON, or nested deeply."""
    return st.one_of(
        valid.map(json.dumps),
        JSON_VALUES.map(json.dumps),
        TEXT,
        deep_json("["),
        deep_json("{"),
        st.just("NaN"),
    )


def sometimes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None (the field left out) three times in four, so that most uploads reach the file."""
    return st.one_of(st.none(), st.none(), st.none(), strategy)


def form_fields(**strategies: st.SearchStrategy[str | None]) -> st.SearchStrategy[dict[str, str]]:
    """No form fields two times in three (the file is what most examples vary); otherwise each
    field sometimes, drawn from its strategy."""
    fields = st.fixed_dictionaries({k: sometimes(v) for k, v in strategies.items()}).map(
        lambda drawn: {k: v for k, v in drawn.items() if v is not None}
    )
    return st.one_of(st.just({}), st.just({}), fields)


NAMES = st.one_of(TEXT, TEXT, TEXT, st.integers(250, 400).map(lambda n: "n" * n))


@st.composite
def byte_mutations(draw: st.DrawFn, content: bytes) -> tuple[bytes, tuple[str, ...]]:
    """``content`` as it is, or truncated, with bytes flipped or inserted, or garbage around it."""
    how: list[str] = []
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "prepend", "append"]))
        if kind == "truncate" and content:
            cut = draw(st.integers(0, len(content) - 1))
            content, detail = content[:cut], f"truncate@{cut}"
        elif kind == "flip" and content:
            at = draw(st.integers(0, len(content) - 1))
            xor = draw(st.integers(1, 255))
            content = content[:at] + bytes([content[at] ^ xor]) + content[at + 1 :]
            detail = f"flip@{at}^{xor}"
        elif kind == "insert":
            at = draw(st.integers(0, len(content)))
            extra = draw(st.binary(min_size=1, max_size=16))
            content, detail = content[:at] + extra + content[at:], f"insert@{at}:{extra!r}"
        elif kind == "prepend":
            extra = draw(st.binary(min_size=1, max_size=16))
            content, detail = extra + content, f"prepend:{extra!r}"
        else:
            extra = draw(st.binary(min_size=1, max_size=64))
            content, detail = content + extra, f"append:{extra!r}"
        how.append(detail)
    return content, tuple(how)


# --- .npz datasets --------------------------------------------------------------------------------

ARRAY_NAMES = ["x", "y", "x_test", "y_test"]
DTYPES: list[Any] = [
    "float32",
    "float16",
    "float64",
    ">f8",
    "int8",
    "uint8",
    "int32",
    "int64",
    "uint64",
    "bool",
    "complex64",
    "<U3",
    "S2",
    "object",
    "M8[s]",
    "V3",
    [("a", "<i4"), ("b", "<f4")],
]
MAX_ELEMENTS = 4096


def _shape(dims: list[int]) -> tuple[int, ...]:
    shape = list(dims)
    while math.prod(shape) > MAX_ELEMENTS:
        shape[shape.index(max(shape))] = 1
    return tuple(shape)


SHAPES = st.one_of(
    st.lists(st.integers(0, 12), max_size=4),
    st.lists(st.sampled_from([1, 1, 1, 2]), min_size=5, max_size=18),
).map(_shape)


def _array(dtype: Any, shape: tuple[int, ...], seed: int, fill: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "V":
        return np.zeros(shape, dt)
    if fill == "labels":
        values: np.ndarray = np.asarray(rng.integers(-1, 5, size=shape))
    elif fill == "huge":
        values = np.asarray(rng.normal(scale=1e300, size=shape))
    else:
        values = np.asarray(rng.normal(scale=3.0, size=shape))
        if fill == "nan" and values.size:
            values.flat[rng.integers(values.size)] = np.nan
    if dt.kind in "iubmM":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).round()
        values = np.clip(values, 0 if dt.kind == "u" else -100, 100).astype(np.int64)
    return _cast(values, dt)


def _cast(values: np.ndarray, dtype: Any) -> np.ndarray:
    """``values`` in ``dtype``, or zeros of it where numpy has no such cast."""
    try:
        with np.errstate(all="ignore"):
            return values.astype(dtype)
    except (TypeError, ValueError):
        return np.zeros(values.shape, dtype)


RANDOM_ARRAYS = st.builds(
    _array,
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    seed=st.integers(0, 2**16),
    fill=st.sampled_from(["labels", "normal", "nan", "huge"]),
)


@st.composite
def valid_dataset(draw: st.DrawFn) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n, k = draw(st.integers(3, 40)), draw(st.integers(2, 5))
    sample = draw(st.sampled_from([(4,), (2, 3), (1, 4, 4)]))
    arrays: dict[str, np.ndarray] = {
        "x": rng.normal(size=(n, *sample)).astype(np.float32),
        "y": np.arange(n) % k,
    }
    if draw(st.booleans()):
        m = draw(st.integers(1, 10))
        arrays["x_test"] = rng.normal(size=(m, *sample)).astype(np.float32)
        arrays["y_test"] = np.arange(m) % k
    if "x_test" in arrays and draw(st.booleans()):  # an unlabelled transfer set
        del arrays["y"]
    return arrays


@st.composite
def array_edits(
    draw: st.DrawFn, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    arrays, how = dict(arrays), []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["drop", "replace", "add", "cast"]))
        name = draw(st.sampled_from(sorted(arrays) or ARRAY_NAMES))
        if kind == "drop":
            arrays.pop(name, None)
        elif kind == "replace":
            arrays[name] = draw(RANDOM_ARRAYS)
        elif kind == "add":
            name = draw(
                st.one_of(st.sampled_from(ARRAY_NAMES), TEXT.filter(lambda t: "\x00" not in t))
            )
            arrays[name] = draw(RANDOM_ARRAYS)
        elif name in arrays:
            arrays[name] = _cast(arrays[name], draw(st.sampled_from(DTYPES)))
        how.append(f"{kind} {name!r} -> {_short(arrays.get(name, 'gone'), 60)}")
    return arrays, tuple(how)


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buffer = io.BytesIO()
    save: Callable[..., None] = np.savez_compressed if compressed else np.savez
    save(buffer, **arrays)
    return buffer.getvalue()


def zip_headers(content: bytes) -> Iterator[tuple[int, int]]:
    """(offset of its flags, offset of its compression method) of each local and central
    header in a zip."""
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = content.find(signature)
        while at >= 0:
            if at + flags + 4 <= len(content):
                yield at + flags, at + flags + 2
            at = content.find(signature, at + 4)


def set_zip_field(content: bytes, which: str, value: int) -> bytes:
    """Every entry marked encrypted (``which="flags"``, OR-ed in) or given compression method
    ``value`` (``"method"``), in both its local and its central header."""
    out = bytearray(content)
    for flags_at, method_at in zip_headers(content):
        if which == "flags":
            struct.pack_into(
                "<H", out, flags_at, struct.unpack_from("<H", out, flags_at)[0] | value
            )
        else:
            struct.pack_into("<H", out, method_at, value)
    return bytes(out)


@st.composite
def npz_uploads(draw: st.DrawFn) -> Upload:
    arrays = draw(
        st.one_of(
            valid_dataset(),
            st.dictionaries(st.sampled_from(ARRAY_NAMES), RANDOM_ARRAYS, max_size=4),
        )
    )
    arrays, how = draw(array_edits(arrays))
    compressed = draw(st.booleans())
    content = npz_bytes(arrays, compressed)
    how = (*how, "compressed" if compressed else "stored")
    zip_edit = draw(st.sampled_from(["none", "none", "flags", "method"]))
    if zip_edit == "flags":
        bits = draw(st.sampled_from([0x1, 0x8, 0x40, 0x2000]))
        content, how = set_zip_field(content, "flags", bits), (*how, f"zip flags |= {bits:#x}")
    elif zip_edit == "method":
        method = draw(st.sampled_from([0, 8, 9, 12, 14, 93, 95, 98, 99, 0xFFFF]))
        content, how = set_zip_field(content, "method", method), (*how, f"zip method = {method}")
    content, mutations = draw(byte_mutations(content))
    fields = draw(
        form_fields(
            name=NAMES,
            classes=json_field(st.lists(TEXT, min_size=1, max_size=6)),
        )
    )
    filename = draw(st.sampled_from(["data.npz"] * 6 + ["", "d\x00.npz", "../../x.npz", None]))
    return Upload(DATASETS, filename, content, fields, (*how, *mutations))


# --- ONNX teachers --------------------------------------------------------------------------------

OUTPUT_KINDS = st.one_of(st.sampled_from(["logits", "probabilities", "log_probabilities"]), TEXT)
PREPROCESSING = st.one_of(
    st.just({"kind": "tensor"}),
    st.builds(lambda s: {"kind": "image", "scale": s}, st.floats(allow_nan=False)),
    st.dictionaries(st.sampled_from(["kind", "scale", "mean", "std"]), JSON_VALUES, max_size=3),
)


@dataclass(frozen=True)
class OnnxOptions:
    input_shape: tuple[int, ...]
    classes: int
    head: Head
    features: FeaturesPosition
    input_dtype: InputDtype
    batch: int | None
    opset: int


@cache
def onnx_teacher_bytes(options: OnnxOptions) -> bytes:
    rng = np.random.default_rng(options.classes)
    centroids = rng.normal(size=(options.classes, *options.input_shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "teacher.onnx"
        write_onnx_teacher(
            centroid_teacher(centroids),
            options.input_shape,
            path,
            head=options.head,
            features=options.features,
            input_dtype=options.input_dtype,
            batch=options.batch,
            opset=options.opset,
        )
        return path.read_bytes()


ONNX_OPTIONS = st.builds(
    OnnxOptions,
    input_shape=st.sampled_from([(4,), (2, 2), (1, 2, 3)]),
    classes=st.integers(2, 5),
    head=st.sampled_from(["logits", "probabilities", "log_probabilities"]),
    features=st.sampled_from(["none", "first", "last"]),
    input_dtype=st.sampled_from(["float32", "float16", "float64"]),
    batch=st.sampled_from([None, None, 1, 2]),
    opset=st.sampled_from([13, 17, 18]),
)


def protobuf_like(fields: list[tuple[int, int, bytes]]) -> bytes:
    """Protobuf records (field number, wire type, payload): varints and length-delimited ones,
    the way ONNX's ModelProto is written, with random numbers and contents."""
    out = bytearray()
    for number, wire, payload in fields:
        out += bytes(_varint((number << 3) | wire))
        if wire == 2:
            out += bytes(_varint(len(payload))) + payload
        else:
            out += bytes(_varint(int.from_bytes(payload[:8] or b"\0", "little")))
    return bytes(out)


def _varint(value: int) -> list[int]:
    out = []
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return out


PROTOBUF_RECORDS = st.lists(
    st.tuples(st.integers(1, 20), st.sampled_from([0, 2]), st.binary(max_size=40)), max_size=8
)


@st.composite
def onnx_uploads(draw: st.DrawFn) -> Upload:
    kind = draw(st.sampled_from(["graph", "graph", "graph", "protobuf", "bytes"]))
    if kind == "graph":
        options = draw(ONNX_OPTIONS)
        content, how = draw(byte_mutations(onnx_teacher_bytes(options)))
        how = (f"onnx {options}", *how)
    elif kind == "protobuf":
        content, how = protobuf_like(draw(PROTOBUF_RECORDS)), ("random protobuf records",)
    else:
        content, how = draw(st.binary(max_size=200)), ("random bytes",)
    fields = draw(
        form_fields(
            name=NAMES,
            output=st.one_of(st.sampled_from(["logits", "features"]), TEXT),
            output_kind=OUTPUT_KINDS,
            classes=json_field(st.lists(TEXT, min_size=1, max_size=6)),
            preprocessing=json_field(PREPROCESSING),
            config=TEXT,
        )
    )
    filename = draw(st.sampled_from(["teacher.onnx"] * 8 + ["model.pt", "teacher", "", None]))
    return Upload(TEACHERS, filename, content, fields, how)


# --- safetensors teachers -------------------------------------------------------------------------

# safetensors dtype names, with how to write n elements of each (from float values).
ST_DTYPES: dict[str, Callable[[np.ndarray], bytes]] = {
    "F32": lambda a: a.astype("<f4").tobytes(),
    "F16": lambda a: a.astype("<f2").tobytes(),
    "F64": lambda a: a.astype("<f8").tobytes(),
    "BF16": lambda a: (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes(),
    "F8_E4M3": lambda a: (np.abs(a * 16).astype(np.int64) % 0x7E).astype("u1").tobytes(),
    "F8_E5M2": lambda a: (np.abs(a * 16).astype(np.int64) % 0x7B).astype("u1").tobytes(),
    "I64": lambda a: a.astype("<i8").tobytes(),
    "I32": lambda a: a.astype("<i4").tobytes(),
    "I8": lambda a: a.astype("i1").tobytes(),
    "U8": lambda a: a.astype("u1").tobytes(),
    "BOOL": lambda a: (a > 0).astype("u1").tobytes(),
}


@dataclass(frozen=True)
class Architecture:
    spec: MlpSpec | CnnSpec
    input_shape: tuple[int, ...]
    classes: int

    @property
    def config(self) -> dict[str, Any]:
        return {
            "architecture": self.spec.model_dump(mode="json"),
            "input_shape": list(self.input_shape),
            "num_classes": self.classes,
        }


def state_shapes(architecture: Architecture) -> dict[str, tuple[int, ...]]:
    """The weights' names and shapes of ``architecture``, as Distill builds it."""
    return _state_shapes(json.dumps(architecture.config, sort_keys=True))


@cache
def _state_shapes(config: str) -> dict[str, tuple[int, ...]]:
    teacher_config = TeacherConfig.model_validate_json(config)
    with torch.device("meta"):
        model = build_model(teacher_config.architecture, teacher_config.signature)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


ARCHITECTURES = st.one_of(
    st.builds(
        Architecture,
        spec=st.builds(MlpSpec, hidden_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=2)),
        input_shape=st.sampled_from([(4,), (2, 3)]),
        classes=st.integers(2, 4),
    ),
    st.builds(
        Architecture,
        spec=st.builds(
            CnnSpec,
            channels=st.lists(st.integers(1, 3), min_size=1, max_size=2),
            hidden_sizes=st.lists(st.integers(1, 4), max_size=1),
        ),
        input_shape=st.just((1, 4, 4)),
        classes=st.integers(2, 3),
    ),
)


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    values: np.ndarray


def safetensors_bytes(
    tensors: dict[str, Tensor], *, metadata: dict[str, str] | None, offsets: str, header_len: str
) -> bytes:
    """A safetensors file written by hand: an 8-byte little-endian header length, the JSON
    header, the data. ``offsets`` "right" or "shifted"; ``header_len`` "right", "huge", "zero",
    "long" (past the file) or "short"."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    data = bytearray()
    for name, tensor in tensors.items():
        writer = ST_DTYPES.get(tensor.dtype, ST_DTYPES["F32"])
        raw = writer(tensor.values)
        start = len(data) + (3 if offsets == "shifted" else 0)
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [start, start + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    length = {
        "right": len(text),
        "huge": 2**64 - 1,
        "zero": 0,
        "long": len(text) + len(data) + 9,
        "short": max(len(text) - 5, 1),
    }[header_len]
    return struct.pack("<Q", length) + text + bytes(data)


@st.composite
def safetensors_uploads(draw: st.DrawFn) -> Upload:
    architecture = draw(ARCHITECTURES)
    shapes = state_shapes(architecture)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tensors = {name: Tensor("F32", shape, rng.normal(size=shape)) for name, shape in shapes.items()}
    how: list[str] = [f"{architecture.config}"]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        name = draw(st.sampled_from(sorted(tensors) or ["0.weight"]))
        kind = draw(
            st.sampled_from(["dtype", "dtype", "shape", "drop", "add", "nan", "junk_dtype"])
        )
        old = tensors.get(name, Tensor("F32", (2,), np.zeros(2)))
        if kind == "dtype":
            tensors[name] = Tensor(draw(st.sampled_from(sorted(ST_DTYPES))), old.shape, old.values)
        elif kind == "junk_dtype":
            tensors[name] = Tensor(
                draw(st.sampled_from(["F4", "Q8", "", "f32"])), old.shape, old.values
            )
        elif kind == "shape":
            shape = draw(SHAPES)
            tensors[name] = Tensor(old.dtype, shape, rng.normal(size=shape))
        elif kind == "drop":
            tensors.pop(name, None)
        elif kind == "add":
            name = draw(st.one_of(st.just("extra.weight"), TEXT))
            tensors[name] = Tensor("F32", (3,), rng.normal(size=3))
        else:
            values = old.values.copy()
            if values.size:
                values.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39]))
            tensors[name] = Tensor(old.dtype, old.shape, values)
        how.append(f"{kind} {name!r}: {tensors.get(name, 'gone')!r}"[:120])
    offsets = draw(st.sampled_from(["right", "right", "right", "shifted"]))
    header_len = draw(st.sampled_from(["right"] * 8 + ["huge", "zero", "long", "short"]))
    metadata = draw(st.one_of(st.none(), st.dictionaries(TEXT, TEXT, max_size=2)))
    content = safetensors_bytes(tensors, metadata=metadata, offsets=offsets, header_len=header_len)
    content, mutations = draw(byte_mutations(content))
    how += [f"offsets {offsets}", f"header length {header_len}", *mutations]
    config = draw(
        st.one_of(
            st.just(json.dumps(architecture.config)),
            st.just(json.dumps(architecture.config)),
            ARCHITECTURES.map(lambda a: json.dumps(a.config)),
            json_field(st.just(architecture.config)),
            st.none(),
        )
    )
    fields = draw(form_fields(name=NAMES, output_kind=OUTPUT_KINDS))
    if config is not None:
        fields["config"] = config
    filename = draw(st.sampled_from(["teacher.safetensors"] * 5 + ["weights.bin", "t"]))
    return Upload(TEACHERS, filename, content, fields, tuple(how))


# --- Multipart bodies written by hand -------------------------------------------------------------

BOUNDARY_CHARACTERS = string.ascii_letters + string.digits + "'()+_,-./:=?"
FORM_NAMES = ["file", "name", "classes", "config", "output", "output_kind", "preprocessing"]


@cache
def valid_file(route: str) -> bytes:
    if route == TEACHERS:
        return onnx_teacher_bytes(OnnxOptions((4,), 3, "logits", "none", "float32", None, 17))
    labels = np.arange(30) % 3
    return npz_bytes({"x": np.random.default_rng(0).normal(size=(30, 4)), "y": labels}, False)


@st.composite
def multipart_part(draw: st.DrawFn, route: str, is_file: bool = False) -> bytes:
    """A part: the file (``is_file``; its name and file name sometimes odd) or any other."""
    filename: str | None
    if is_file:
        name = draw(st.sampled_from(["file"] * 4 + ["File", "file\x00", 'fi"le']))
        filename = draw(st.sampled_from(["upload"] * 4 + ["", 'a"b', "a\r\nb", "a\x00b", "é"]))
    else:
        name = draw(st.one_of(st.sampled_from(FORM_NAMES), TEXT))
        filename = draw(
            st.one_of(st.none(), st.none(), st.sampled_from(["data.npz", "t.onnx"]), TEXT)
        )
    value = draw(
        st.one_of(
            st.just(valid_file(route)),
            st.binary(max_size=64),
            TEXT.map(str.encode),
            st.integers(1, 1_500_000).map(lambda n: b"v" * n),
        )
    )
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    headers = [f"Content-Disposition: {disposition}"]
    content_type = draw(st.one_of(st.none(), st.just("application/octet-stream"), TEXT))
    if content_type is not None:
        headers.append(f"Content-Type: {content_type}")
    head = "\r\n".join(headers).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + value


@st.composite
def multipart_uploads(draw: st.DrawFn) -> RawUpload:
    route = draw(st.sampled_from([TEACHERS, DATASETS]))
    boundary = draw(st.text(BOUNDARY_CHARACTERS, min_size=1, max_size=70))
    parts = draw(st.lists(multipart_part(route), max_size=4))
    if draw(st.sampled_from([True, True, True, False])):
        parts.insert(draw(st.integers(0, len(parts))), draw(multipart_part(route, is_file=True)))
    delimiter = f"--{boundary}".encode()
    body = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts)
    ending = draw(st.sampled_from(["close", "close", "none", "garbage"]))
    if ending == "close":
        body += delimiter + b"--\r\n"
    elif ending == "garbage":
        body += draw(st.binary(max_size=32))
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}",
                f"multipart/form-data; boundary={boundary}",
                f'multipart/form-data; boundary="{boundary}"',
                "multipart/form-data",
                "multipart/form-data; boundary=other",
                "application/x-www-form-urlencoded",
                "application/json",
                "text/plain",
            ]
        )
    )
    return RawUpload(route, body, content_type, (f"{len(parts)} parts", f"ending {ending}"))


# --- The properties -------------------------------------------------------------------------------


@settings(FUZZ, max_examples=60)
@given(upload=npz_uploads())
def test_generated_npz_datasets(api: Api, upload: Upload) -> None:
    assert_answered(api, upload)


@settings(FUZZ, max_examples=60)
@given(upload=onnx_uploads())
def test_generated_onnx_teachers(api: Api, upload: Upload) -> None:
    assert_answered(api, upload)


@settings(FUZZ, max_examples=60)
@given(upload=safetensors_uploads())
def test_generated_safetensors_teachers(api: Api, upload: Upload) -> None:
    assert_answered(api, upload)


@settings(FUZZ, max_examples=50)
@given(upload=multipart_uploads())
def test_generated_multipart_bodies(api: Api, upload: RawUpload) -> None:
    assert_answered(api, upload)


# --- What the generated uploads found -------------------------------------------------------------


def _safetensors_teacher(dtype: str, config: str | None = None) -> Upload:
    architecture = Architecture(MlpSpec(hidden_sizes=[3]), (4,), 2)
    tensors = {
        name: Tensor(dtype, shape, np.full(shape, 0.5))
        for name, shape in state_shapes(architecture).items()
    }
    content = safetensors_bytes(tensors, metadata=None, offsets="right", header_len="right")
    fields = {"config": json.dumps(architecture.config) if config is None else config}
    return Upload(TEACHERS, "teacher.safetensors", content, fields, (f"every tensor {dtype}",))


def _npz_with_zip_field(which: str, value: int) -> Upload:
    content = set_zip_field(valid_file(DATASETS), which, value)
    return Upload(DATASETS, "data.npz", content, {}, (f"zip {which} {value:#x}",))


NESTED = "[" * 5000


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda: Upload(TEACHERS, "teacher.onnx", valid_file(TEACHERS), {"classes": NESTED}),
            id="teacher-classes-nested-json",
        ),
        pytest.param(
            lambda: Upload(
                TEACHERS, "teacher.onnx", valid_file(TEACHERS), {"preprocessing": NESTED}
            ),
            id="teacher-preprocessing-nested-json",
        ),
        pytest.param(
            lambda: _safetensors_teacher("F32", NESTED), id="safetensors-config-nested-json"
        ),
        pytest.param(lambda: _safetensors_teacher("F8_E4M3"), id="safetensors-float8-e4m3-weights"),
        pytest.param(lambda: _npz_with_zip_field("flags", 0x1), id="npz-entries-marked-encrypted"),
        pytest.param(lambda: _npz_with_zip_field("method", 99), id="npz-unsupported-compression"),
    ],
)
def test_known_refusals(api: Api, build: Callable[[], Upload]) -> None:
    """One minimal upload per 5xx the generated ones found: each must be a 4xx problem."""
    assert_answered(api, build())
