"""Finding a served student (by job id or alias, and version) and checking its inputs."""

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import session_scope
from app.dependencies import database_slot
from app.errors import ArtifactsExpired, Conflict, InvalidInput, JobNotReady, NotFound
from app.jobs.service import get_job
from app.ml.artifacts import Manifest, read_manifest
from app.ml.signature import ModelSignature, TextPreprocessing
from app.ml.text import TextTokenizer, text_records_signature
from app.models import Artifact, ArtifactFormat, Job, JobStatus
from app.storage import ArtifactStore, get_store

# Open Inference Protocol versions of a student, and the artifact each one serves.
DEFAULT_VERSION = "1"
VERSIONS = {DEFAULT_VERSION: ArtifactFormat.ONNX, "int8": ArtifactFormat.ONNX_INT8}
ALIAS_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# The longest text `/predict` and `/v2` take, in characters (longer: a 4xx).
MAX_TEXT_CHARS = 100_000
# A name is looked up in the database at most this often per process (a serving process that
# did not change an alias sees the change this late); aliases changed here are seen at once.
RESOLVE_TTL_S = 1.0


def get_artifact(
    session: Session, tenant_id: str, job_id: str, artifact_format: ArtifactFormat
) -> Artifact:
    """The tenant's succeeded job's artifact. Raises NotFound, JobNotReady (409),
    ArtifactsExpired (410)."""
    job = get_job(session, tenant_id, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise JobNotReady(
            f"Job {job_id} is {job.status}; its student is available once it has succeeded.",
            job_status=job.status,
        )
    expired(job)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.format == artifact_format)
    )
    if artifact is None:
        raise NotFound(f"Job {job_id} has no {artifact_format} artifact.")
    return artifact


def expired(job: Job) -> None:
    """Raises ArtifactsExpired when the retention setting removed the job's student."""
    if job.artifacts_removed_at is not None:
        raise ArtifactsExpired(
            f"Job {job.id}'s student was removed on {job.artifacts_removed_at:%Y-%m-%d}, "
            "past the deployment's retention period (DISTILL_ARTIFACT_RETENTION_DAYS); the job's "
            "result and metrics remain."
        )


@dataclass(frozen=True)
class ServedModel:
    """A succeeded job's student as served: ``paths`` maps each version it has to its ONNX
    file; a text student has the ``tokenizer`` it was distilled with (its teacher's)."""

    job_id: str
    alias: str | None
    manifest: Manifest
    paths: dict[str, Path]
    tokenizer: TextTokenizer | None = None

    @property
    def signature(self) -> ModelSignature:
        """What the ONNX graph takes (for text: token ids)."""
        return self.manifest.signature

    @property
    def request_signature(self) -> ModelSignature:
        """What a client sends: the graph's inputs, or for text the raw strings (``text``, and
        ``text_pair`` for a student of sentence pairs), tokenised here."""
        preprocessing = self.signature.preprocessing
        if not isinstance(preprocessing, TextPreprocessing):
            return self.signature
        records = text_records_signature(1, pairs=preprocessing.pairs)
        return self.signature.model_copy(update={"inputs": records.inputs})

    def tokenize(self, texts: list[str], pairs: list[str] | None) -> dict[str, np.ndarray]:
        """Token ids for the graph, by input name, cut to the student's ``max_length`` exactly
        as its training records were."""
        assert self.tokenizer is not None
        inputs, _ = self.tokenizer.encode(texts, pairs)
        return inputs.feed([t.name for t in self.signature.inputs])

    @property
    def versions(self) -> list[str]:
        return list(self.paths)

    def key(self, version: str) -> tuple[str, str]:
        return (self.job_id, version)


class ModelNotFound(NotFound):
    """No servable student is named so (the Open Inference Protocol's 404)."""


class NoSuchJob(ModelNotFound):
    """No job has the name as its id or alias."""


_manifests: dict[Path, Manifest] = {}
_tokenizers: dict[Path, TextTokenizer] = {}
# (tenant id, name) -> (when looked up, model)
_resolved: dict[tuple[str, str], tuple[float, ServedModel]] = {}
_resolved_lock = threading.Lock()


def _manifest(path: Path) -> Manifest:
    manifest = _manifests.get(path)
    if manifest is None:
        manifest = _manifests[path] = read_manifest(path.parent)
    return manifest


def _tokenizer(path: Path, manifest: Manifest) -> TextTokenizer:
    tokenizer = _tokenizers.get(path)
    if tokenizer is None:
        preprocessing = manifest.signature.preprocessing
        assert isinstance(preprocessing, TextPreprocessing)
        tokenizer = _tokenizers[path] = TextTokenizer.from_file(path, preprocessing)
    return tokenizer


