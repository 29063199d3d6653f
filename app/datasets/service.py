import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.datasets.arrays import InputStats, input_stats
from app.datasets.builtins import BUILTIN_DATASETS, BuiltinDataset
from app.datasets.images import (
    ARCHIVE_PREPROCESSING,
    IMAGE_ARCHIVE_SUFFIXES,
    is_image_archive,
    read_image_archive,
    write_image_npz,
)
from app.datasets.npz import check_labels, holdout_test_size, read_dataset_npz
from app.datasets.schemas import DatasetOut
from app.datasets.text import (
    MAX_TEXT_CHARS,
    MAX_TEXT_ROWS,
    TEXT_FORMATS,
    is_text_dataset,
    read_text_stats,
    read_text_upload,
    text_format,
    write_records,
)
from app.db import lock_rows
from app.errors import (
    Conflict,
    DatasetUnavailable,
    InvalidDataset,
    InvalidSpec,
    NotFound,
    UnsupportedFormat,
)
from app.ml.signature import AnyPreprocessing, ModelSignature
from app.models import TERMINAL_STATUSES, Dataset, Job
from app.quotas import check_storage
from app.storage import ArtifactStore, StoredFile, keys, remove_on_rollback, sha256_file

NPZ = ".npz"


@dataclass(frozen=True)
class DatasetSummary:
    """What job validation needs to know of a dataset reference."""

    ref: str
    signature: ModelSignature
    train_size: int


def uploaded_out(dataset: Dataset, store: ArtifactStore) -> DatasetOut:
    """An uploaded dataset; a text one's stats are read from its stored file's footer."""
    signature = ModelSignature.model_validate(dataset.signature)
    text = is_text_dataset(signature)
    return DatasetOut(
        ref=dataset.id,
        kind="uploaded",
        modality="text" if text else "tensor",
        name=dataset.name,
        signature=signature,
        input_shape=None if text else list(signature.input_shape),
        num_classes=signature.num_classes,
        train_size=dataset.train_size,
        test_size=dataset.test_size,
        available=True,
        labelled=dataset.labelled,
        has_test_split=dataset.has_test_split,
        input_stats=(
            None if dataset.input_stats is None else InputStats.model_validate(dataset.input_stats)
        ),
        text_stats=read_text_stats(store.path(dataset.storage_key)) if text else None,
        sha256=dataset.sha256,
        size_bytes=dataset.size_bytes,
        created_at=dataset.created_at,
    )


def builtin_out(dataset: BuiltinDataset) -> DatasetOut:
    return DatasetOut(
        ref=dataset.ref,
        kind="builtin",
        modality="text" if is_text_dataset(dataset.signature) else "tensor",
        name=dataset.description,
        signature=dataset.signature,
        input_shape=list(dataset.input_shape),
        num_classes=dataset.num_classes,
        train_size=dataset.train_size,
        test_size=dataset.test_size,
        available=dataset.available(),
    )


def list_datasets(session: Session, tenant_id: str, store: ArtifactStore) -> list[DatasetOut]:
    """The builtin datasets, then the tenant's uploads, newest first."""
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    uploaded = session.scalars(query.order_by(Dataset.created_at.desc()))
    return [builtin_out(d) for d in BUILTIN_DATASETS.values()] + [
        uploaded_out(d, store) for d in uploaded
    ]


def dataset_out(session: Session, tenant_id: str, store: ArtifactStore, ref: str) -> DatasetOut:
    """A builtin dataset by its ``builtin:<name>`` ref, or the tenant's upload by id."""
    builtin = BUILTIN_DATASETS.get(ref)
    if builtin is not None:
        return builtin_out(builtin)
    return uploaded_out(get_dataset(session, tenant_id, ref), store)


