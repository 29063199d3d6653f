"""Teacher outputs, computed once per (teacher, dataset) pair and kept as a content-addressed file.

The key is the teacher file's sha256, the dataset arrays' digest and the preprocessing version, so
any later job on the same pair reads the logits instead of running the teacher again. Where the
output space is large, only each sample's top-k logits are kept, with the row's log-sum-exp so the
rest of the probability mass is known (see ``compress_top_k``).
"""

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from safetensors.numpy import load_file, save_file

PREPROCESSING_VERSION = "raw-float32-v1"
TOP_K_ABOVE_CLASSES = 1024
TOP_K = 64


def cache_key(teacher_sha256: str, dataset_digest: str, variant: str = "") -> str:
    """The entry of one teacher file on one dataset; ``variant`` names what else the logits
    depend on (which output, its kind, the declared preprocessing)."""
    text = f"{PREPROCESSING_VERSION}:{teacher_sha256}:{dataset_digest}:{variant}"
    return hashlib.sha256(text.encode()).hexdigest()


def _logsumexp(z: np.ndarray) -> np.ndarray:
    peak = z.max(axis=-1, keepdims=True)
    result: np.ndarray = (peak + np.log(np.exp(z - peak).sum(axis=-1, keepdims=True)))[..., 0]
    return result


def compress_top_k(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Keep each row's k largest logits, their class indices, and the row's log-sum-exp."""
    indices = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(logits, indices, axis=-1)
    return {
        "values": values.astype(np.float32),
        "indices": indices.astype(np.int32),
        "logsumexp": _logsumexp(logits.astype(np.float64)).astype(np.float32),
        "num_classes": np.array([logits.shape[-1]], dtype=np.int64),
    }


def expand_top_k(stored: dict[str, np.ndarray]) -> np.ndarray:
    """Dense logits again: the top-k exact, the remaining mass spread evenly over the other
    classes, so ``softmax`` gives the top-k probabilities exactly and the tail in total."""
    values, indices = stored["values"].astype(np.float64), stored["indices"]
    lse = stored["logsumexp"].astype(np.float64)[..., None]
    num_classes, k = int(stored["num_classes"][0]), values.shape[-1]
    tail_mass = np.clip(1.0 - np.exp(values - lse).sum(axis=-1, keepdims=True), 1e-30, None)
    fill = lse + np.log(tail_mass / (num_classes - k))
    dense = np.repeat(fill, num_classes, axis=-1)
    np.put_along_axis(dense, indices.astype(np.int64), values, axis=-1)
    return dense.astype(np.float32)


InputsT = TypeVar("InputsT")  # a split's inputs: an array, or tokenised text


def cached_teacher_logits(
    directory: Path,
    key: str,
    splits: dict[str, InputsT],
    compute: Callable[[InputsT], np.ndarray],
    max_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """The teacher's logits for each named split, and whether they came from the cache. Beyond
    ``max_bytes`` in all, the least recently used entries are evicted after a write."""
    path = directory / f"{key}.safetensors"
    try:
        cached = load_file(str(path))
        os.utime(path)  # recently used: evicted last
        return {name: _read_split(cached, name) for name in splits}, True
    except FileNotFoundError:
        pass  # never computed, or evicted
    except KeyError:
        pass  # written for other splits: compute and replace it
    stored: dict[str, np.ndarray] = {}
    for name, x in splits.items():
        logits = np.ascontiguousarray(compute(x))
        if logits.shape[-1] > TOP_K_ABOVE_CLASSES:
            stored |= {f"{name}.{part}": v for part, v in compress_top_k(logits, TOP_K).items()}
        else:
            stored[name] = logits
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    save_file(stored, str(partial))
    partial.replace(path)  # atomic: two jobs racing write the same content
    if max_bytes is not None:
        evict_least_recently_used(directory, max_bytes, keep=path)
    # This job sees exactly what the cache will give later jobs, compressed or not.
    return {name: _read_split(stored, name) for name in splits}, False


def evict_least_recently_used(directory: Path, max_bytes: int, keep: Path) -> None:
    """Delete the least recently used entries (by mtime, refreshed on every hit) until the rest
    fit in ``max_bytes``; ``keep`` (the entry just written) stays whatever its size. A job that
    loses an entry this way between its lookup and its read simply computes it again."""
    entries = []
    for path in directory.glob("*.safetensors"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # evicted by another job meanwhile
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size


def _read_split(stored: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name in stored:
        return stored[name]
    parts = {k.removeprefix(f"{name}."): v for k, v in stored.items() if k.startswith(f"{name}.")}
    if not parts:
        raise KeyError(name)
    return expand_top_k(parts)