def find_served_model(
    session: Session, store: ArtifactStore, tenant_id: str, name: str
) -> ServedModel:
    """The tenant's student named ``name`` (a job id, else an alias). A job that exists but has
    not succeeded raises ``JobNotReady``; no job (or another tenant's), ``NoSuchJob``; one
    whose student the retention setting removed, ``ArtifactsExpired``."""
    job = session.get(Job, name) if _UUID.match(name) else None
    if job is None or job.tenant_id != tenant_id:
        job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.alias == name))
    if job is None:
        raise NoSuchJob(f"Unknown model: no job has the id or alias '{name}'.")
    if job.status != JobStatus.SUCCEEDED:
        raise JobNotReady(
            f"Job {job.id} is {job.status}; its student is served once it has succeeded.",
            job_status=job.status,
        )
    expired(job)
    artifacts = {
        a.format: store.path(a.storage_key)
        for a in session.scalars(select(Artifact).where(Artifact.job_id == job.id))
    }
    if ArtifactFormat.MANIFEST not in artifacts or ArtifactFormat.ONNX not in artifacts:
        raise ModelNotFound(f"Job {job.id} has no ONNX student to serve.")
    paths = {v: Path(artifacts[f]) for v, f in VERSIONS.items() if f in artifacts}
    manifest = _manifest(Path(artifacts[ArtifactFormat.MANIFEST]))
    tokenizer = None
    if isinstance(manifest.signature.preprocessing, TextPreprocessing):
        if ArtifactFormat.TOKENIZER not in artifacts:
            raise ModelNotFound(f"Job {job.id}'s text student has no tokenizer to serve it with.")
        tokenizer = _tokenizer(Path(artifacts[ArtifactFormat.TOKENIZER]), manifest)
    return ServedModel(job.id, job.alias, manifest, paths, tokenizer)


def _lookup(tenant_id: str, name: str) -> ServedModel:
    with session_scope() as session:
        return find_served_model(session, get_store(), tenant_id, name)


async def resolve(tenant_id: str, name: str) -> ServedModel:
    """``find_served_model`` from the event loop, cached for ``RESOLVE_TTL_S``; the database is
    read on a worker thread, holding one of the API's database slots."""
    now = time.monotonic()
    hit = _resolved.get((tenant_id, name))
    if hit is not None and now - hit[0] < RESOLVE_TTL_S:
        return hit[1]
    async with database_slot():
        model = await anyio.to_thread.run_sync(_lookup, tenant_id, name)
    with _resolved_lock:
        _resolved[tenant_id, name] = (now, model)
    return model


def forget(tenant_id: str, *names: str | None) -> None:
    """Drop the tenant's cached look-ups of these names (an alias changed)."""
    with _resolved_lock:
        for name in names:
            if name is not None:
                _resolved.pop((tenant_id, name), None)


def model_path(model: ServedModel, version: str) -> Path:
    """The ONNX file serving ``version``; ``ModelNotFound`` for a version the job lacks."""
    path = model.paths.get(version)
    if path is None:
        raise ModelNotFound(
            f"Model '{model.job_id}' has no version '{version}'; it has {model.versions}."
        )
    return path


def set_alias(session: Session, tenant_id: str, job_id: str, alias: str) -> Job:
    """Name a succeeded job's student ``alias``; 409 if another of the tenant's jobs has it."""
    job = get_job(session, tenant_id, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise JobNotReady(
            f"Job {job_id} is {job.status}; only a succeeded job's student can have an alias.",
            job_status=job.status,
        )
    if _UUID.match(alias):
        raise InvalidInput("An alias cannot be shaped like a job id.", field="alias")
    holder = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.alias == alias))
    if holder is not None and holder.id != job_id:
        raise Conflict(
            f"The alias '{alias}' is taken by job {holder.id}.",
            code="alias_taken",
            field="alias",
        )
    previous, job.alias = job.alias, alias
    try:
        session.flush()
    except IntegrityError as e:  # another request took it meanwhile
        raise Conflict(
            f"The alias '{alias}' is taken by another job.", code="alias_taken", field="alias"
        ) from e
    forget(tenant_id, previous, alias, job_id)
    return job


def clear_alias(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id, job_id)
    forget(tenant_id, job.alias, job_id)
    job.alias = None
    return job


def parse_texts(
    inputs: list[object], pairs: bool, max_batch: int
) -> tuple[list[str], list[str] | None]:
    """`/predict`'s JSON batch for a text student: strings, or for a student of sentence
    pairs, ``[text, text_pair]`` lists; an empty string is a record like any other.

    Raises:
        InvalidInput: anything else, more than ``max_batch`` records, or a text longer than
            ``MAX_TEXT_CHARS``.
    """
    if len(inputs) > max_batch:
        raise InvalidInput(
            f"At most {max_batch} samples per request; got {len(inputs)}.", field="inputs"
        )
    shape = '`["text", "text pair"]` lists' if pairs else "strings"
    records: list[list[str]] = []
    for item in inputs:
        record = item if pairs else [item]
        if not (
            isinstance(record, list)
            and len(record) == 1 + pairs
            and all(isinstance(text, str) for text in record)
        ):
            raise InvalidInput(
                f"This student takes text: `inputs` must be a list of {shape}.", field="inputs"
            )
        if max(len(text) for text in record) > MAX_TEXT_CHARS:
            raise InvalidInput(
                f"A text is longer than {MAX_TEXT_CHARS} characters.", field="inputs"
            )
        records.append(record)
    texts = [record[0] for record in records]
    second = [record[-1] for record in records]
    return texts, second if pairs else None


def parse_inputs(inputs: list[object], signature: ModelSignature, max_batch: int) -> np.ndarray:
    """The JSON batch as float32, checked against the student's input signature."""
    expected = list(signature.input_shape)
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