def upload_dataset(
    session: Session,
    *,
    tenant_id: str,
    store: ArtifactStore,
    file: BinaryIO,
    filename: str,
    test_file: BinaryIO | None = None,
    test_filename: str | None = None,
    name: str,
    classes: list[str] | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    image_size: tuple[int, int] | None = None,
    max_bytes: int,
    decoding_budget: int,
) -> Dataset:
    """Receive an upload (each file up to ``max_bytes``), check it fully and keep it: ``.npz``
    arrays (``create_dataset``), an image-folder archive (``create_image_dataset``: ``.zip``,
    ``.tar``, ``.tar.gz``, ``.tgz``) or text records (``create_text_dataset``), by the file
    name's suffix. The text options (``test_file``, the columns) are refused for arrays and
    images, ``image_size`` (width, height) for all but images.

    Raises:
        UnsupportedFormat: 415, a file named with another suffix.
        PayloadTooLarge: 413, a file over ``max_bytes``.
        InvalidDataset: 422, the upload (or a form field) at fault.
    """
    images = is_image_archive(filename)
    if image_size is not None and not images:
        raise InvalidDataset(
            "`image_size` resizes the images of an image-folder archive (a file named "
            f"{', '.join(f'*{s}' for s in IMAGE_ARCHIVE_SUFFIXES)}).",
            field="image_size",
        )
    if images or Path(filename).suffix.lower() == NPZ:
        options = {
            "test_file": test_file,
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "label_column": label_column,
        }
        for field, value in options.items():
            if value is not None:
                raise InvalidDataset(
                    f"`{field}` is for text datasets; "
                    + (
                        "an image archive brings its test split as `test/` folders, and has "
                        "no columns."
                        if images
                        else "an .npz brings its test split as `x_test`, `y_test`, and has no "
                        "columns."
                    ),
                    field=field,
                )
        upload = store.receive(file, max_bytes=max_bytes)
        if images:
            return create_image_dataset(
                session,
                tenant_id=tenant_id,
                store=store,
                upload=upload,
                max_bytes=decoding_budget,
                name=name,
                classes=classes,
                image_size=image_size,
            )
        return create_dataset(
            session,
            tenant_id=tenant_id,
            store=store,
            upload=upload,
            max_bytes=decoding_budget,
            name=name,
            classes=classes,
        )
    for field, given in (("file", filename), ("test_file", test_filename)):
        if given is not None and text_format(given) is None:
            raise UnsupportedFormat(
                f"`{given}` is not a format Distill reads: upload a file named "
                f"{', '.join(f'*{s}' for s in (NPZ, *TEXT_FORMATS))}"
                + (
                    " (text only, as the test file)."
                    if field == "test_file"
                    else f", or an image archive ({', '.join(IMAGE_ARCHIVE_SUFFIXES)})."
                ),
                field=field,
            )
    upload = store.receive(file, max_bytes=max_bytes)
    with store.holding(upload):  # the test file may still be refused (413)
        test_upload = None if test_file is None else store.receive(test_file, max_bytes=max_bytes)
    return create_text_dataset(
        session,
        tenant_id=tenant_id,
        store=store,
        upload=upload,
        filename=filename,
        test_upload=test_upload,
        test_filename=test_filename,
        name=name,
        classes=classes,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        max_bytes=decoding_budget,
    )


def create_image_dataset(
    session: Session,
    *,
    tenant_id: str,
    store: ArtifactStore,
    upload: StoredFile,
    max_bytes: int,
    name: str,
    classes: list[str] | None = None,
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """Decode the staged image archive (``read_image_archive``: uint8 ``[N, 3, H, W]``, within
    ``max_bytes``), stage the arrays as an ``.npz`` in place of the archive and keep that as an
    ``.npz`` upload is kept (``create_dataset``), with the class names and a signature declaring
    the values pixels (``ARCHIVE_PREPROCESSING``). The archive is removed
    whatever happens; the ``.npz`` if it is refused, or if the transaction rolls back.

    Raises:
        InvalidDataset: 422, with the refusal's own code (``read_image_archive``).
    """
    with store.holding(upload):
        staged, names = _stage_images(store, upload, max_bytes, classes, image_size)
    upload.path.unlink()
    return create_dataset(
        session,
        tenant_id=tenant_id,
        store=store,
        upload=staged,
        max_bytes=max_bytes,
        name=name,
        classes=names,
        preprocessing=ARCHIVE_PREPROCESSING,
    )


def _stage_images(
    store: ArtifactStore,
    upload: StoredFile,
    max_bytes: int,
    classes: list[str] | None,
    image_size: tuple[int, int] | None,
) -> tuple[StoredFile, list[str]]:
    """The archive's images decoded and staged as an ``.npz``, and their class names. The
    arrays are freed on return: the ``.npz`` check reads them again, within the same budget."""
    images = read_image_archive(
        upload.path, image_size=image_size, classes=classes, max_bytes=max_bytes
    )
    store.staging.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=store.staging, suffix=NPZ)
    path = Path(staged)
    try:
        with os.fdopen(fd, "wb") as out:
            write_image_npz(images, out)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return StoredFile(path, sha256_file(path), path.stat().st_size), images.classes


def create_dataset(
    session: Session,
    *,
    tenant_id: str,
    store: ArtifactStore,
    upload: StoredFile,
    max_bytes: int,
    name: str,
    classes: list[str] | None = None,
    preprocessing: AnyPreprocessing | None = None,
) -> Dataset:
    """Check the staged ``.npz`` fully (shapes, dtypes, labels, NaN) before keeping it. The
    staged file is removed if this fails for any reason, and the kept one if the request's
    transaction rolls back.

    ``classes`` names the label values (``parse_classes``); without it labels must start at 0.
    ``preprocessing`` says how the values were made (default: raw tensors, as uploaded).
    """
    with store.holding(upload):
        check_storage(session, store, tenant_id, upload.size_bytes, get_settings())
        data = read_dataset_npz(upload.path, max_bytes=max_bytes)
        check_labels(data, classes)
        stats = input_stats(data.x, data.x_test, dtype=data.x_dtype)
        if data.x_test is None:
            test_size = holdout_test_size(len(data.x))
            train_size = len(data.x) - test_size
        else:
            train_size, test_size = len(data.x), len(data.x_test)
        dataset = Dataset(
            tenant_id=tenant_id,
            name=name,
            sha256=upload.sha256,
            size_bytes=upload.size_bytes,
            signature=ModelSignature.for_tensor(
                data.input_shape,
                data.num_classes if classes is None else len(classes),
                classes=classes,
                preprocessing=preprocessing,
            ).model_dump(mode="json"),
            train_size=train_size,
            test_size=test_size,
            has_test_split=data.x_test is not None,
            labelled=data.y is not None,
            input_stats=stats.model_dump(mode="json"),
            storage_key="",
        )
        session.add(dataset)
        session.flush()
        dataset.storage_key = keys.dataset(dataset.id)
        remove_on_rollback(session, store, keys.dataset_dir(dataset.id))
        store.adopt(upload.path, dataset.storage_key)
    return dataset


