"""Finding a served student (by job id or alias, and version) and checking its inputs."""

import base64
import binascii
import io
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import anyio
import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.datasets.images import ImageRefused, decode_image, probe_image
from app.db import session_scope
from app.dependencies import database_slot
from app.errors import ArtifactsExpired, Conflict, InvalidInput, JobNotReady, NotFound
from app.jobs.service import get_job
from app.ml.artifacts import Manifest, read_manifest
from app.ml.signature import ImagePreprocessing, ModelSignature, TextPreprocessing
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
# Pixels (width x height, as their headers declare them) the encoded images of one `/predict` or
# `/v2` request may hold in all, checked before any is decoded: about a second of decoding. Each
# image is also within the uploads' limit (`MAX_IMAGE_PIXELS`).
MAX_REQUEST_PIXELS = 100_000_000
# A name is looked up in the database at most this often per process (a serving process that
# did not change an alias sees the change this late); aliases changed here are seen at once.
RESOLVE_TTL_S = 1.0
_T = TypeVar("_T")


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
    """The JSON batch as float32, checked against the student's input signature. An image
    student's samples may also be encoded images (``decode_images``), mixed with arrays.

    Raises:
        InvalidInput: more than ``max_batch`` samples, a sample of the wrong shape, NaN or
            infinite values, a string for a student that takes arrays only, or an image refused
            (``field`` names the sample: ``inputs.3``).
    """
    expected = list(signature.input_shape)
    if len(inputs) > max_batch:
        raise InvalidInput(
            f"At most {max_batch} samples per request; got {len(inputs)}.", field="inputs"
        )
    encoded = {i: item for i, item in enumerate(inputs) if isinstance(item, str)}
    if encoded and not isinstance(signature.preprocessing, ImagePreprocessing):
        first = next(iter(encoded))
        raise InvalidInput(
            f"Sample {first} is a string, but this student takes arrays: send each sample as "
            f"numbers shaped {expected} (encoded images are for students of image datasets).",
            field=f"inputs.{first}",
        )
    if encoded:  # the arrays are checked first: they are cheap
        samples = {
            i: _sample(item, expected, i) for i, item in enumerate(inputs) if i not in encoded
        }
        samples |= decode_images(encoded, signature)
        batch = np.stack([samples[i] for i in range(len(inputs))])
    else:
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


async def parse_batch(
    inputs: list[object], signature: ModelSignature, max_batch: int
) -> np.ndarray:
    """``parse_inputs`` from the event loop: on a worker thread when the batch holds encoded
    images (decoding them is CPU work)."""
    if any(isinstance(item, str) for item in inputs):
        return await anyio.to_thread.run_sync(parse_inputs, inputs, signature, max_batch)
    return parse_inputs(inputs, signature, max_batch)


