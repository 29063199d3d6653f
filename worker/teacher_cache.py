"""Teacher outputs, computed once per (teacher, dataset) pair and kept as a content-addressed file.

The key is the teacher file's sha256, the dataset arrays' digest and the preprocessing version, so
any later job on the same pair reads the logits instead of running the teacher again.
"""

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

PREPROCESSING_VERSION = "raw-float32-v1"


def cache_key(teacher_sha256: str, dataset_digest: str) -> str:
    text = f"{PREPROCESSING_VERSION}:{teacher_sha256}:{dataset_digest}"
    return hashlib.sha256(text.encode()).hexdigest()


def cached_teacher_logits(
    directory: Path,
    key: str,
    splits: dict[str, np.ndarray],
    compute: Callable[[np.ndarray], np.ndarray],
) -> tuple[dict[str, np.ndarray], bool]:
    """The teacher's logits for each named split, and whether they came from the cache."""
    path = directory / f"{key}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        if set(cached) == set(splits):
            return cached, True
    logits = {name: np.ascontiguousarray(compute(x)) for name, x in splits.items()}
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    save_file(logits, str(partial))
    partial.replace(path)  # atomic: two jobs racing write the same content
    return logits, False
