from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput, JobNotReady, NotFound
from app.jobs.service import get_job
from app.ml.predictor import Predictor, load_predictor
from app.models import Artifact, ArtifactFormat, JobStatus
from app.storage import ArtifactStore


def get_artifact(session: Session, job_id: str, artifact_format: ArtifactFormat) -> Artifact:
    job = get_job(session, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise JobNotReady(
            f"Job {job_id} is {job.status}; its student is available once it has succeeded.",
            job_status=job.status,
        )
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.format == artifact_format)
    )
    if artifact is None:
        raise NotFound(f"Job {job_id} has no {artifact_format} artifact.")
    return artifact


def get_predictor(session: Session, *, store: ArtifactStore, job_id: str) -> Predictor:
    manifest = get_artifact(session, job_id, ArtifactFormat.MANIFEST)
    return load_predictor(Path(store.path(manifest.storage_key)).parent)


def parse_inputs(inputs: list[object], predictor: Predictor, max_batch: int) -> np.ndarray:
    """The JSON batch as float32, checked against the student's input signature."""
    expected = predictor.manifest.input_shape
    if len(inputs) > max_batch:
        raise InvalidInput(
            f"At most {max_batch} samples per request; got {len(inputs)}.", field="inputs"
        )
    try:
        batch = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise InvalidInput(
            f"`inputs` must be a rectangular array of numbers shaped [batch, *{expected}].",
            field="inputs",
        ) from e
    if list(batch.shape[1:]) != expected:
        raise InvalidInput(
            f"Each sample must be shaped {expected}; got {list(batch.shape[1:])}.",
            field="inputs",
            expected_shape=expected,
        )
    if not np.isfinite(batch).all():
        raise InvalidInput("`inputs` contains NaN or infinite values.", field="inputs")
    return batch
