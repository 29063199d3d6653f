import base64

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.config import MIB
from app.dependencies import SessionDep, SettingsDep, StoreDep
from app.errors import problem_responses
from app.ml.artifacts import FILENAMES, MEDIA_TYPES
from app.models import ArtifactFormat
from app.serving import service
from app.serving.schemas import PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/jobs", tags=["serving"])


@router.get("/{job_id}/artifact", response_class=FileResponse, responses=problem_responses(409))
def download_artifact(
    session: SessionDep, store: StoreDep, job_id: str, format: ArtifactFormat = ArtifactFormat.ONNX
) -> FileResponse:
    """Download the student (`onnx`, `safetensors`) or its `manifest`; sha256 in the headers."""
    artifact = service.get_artifact(session, job_id, format)
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
@router.post(
    "/{job_id}/predict",
    response_model=PredictResponse,
    max_body_size=64 * MIB,
    responses=problem_responses(409),
)
def predict(
    session: SessionDep, store: StoreDep, settings: SettingsDep, job_id: str, body: PredictRequest
) -> PredictResponse:
    """Classify a batch with the job's student."""
    predictor = service.get_predictor(session, store=store, job_id=job_id)
    batch = service.parse_inputs(body.inputs, predictor, settings.max_predict_batch)
    predictions, probabilities = predictor.predict(batch)
    classes = predictor.manifest.classes
    return PredictResponse(
        predictions=predictions.tolist(),
        labels=[classes[i] for i in predictions],
        probabilities=probabilities.tolist(),
    )
