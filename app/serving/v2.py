"""The Open Inference Protocol, version 2, over REST (KServe's "V2 inference protocol", Triton's
HTTP/REST API): health, server and model metadata, model readiness and inference.

A model's name is its job's id or alias; its versions are ``1`` (the ONNX student) and ``int8``
(its int8 quantisation, when the job has one). An image student's input may also come as a
``BYTES`` tensor ``[N]`` or ``[N, 1]`` of encoded images (base64 PNG, JPEG or WebP, or data URLs),
decoded as ``/predict`` decodes them. Errors are the protocol's ``{"error": "..."}``
with status 400 (a bad request) or 404 (an unknown model or version), never problem+json.
"""

import json
import math
from importlib import metadata
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text

from app.auth import PrincipalDep
from app.config import MIB, Settings, get_settings
from app.db import get_engine
from app.errors import AppError, InvalidInput
from app.ml.signature import Datatype, ImagePreprocessing, ModelSignature
from app.ml.text import TEXT, TEXT_PAIR
from app.quotas import PredictRate
from app.serving import service
from app.serving.engine import get_serving_engine, softmax

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "distill"
PROBABILITIES = "probabilities"
V2_PREFIX = "/v2"

# Element types of the protocol's tensor datatypes (BYTES: strings, kept as Python bytes).
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

router = APIRouter(prefix=V2_PREFIX, tags=["open inference protocol"])


class ProtocolError(Exception):
    """An error answered as the protocol's ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> JSONResponse:
    """The protocol's error body: ``{"error": <error message string>}``."""
    return JSONResponse({"error": message}, status_code=status)


def is_v2_path(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def protocol_error_for(request: Request, status: int, message: str) -> JSONResponse | None:
    """For the app's global error handlers: on a /v2 path, the protocol's error (a 422 of the
    framework's validation becomes a 400), else None (problem+json as everywhere else)."""
    if not is_v2_path(request.url.path):
        return None
    return error_response(400 if status == 422 else status, message)


class RequestInput(BaseModel):
    """``$request_input``: a tensor, its data flat in row-major order (or nested)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestOutput(BaseModel):
    """``$request_output``: an output the client wants."""

    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """``$inference_request``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def _validation_message(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"Invalid inference request: {where or 'body'}: {first['msg']}"


def parse_tensor(tensor: RequestInput) -> np.ndarray:
    """The tensor's data as an array of its ``shape`` and ``datatype``: ``data`` holds
    ``prod(shape)`` elements in row-major order (flat, or nested as the protocol allows);
    BYTES elements are JSON strings (kept as UTF-8 bytes)."""
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise ProtocolError(400, f"Input '{tensor.name}' has unknown datatype '{tensor.datatype}'.")
    if tensor.parameters and "binary_data_size" in tensor.parameters:
        raise ProtocolError(
            400,
            f"Input '{tensor.name}' uses the binary tensor data extension, which this server "
            "does not support: send its data as JSON.",
        )
    expected = math.prod(tensor.shape)
    try:
        if dtype is np.object_:
            flat = np.asarray(tensor.data, dtype=object).reshape(-1)
            if not all(isinstance(v, str) for v in flat):
                raise ValueError("BYTES elements must be strings")
            array = np.array([v.encode() for v in flat] if len(flat) else [], dtype=object)
        else:
            array = np.asarray(tensor.data)
            if array.dtype == object or array.dtype.kind in "USV":
                raise ValueError("not numbers")
            if dtype is np.bool_ and array.size and array.dtype != np.bool_:
                raise ValueError("BOOL elements must be true or false")
            if dtype is not np.bool_ and array.dtype == np.bool_:
                raise ValueError("booleans")
            array = array.reshape(-1).astype(dtype)
    except (ValueError, TypeError, OverflowError) as e:
        kind = "strings" if dtype is np.object_ else f"{tensor.datatype} numbers"
        raise ProtocolError(
            400,
            f"Input '{tensor.name}': data must be {expected} {kind}, flat in row-major order "
            f"for shape {tensor.shape} ({e}).",
        ) from e
    if array.size != expected:
        raise ProtocolError(
            400,
            f"Input '{tensor.name}' has {array.size} elements in data but shape {tensor.shape} "
            f"needs {expected}.",
        )
    return array.reshape(tensor.shape)


def _metadata_shape(shape: list[int | str]) -> list[int]:
    """A signature's per-sample shape with the batch dimension, variable dimensions as -1."""
    return [-1, *(d if isinstance(d, int) else -1 for d in shape)]


def model_metadata(name: str, model: service.ServedModel, versions: list[str]) -> dict[str, Any]:
    """``$metadata_model_response`` of ``model`` asked for as ``name``."""
    signature = model.request_signature
    scores = signature.scores
    outputs = [
        {"name": scores.name, "datatype": "FP32", "shape": _metadata_shape(list(scores.shape))},
        {"name": PROBABILITIES, "datatype": "FP32", "shape": _metadata_shape(list(scores.shape))},
    ]
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": t.name, "datatype": str(t.datatype), "shape": _metadata_shape(list(t.shape))}
            for t in signature.inputs
        ],
        "outputs": outputs,
    }