def _sample(item: object, expected: list[int], index: int) -> np.ndarray:
    """One array sample of a batch that mixes arrays and encoded images."""
    try:
        array = np.asarray(item, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise InvalidInput(
            f"Sample {index} must be a rectangular array of numbers shaped {expected}, or an "
            "encoded image.",
            field=f"inputs.{index}",
        ) from e
    if list(array.shape) != expected:
        raise InvalidInput(
            f"Sample {index} must be shaped {expected}; got {list(array.shape)}.",
            field=f"inputs.{index}",
            expected_shape=expected,
        )
    return array


def decode_images(
    encoded: dict[int, str], signature: ModelSignature, field: str = "inputs"
) -> dict[int, np.ndarray]:
    """Encoded images, by their index in the batch, as an image student takes them: float32
    ``[C, H, W]``, made as its dataset's samples were.

    Each is base64 (standard alphabet; whitespace ignored), or a data URL
    (``data:image/png;base64,...``), of a PNG, JPEG or WebP told by its content. Every header
    is read first (``probe_image``: the pixel limit per image, ``MAX_REQUEST_PIXELS`` in all);
    then each is decoded as uploads are (``decode_image``: RGB, transparency on white; grey
    for ``L``; resized bicubic to the student's size), put in the signature's channel order and
    made its stored form (``stored_pixels``).

    Raises:
        InvalidInput: 422 naming the sample (``field``.index): ``invalid_base64``,
            ``not_an_image``, ``corrupt_image``, ``image_too_large``; ``too_many_pixels`` for
            the request; ``invalid_input`` for a student whose input is not an image.
    """
    preprocessing = signature.preprocessing
    assert isinstance(preprocessing, ImagePreprocessing)
    shape = list(signature.input_shape)
    channels = 1 if preprocessing.channel_order == "L" else 3
    if len(shape) != 3 or shape[0] != channels:
        raise InvalidInput(
            f"This student takes {shape}, not {preprocessing.channel_order} images [{channels}, "
            "H, W]: send its samples as arrays.",
            field=field,
        )
    size = (shape[2], shape[1])
    files = {i: _base64(text, f"{field}.{i}") for i, text in encoded.items()}
    total = 0
    for i, data in files.items():
        width, height = _read(probe_image, data, f"{field}.{i}")
        total += width * height
        if total > MAX_REQUEST_PIXELS:
            raise InvalidInput(
                f"The images of one request may hold {MAX_REQUEST_PIXELS:,} pixels in all; "
                f"those up to `{field}.{i}` hold {total:,}. Send smaller images, or fewer per "
                "request.",
                code="too_many_pixels",
                field=f"{field}.{i}",
            )
    mode: Literal["RGB", "L"] = "L" if preprocessing.channel_order == "L" else "RGB"
    images = {}
    for i, data in files.items():
        pixels = _read(lambda f: decode_image(f, size, mode), data, f"{field}.{i}")
        images[i] = stored_pixels(pixels, preprocessing)
    return images


def stored_pixels(pixels: np.ndarray, preprocessing: ImagePreprocessing) -> np.ndarray:
    """8-bit pixels (``[H, W, 3]`` RGB or ``[H, W]`` grey) as the student's dataset stores its
    samples: float32 ``[C, H, W]`` in its channel order, ``(pixel * scale - mean) / std``.

    Where the scale is 1/M for a whole M of at least 2, the dataset's pixels (0 to M: builtin
    digits 16, Fashion-MNIST 255) were scaled into [0, 1], and an 8-bit pixel is scaled by
    1/255 so that white is 1.0 there too; otherwise pixels are 8-bit as they are (an archive's:
    scale 1.0, values 0 to 255).
    """
    x = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if preprocessing.channel_order == "BGR":
        x = x[::-1]
    values = x.astype(np.float32)
    maximum = 1.0 / preprocessing.scale
    if round(maximum) >= 2 and math.isclose(maximum, round(maximum), rel_tol=1e-6):
        values /= np.float32(255)
    else:
        values *= np.float32(preprocessing.scale)
    channel = (-1, 1, 1)
    if preprocessing.mean is not None:
        values -= np.asarray(preprocessing.mean, np.float32).reshape(channel)
    if preprocessing.std is not None:
        values /= np.asarray(preprocessing.std, np.float32).reshape(channel)
    return values


def _base64(text: str, field: str) -> bytes:
    """The bytes of a base64 string or ``data:...;base64,`` URL."""
    payload = text
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InvalidInput(
                f"`{field}` is a data URL without base64 data: send "
                "`data:image/png;base64,<data>`.",
                code="invalid_base64",
                field=field,
            )
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(
            f"`{field}` is a string but not a base64-encoded image (nor a data URL): send an "
            "array of numbers, or a PNG, JPEG or WebP in base64.",
            code="invalid_base64",
            field=field,
        ) from e


def _read(read: Callable[[io.BytesIO], _T], data: bytes, field: str) -> _T:
    """``read`` applied to an image's bytes; its refusal as a 422 naming ``field``."""
    try:
        return read(io.BytesIO(data))
    except ImageRefused as e:
        raise InvalidInput(e.message(f"`{field}`"), code=e.code, field=field) from e