def create_text_dataset(
    session: Session,
    *,
    tenant_id: str,
    store: ArtifactStore,
    upload: StoredFile,
    filename: str,
    test_upload: StoredFile | None = None,
    test_filename: str | None = None,
    name: str,
    classes: list[str] | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    max_bytes: int,
) -> Dataset:
    """Check staged text records (and their test file) fully (``read_text_upload``), then keep
    them in their stored form (``write_records``: Parquet) in place of the files uploaded. The
    staged files are removed if this fails for any reason, and the kept one if the request's
    transaction rolls back. Parquet text may decode to at most ``max_bytes`` per file.

    Raises:
        UnsupportedFormat: 415, a file name without a text format's suffix.
        InvalidDataset: 422, with the refusal's own code (``read_text_upload``).
    """
    with contextlib.ExitStack() as staged:
        for held in (upload, test_upload):
            if held is not None:
                staged.enter_context(store.holding(held))
        text = read_text_upload(
            upload.path,
            filename,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            classes=classes,
            test_path=None if test_upload is None else test_upload.path,
            test_filename=test_filename,
            max_rows=MAX_TEXT_ROWS,
            max_text_chars=MAX_TEXT_CHARS,
            max_bytes=max_bytes,
        )
        records = text.records
        # The stored form replaces the staged upload; the files as uploaded are not kept.
        write_records(records, upload.path)
        check_storage(session, store, tenant_id, upload.path.stat().st_size, get_settings())
        dataset = Dataset(
            tenant_id=tenant_id,
            name=name,
            sha256=sha256_file(upload.path),
            size_bytes=upload.path.stat().st_size,
            signature=text.signature.model_dump(mode="json"),
            train_size=len(records.texts_train),
            test_size=len(records.texts_test),
            has_test_split=text.has_test_split,
            labelled=records.y_train is not None,
            input_stats=None,
            storage_key="",
        )
        session.add(dataset)
        session.flush()
        dataset.storage_key = keys.dataset(dataset.id, "parquet")
        remove_on_rollback(session, store, keys.dataset_dir(dataset.id))
        store.adopt(upload.path, dataset.storage_key)
        if test_upload is not None:
            test_upload.path.unlink()
    return dataset


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's upload. Raises NotFound, also for another tenant's."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"No dataset with id {dataset_id}.")
    return dataset


def delete_dataset(session: Session, tenant_id: str, store: ArtifactStore, ref: str) -> None:
    """Delete an uploaded dataset that no unfinished job uses, its files once the deletion
    commits. Locked against job submission (``lock_rows``).

    Raises:
        NotFound: the tenant has no such upload.
        Conflict: 409 ``builtin_dataset`` (builtins are the server's), or ``dataset_in_use``.
    """
    if ref in BUILTIN_DATASETS:
        raise Conflict(
            f"{ref} is a builtin dataset: it belongs to the server.", code="builtin_dataset"
        )
    if ref not in lock_rows(session, Dataset, [ref], exclusive=True):
        raise NotFound(f"No dataset with id {ref}.")
    dataset = get_dataset(session, tenant_id, ref)
    active = session.scalar(
        select(Job.id).where(Job.dataset_ref == ref, Job.status.not_in(TERMINAL_STATUSES)).limit(1)
    )
    if active is not None:
        raise Conflict(
            f"Dataset {ref} is used by job {active}, which has not finished.",
            code="dataset_in_use",
        )
    session.delete(dataset)
    session.flush()
    store.delete_after_commit(session, keys.dataset_dir(ref))


def resolve_dataset(session: Session, tenant_id: str, ref: str) -> DatasetSummary:
    """Look up a dataset reference (``builtin:<name>`` or the tenant's upload by id) for
    validation."""
    if ref.startswith("builtin:"):
        builtin = BUILTIN_DATASETS.get(ref)
        if builtin is None:
            raise InvalidSpec(
                f"No builtin dataset {ref!r}; choose one of {sorted(BUILTIN_DATASETS)}.",
                field="dataset",
            )
        if not builtin.available():
            raise DatasetUnavailable(
                f"{ref} is not installed on this server: {builtin.install_hint}.",
                field="dataset",
            )
        return DatasetSummary(ref, builtin.signature, builtin.train_size)
    dataset = session.get(Dataset, ref)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise InvalidSpec(f"No dataset with id {ref}.", field="dataset")
    signature = ModelSignature.model_validate(dataset.signature)
    return DatasetSummary(ref, signature, dataset.train_size)