def check_inputs(
    tensors: dict[str, np.ndarray], signature: ModelSignature, max_batch: int
) -> dict[str, np.ndarray]:
    """The request's tensors checked against the model's inputs (names, datatypes, shapes,
    one batch size) and cast to what the model takes."""
    wanted = {t.name: t for t in signature.inputs}
    unknown = sorted(set(tensors) - set(wanted))
    if unknown:
        raise ProtocolError(400, f"Unknown input {unknown[0]!r}; the model takes {sorted(wanted)}.")
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ProtocolError(400, f"Missing input {missing[0]!r}; the model takes {sorted(wanted)}.")
    checked: dict[str, np.ndarray] = {}
    batch: int | None = None
    for name, spec in wanted.items():
        array = tensors[name]
        if array.dtype == np.object_ and spec.datatype != Datatype.BYTES:
            raise ProtocolError(
                400,
                f"Input '{name}' is BYTES, but this model takes {spec.datatype} tensors shaped "
                f"{_metadata_shape(list(spec.shape))}: send numbers with datatype "
                f"{spec.datatype}"
                + (
                    " (or encoded images: BYTES shaped [N] or [N, 1])."
                    if isinstance(signature.preprocessing, ImagePreprocessing)
                    else "."
                ),
            )
        if str(array.dtype) != np.dtype(NUMPY_TYPES[str(spec.datatype)]).name:
            got = next(k for k, v in NUMPY_TYPES.items() if np.dtype(v) == array.dtype)
            raise ProtocolError(
                400, f"Input '{name}' has datatype {got}; the model takes {spec.datatype}."
            )
        expected = _metadata_shape(list(spec.shape))
        shape = list(array.shape)
        if len(shape) != len(expected) or any(
            e != -1 and e != s for e, s in zip(expected, shape, strict=True)
        ):
            raise ProtocolError(
                400, f"Input '{name}' has shape {shape}; the model takes {expected}."
            )
        if batch is not None and shape[0] != batch:
            raise ProtocolError(400, "All inputs must have the same batch size.")
        batch = shape[0]
        if batch < 1 or batch > max_batch:
            raise ProtocolError(
                400, f"Input '{name}' has batch size {batch}; it must be 1 to {max_batch}."
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(400, f"Input '{name}' contains NaN or infinite values.")
        checked[name] = array
    return checked


def _tokenize(model: service.ServedModel, texts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BYTES ``text`` (and ``text_pair``) tensors ``[batch]`` as the student's token ids."""
    decoded = {name: [b.decode() for b in array.reshape(-1)] for name, array in texts.items()}
    if any(len(t) > service.MAX_TEXT_CHARS for values in decoded.values() for t in values):
        raise ProtocolError(400, f"A text is longer than {service.MAX_TEXT_CHARS} characters.")
    return model.tokenize(decoded[TEXT], decoded.get(TEXT_PAIR))


async def _decode_images(
    model: service.ServedModel, tensors: dict[str, np.ndarray], max_batch: int
) -> dict[str, np.ndarray]:
    """An image student's input sent as a BYTES tensor of encoded images (``[N]`` or
    ``[N, 1]``), decoded on a worker thread (``service.decode_images``); other tensors as they
    are."""
    signature = model.signature
    if not isinstance(signature.preprocessing, ImagePreprocessing) or len(signature.inputs) != 1:
        return tensors
    name = signature.inputs[0].name
    array = tensors.get(name)
    if (
        array is None
        or array.dtype != np.object_
        or array.ndim not in (1, 2)
        or (array.ndim == 2 and array.shape[1] != 1)
    ):
        return tensors  # not encoded images: `check_inputs` says what it takes
    if not 1 <= len(array) <= max_batch:
        raise ProtocolError(
            400, f"Input '{name}' has batch size {len(array)}; it must be 1 to {max_batch}."
        )
    encoded = {i: value.decode() for i, value in enumerate(array.reshape(-1))}
    try:
        images = await anyio.to_thread.run_sync(service.decode_images, encoded, signature, name)
    except InvalidInput as e:
        raise ProtocolError(400, f"Input '{name}': {e.detail}") from e
    return tensors | {name: np.stack([images[i] for i in range(len(encoded))])}


async def _served(
    tenant_id: str, name: str, version: str | None
) -> tuple[service.ServedModel, str]:
    """The tenant's model and the version asked for; an unknown one is a ``ProtocolError``
    404."""
    try:
        model = await service.resolve(tenant_id, name)
        version = version or service.DEFAULT_VERSION
        service.model_path(model, version)
    except AppError as e:
        raise ProtocolError(404, e.detail) from e
    return model, version


@router.get("", summary="Server metadata")
def server_metadata(_: PrincipalDep) -> dict[str, Any]:
    """``$metadata_server_response``: name, version and the protocol extensions supported."""
    try:
        version = metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        version = "0.1.0"
    return {"name": SERVER_NAME, "version": version, "extensions": []}


@router.get("/health/live", summary="Server live")
def server_live() -> dict[str, bool]:
    """200 while the server can answer requests: ``{"live": true}``."""
    return {"live": True}


@router.get("/health/ready", summary="Server ready")
def server_ready() -> JSONResponse:
    """200 ``{"ready": true}`` when models can be served (the database answers), else 503."""
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return JSONResponse({"ready": False}, status_code=503)
    return JSONResponse({"ready": True})


async def _metadata(tenant_id: str, name: str, version: str | None) -> JSONResponse:
    try:
        model, version = await _served(tenant_id, name, version)
    except ProtocolError as e:
        return error_response(e.status, e.message)
    versions = model.versions if version is None else [version]
    return JSONResponse(model_metadata(name, model, versions))


async def _ready(tenant_id: str, name: str, version: str | None) -> JSONResponse:
    """Ready once loaded and warmed up: asking loads it."""
    try:
        model, version = await _served(tenant_id, name, version)
    except ProtocolError as e:
        return error_response(e.status, e.message)
    await get_serving_engine().aget(
        model.key(version), service.model_path(model, version), model.signature
    )
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}", summary="Model metadata")
async def get_model_metadata(principal: PrincipalDep, name: str) -> JSONResponse:
    """``$metadata_model_response``: inputs and outputs with their datatypes and shapes (-1
    for the batch and other variable dimensions), all versions, platform ``onnxruntime_onnx``."""
    return await _metadata(principal.tenant_id, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def get_model_version_metadata(
    principal: PrincipalDep, name: str, version: str
) -> JSONResponse:
    """The metadata of one version."""
    return await _metadata(principal.tenant_id, name, version)


@router.get("/models/{name}/ready", summary="Model ready")
async def model_ready(principal: PrincipalDep, name: str) -> JSONResponse:
    """200 ``{"name", "ready": true}`` once the model is loaded; 404 for an unknown one."""
    return await _ready(principal.tenant_id, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready")
async def model_version_ready(principal: PrincipalDep, name: str, version: str) -> JSONResponse:
    return await _ready(principal.tenant_id, name, version)


async def _infer(
    request: Request, tenant_id: str, name: str, version: str | None, settings: Settings
) -> Response:
    """The inference, its answer or the protocol's error, without the rate fields."""
    try:
        model, version = await _served(tenant_id, name, version)
        if "inference-header-content-length" in request.headers:
            raise ProtocolError(
                400,
                "The binary tensor data extension is not supported: send tensors as JSON.",
            )
        try:
            body = InferenceRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise ProtocolError(400, _validation_message(e)) from e
        tensors: dict[str, np.ndarray] = {}
        for tensor in body.inputs:
            if tensor.name in tensors:
                raise ProtocolError(400, f"Input '{tensor.name}' is given twice.")
            tensors[tensor.name] = parse_tensor(tensor)
        tensors = await _decode_images(model, tensors, settings.max_predict_batch)
        inputs = check_inputs(tensors, model.request_signature, settings.max_predict_batch)
        if model.tokenizer is not None:
            inputs = _tokenize(model, inputs)
        scores = model.signature.scores.name
        available = [scores, PROBABILITIES]
        wanted = [o.name for o in body.outputs] if body.outputs else available
        for output in wanted:
            if output not in available:
                raise ProtocolError(
                    400, f"Unknown output '{output}'; the model outputs {available}."
                )
    except ProtocolError as e:
        return error_response(e.status, e.message)
    logits = await get_serving_engine().infer(
        model.key(version), service.model_path(model, version), model.signature, inputs
    )
    logits = logits.astype(np.float32, copy=False)
    values = {scores: logits, PROBABILITIES: softmax(logits)}
    response: dict[str, Any] = {"model_name": name, "model_version": version}
    if body.id is not None:
        response["id"] = body.id
    response["outputs"] = [
        {
            "name": output,
            "datatype": "FP32",
            "shape": list(values[output].shape),
            "data": values[output].reshape(-1).tolist(),
        }
        for output in wanted
    ]
    return Response(json.dumps(response), media_type="application/json")


_INFER = {
    "max_body_size": 64 * MIB,
    "summary": "Inference",
    # The body is parsed by hand (the protocol's errors, not FastAPI's); documented here.
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": InferenceRequest.model_json_schema()}},
        }
    },
}


@router.post("/models/{name}/infer", **_INFER)  # type: ignore[arg-type]
async def infer(
    principal: PrincipalDep,
    rate: PredictRate,
    request: Request,
    name: str,
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    """``$inference_request`` in, ``$inference_response`` out: outputs ``logits`` (or the
    signature's name for the class scores) and ``probabilities`` (their softmax), both FP32,
    or those named in ``outputs``; the request's ``id`` is echoed."""
    answer = await _infer(request, principal.tenant_id, name, None, settings)
    answer.headers.update(rate)
    return answer


@router.post("/models/{name}/versions/{version}/infer", **_INFER)  # type: ignore[arg-type]
async def infer_version(
    principal: PrincipalDep,
    rate: PredictRate,
    request: Request,
    name: str,
    version: str,
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    """Inference on one version (``1``, or ``int8`` when the job has it)."""
    answer = await _infer(request, principal.tenant_id, name, version, settings)
    answer.headers.update(rate)
    return answer
