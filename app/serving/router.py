import base64

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from app.auth import PrincipalDep
from app.config import MIB, Settings
from app.dependencies import SessionDep, SettingsDep, StoreDep
from app.errors import AppError, NotFound, problem_responses
from app.ml.artifacts import FILENAMES, MEDIA_TYPES
from app.ml.signature import TextPreprocessing
from app.models import ArtifactFormat
from app.quotas import PredictRate
from app.serving import service
from app.serving.engine import get_serving_engine, softmax
from app.serving.schemas import AliasRequest, AliasResponse, PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/jobs", tags=["serving"])
# The routes a serving-only process (`distill serve`) answers too, under the same prefix.
predict_router = APIRouter(tags=["serving"])


@router.get(
    "/{job_id}/artifact", response_class=FileResponse, responses=problem_responses(409, 410)
)
def download_artifact(
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    job_id: str,
    format: ArtifactFormat = ArtifactFormat.ONNX,
) -> FileResponse:
    """Download the student (`onnx`, `safetensors`) or its `manifest`; sha256 in the headers."""
    artifact = service.get_artifact(session, principal.tenant_id, job_id, format)
    digest_b64 = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    return FileResponse(
        store.path(artifact.storage_key),
        media_type=MEDIA_TYPES[format],
        filename=f"{job_id}-{FILENAMES[format]}",
        headers={
            "X-Content-SHA256": artifact.sha256,
            "Repr-Digest": f"sha-256=:{digest_b64}:",
            "ETag": f'"{artifact.sha256}"',
        },
    )


# A full batch of max_predict_batch samples of a few thousand numbers each, as JSON text.
@predict_router.post(
    "/{job_id}/predict",
    response_model=PredictResponse,
    max_body_size=64 * MIB,
    responses=problem_responses(409, 410, 429),
)
async def predict(
    principal: PrincipalDep,
    settings: SettingsDep,
    rate: PredictRate,
    response: Response,
    job_id: str,
    body: PredictRequest,
) -> PredictResponse:
    """Classify a batch with the job's student, on the serving engine (onnxruntime, requests
    to one student micro-batched together). A text student takes strings (or `[text,
    text_pair]` lists), tokenised with its tokenizer; an image student arrays or base64 PNG,
    JPEG or WebP images (or data URLs), decoded and resized to its input."""
    response.headers.update(rate)
    try:
        return await _predict(principal.tenant_id, settings, job_id, body)
    except AppError as e:  # its answer says where the rate stands too
        e.headers.update(rate)
        raise


async def _predict(
    tenant_id: str, settings: Settings, job_id: str, body: PredictRequest
) -> PredictResponse:
    try:
        model = await service.resolve(tenant_id, job_id)
    except service.NoSuchJob as e:
        raise NotFound(f"No job with id {job_id}.") from e
    if model.job_id != job_id:  # an alias names the student in /v2, not the job here
        raise NotFound(f"No job with id {job_id}.")
    preprocessing = model.signature.preprocessing
    if isinstance(preprocessing, TextPreprocessing):
        texts, pairs = service.parse_texts(
            body.inputs, preprocessing.pairs, settings.max_predict_batch
        )
        inputs = model.tokenize(texts, pairs)
    else:
        batch = await service.parse_batch(body.inputs, model.signature, settings.max_predict_batch)
        inputs = {model.signature.inputs[0].name: batch}
    version = service.DEFAULT_VERSION
    logits = await get_serving_engine().infer(
        model.key(version), service.model_path(model, version), model.signature, inputs
    )
    probabilities = softmax(logits)
    predictions = probabilities.argmax(axis=-1)
    classes = model.manifest.classes
    return PredictResponse(
        predictions=predictions.tolist(),
        labels=[classes[i] for i in predictions],
        probabilities=probabilities.tolist(),
    )


@router.put("/{job_id}/alias", response_model=AliasResponse, responses=problem_responses(409))
def set_alias(
    principal: PrincipalDep, session: SessionDep, job_id: str, body: AliasRequest
) -> AliasResponse:
    """Name a succeeded job's student: the Open Inference Protocol serves it as
    ``/v2/models/{alias}`` too. 409 if another job has the alias or this one has not
    succeeded."""
    job = service.set_alias(session, principal.tenant_id, job_id, body.alias)
    return AliasResponse(job_id=job.id, alias=job.alias)


@router.delete("/{job_id}/alias", status_code=204)
def delete_alias(principal: PrincipalDep, session: SessionDep, job_id: str) -> Response:
    """Remove the job's alias (if any); its student stays served by its id."""
    service.clear_alias(session, principal.tenant_id, job_id)
    return Response(status_code=204)


router.include_router(predict_router)
