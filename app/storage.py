"""Where files live: uploads, and the artifacts the worker writes, under one root directory.

In server mode the root is a directory every API and worker host mounts (a shared volume).
Keys are relative POSIX paths built by Distill itself, never taken from a user, and only by the
functions in ``keys`` below.

An upload is received into ``staging/`` and either adopted (moved to its key) or removed: the
services check it inside ``ArtifactStore.holding``, and files of a row whose transaction rolls
back go with it (``remove_on_rollback``). What a killed process left in staging is removed when
the API starts (``clear_staging``).
"""

import contextlib
import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.config import get_settings
from app.errors import PayloadTooLarge

CHUNK = 1 << 20
# Staged files older than this are left from a dead process (an upload being received now is
# younger, whichever API process on the shared volume receives it).
STAGING_MAX_AGE_S = 3600.0


class keys:
    """Every storage key Distill uses, built in this one place."""

    TEACHER_CACHE = "cache/teacher-outputs"
    TOKEN_CACHE = "cache/tokens"  # text datasets tokenised by a teacher's tokenizer

    # Each tenant's cached outputs are its own: derived from its teachers and data.
    @staticmethod
    def teacher_cache(tenant_id: str) -> str:
        return f"{keys.TEACHER_CACHE}/{tenant_id}"

    @staticmethod
    def token_cache(tenant_id: str) -> str:
        return f"{keys.TOKEN_CACHE}/{tenant_id}"

    @staticmethod
    def teacher_dir(teacher_id: str) -> str:
        return f"teachers/{teacher_id}"

    @staticmethod
    def teacher(teacher_id: str, teacher_format: str) -> str:
        return f"{keys.teacher_dir(teacher_id)}/teacher.{teacher_format}"

    @staticmethod
    def dataset_dir(dataset_id: str) -> str:
        return f"datasets/{dataset_id}"

    @staticmethod
    def dataset(dataset_id: str, stored_format: Literal["npz", "parquet"] = "npz") -> str:
        """An uploaded dataset as stored: ``.npz`` arrays, or text records as Parquet."""
        return f"{keys.dataset_dir(dataset_id)}/data.{stored_format}"

    @staticmethod
    def checkpoints(job_id: str) -> str:
        return f"checkpoints/{job_id}"

    @staticmethod
    def checkpoint(job_id: str) -> str:
        return f"{keys.checkpoints(job_id)}/last.safetensors"

    @staticmethod
    def artifacts(job_id: str) -> str:
        return f"artifacts/{job_id}"

    @staticmethod
    def artifact(job_id: str, attempt: int) -> str:
        return f"{keys.artifacts(job_id)}/attempt-{attempt}"


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    size_bytes: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key escapes the store: {key}")
        return path

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def receive(self, source: BinaryIO, *, max_bytes: int) -> StoredFile:
        """Stream an upload to a temporary file, hashing it; 413 past ``max_bytes``."""
        staging = self.staging
        staging.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=staging, delete=False) as out:
            try:
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(
                            f"The upload is larger than the limit of {max_bytes} bytes.",
                            limit_bytes=max_bytes,
                        )
                    digest.update(chunk)
                    out.write(chunk)
            except BaseException:
                Path(out.name).unlink(missing_ok=True)
                raise
        return StoredFile(Path(out.name), digest.hexdigest(), size)

    @contextlib.contextmanager
    def holding(self, upload: StoredFile) -> Iterator[StoredFile]:
        """Around the code that checks and adopts a staged upload: if it raises, whatever the
        reason, the staged file is removed (once adopted it has moved, and stays)."""
        try:
            yield upload
        except BaseException:
            upload.path.unlink(missing_ok=True)
            raise

    def clear_staging(self, *, older_than_s: float) -> int:
        """Remove staged files not modified for ``older_than_s``; returns how many."""
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.staging.glob("*") if self.staging.is_dir() else ():
            # Another process may remove or adopt it meanwhile: skip what cannot be read.
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def adopt(self, staged: Path, key: str) -> Path:
        """Move a staged file to its key (same filesystem: an atomic rename)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(target)
        return target

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def delete_after_commit(self, session: Session, *prefixes: str) -> None:
        """Remove ``prefixes`` once ``session``'s transaction commits: the files of rows it
        deletes (a failed commit keeps both)."""

        def remove(_: Session) -> None:
            for prefix in prefixes:
                self.delete_tree(prefix)

        event.listen(session, "after_commit", remove, once=True)

    def size(self, prefix: str) -> int:
        """Bytes of the files under ``prefix`` (0 if there is none)."""
        total = 0
        for path in self.path(prefix).rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                if path.is_file():
                    total += path.stat().st_size
        return total

    def empty_cache(self, prefix: str) -> int:
        """Remove the entries of the cache at ``prefix`` (files, not the ones a job is still
        writing, ``*.partial``); returns how many. A job that misses one computes it again."""
        removed = 0
        for path in self.path(prefix).rglob("*"):
            if path.is_file() and not path.name.endswith(".partial"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def remove_on_rollback(session: Session, store: ArtifactStore, prefix: str) -> None:
    """Remove ``prefix`` from the store if ``session``'s transaction rolls back: the files of a
    row that will never be committed (the request failed after they were adopted)."""
    event.listen(session, "after_rollback", lambda _: store.delete_tree(prefix), once=True)


@lru_cache
def get_store() -> ArtifactStore:
    root = get_settings().resolved_storage_dir
    root.mkdir(parents=True, exist_ok=True)
    return ArtifactStore(root)
