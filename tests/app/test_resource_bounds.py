"""Issue 12, cases 1 and 2: tiny uploads that would make the API allocate gigabytes are refused
from budgets computed before any memory is taken (activation memory for safetensors teachers,
decoded size for .npz datasets), and the API's memory is measured while it refuses them."""

import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app import config
from app.config import get_settings
from app.datasets.npz import read_dataset_npz
from app.errors import InvalidDataset
from app.ml.layers import activation_bytes
from app.ml.signature import ModelSignature
from app.ml.students import CnnSpec, MlpSpec, build_model
from tests.helpers.api import npz_bytes

MIB = 1024 * 1024
GIB = 1024 * MIB
# The bounds the refusals must stay under: Python/numpy allocations (traced) and the process's
# resident memory (torch's CPU allocator is not traced).
TRACED_PEAK_BOUND = 64 * MIB
RSS_GROWTH_BOUND = 256 * MIB
REFUSAL_SECONDS = 2.0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


@dataclass
class Usage:
    seconds: float = 0.0
    traced_peak_bytes: int = 0
    rss_growth_bytes: int = 0


@contextmanager
def measured() -> Iterator[Usage]:
    """Wall time, tracemalloc's peak, and the growth of the peak resident set (VmHWM, reset
    first through /proc/self/clear_refs) over the block."""
    usage = Usage()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _status_kib("VmRSS") * 1024
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - start
        usage.traced_peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        usage.rss_growth_bytes = _status_kib("VmHWM") * 1024 - rss_before
        print(
            f"time {usage.seconds:.3f} s, traced peak {usage.traced_peak_bytes / MIB:.1f} MiB, "
            f"RSS growth {usage.rss_growth_bytes / MIB:.1f} MiB"
        )


@contextmanager
def setting(name: str, value: int) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(f"DISTILL_{name.upper()}", str(value))
        config.get_settings.cache_clear()
        try:
            yield
        finally:
            config.get_settings.cache_clear()
    config.get_settings.cache_clear()


def uploaded(client: TestClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get("/v1/datasets").json()["items"]
    return [d for d in items if d["kind"] == "uploaded"]


def stored_files() -> set[Path]:
    """Every file in the store's staging and dataset folders."""
    root = get_settings().resolved_storage_dir
    return {p for folder in ("staging", "datasets") for p in (root / folder).rglob("*")}


# --- Case 1: safetensors teachers and the activation budget ---------------------------------


@pytest.fixture(autouse=True, scope="module")
def meta_kernels_imported() -> None:
    """The first meta forward pass in a process imports torch's reference kernels (about 800
    modules, 2-3 s, 60 MB traced) whatever the shapes; the API pays it once, at its first
    teacher. Paid here so the measurements are those of the check."""
    activation_bytes(CnnSpec(channels=[1]), ModelSignature.for_tensor([1, 2, 2], 2))


def cnn_teacher(tmp_path: Path, input_shape: list[int]) -> tuple[Path, dict[str, object]]:
    """A cnn of eight 1-channel blocks and a linear classifier for ``input_shape``: its weights
    are a few KB whatever the input size."""
    spec = CnnSpec(channels=[1] * 8, hidden_sizes=[])
    teacher_config: dict[str, object] = {
        "architecture": spec.model_dump(mode="json"),
        "input_shape": input_shape,
        "num_classes": 2,
    }
    model = build_model(spec, ModelSignature.for_tensor(input_shape, 2))
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path, teacher_config


def post_teacher(client: TestClient, path: Path, teacher_config: dict[str, object]) -> Any:
    with open(path, "rb") as f:
        return client.post(
            "/v1/teachers",
            files={"file": ("teacher.safetensors", f)},
            data={"config": json.dumps(teacher_config)},
        )


@pytest.mark.parametrize("input_shape", [[1, 16_384, 16_384], [4, 65_536, 65_536]])
def test_huge_activations_from_a_tiny_teacher_are_refused(
    client: TestClient, tmp_path: Path, input_shape: list[int]
) -> None:
    path, teacher_config = cnn_teacher(tmp_path, input_shape)
    if input_shape == [1, 16_384, 16_384]:
        assert 30_000 < path.stat().st_size < 40_000  # the 36 KB file
    with measured() as usage:
        response = post_teacher(client, path, teacher_config)
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["code"], body["field"]) == ("invalid_model", "config")
    budget = get_settings().max_activation_bytes
    assert body["budget_bytes"] == budget and body["activation_bytes"] > budget
    assert f"{body['activation_bytes']:,} bytes" in body["detail"]
    assert f"{budget:,} bytes" in body["detail"] and "max_activation_bytes" in body["detail"]
    # Nothing the size of the input was built: a [1, 16384, 16384] float tensor alone is 1 GiB.
    assert usage.seconds < REFUSAL_SECONDS
    assert usage.traced_peak_bytes < TRACED_PEAK_BOUND
    assert usage.rss_growth_bytes < RSS_GROWTH_BOUND
    assert client.get("/v1/teachers").json()["items"] == []


def test_activation_budget_is_a_setting(client: TestClient, tmp_path: Path) -> None:
    path, teacher_config = cnn_teacher(tmp_path, [1, 256, 256])
    assert post_teacher(client, path, teacher_config).status_code == 201
    needed = activation_bytes(
        CnnSpec(channels=[1] * 8), ModelSignature.for_tensor([1, 256, 256], 2)
    )
    with setting("max_activation_bytes", needed - 1):
        refused = post_teacher(client, path, teacher_config)
    assert refused.status_code == 422, refused.text
    assert refused.json()["activation_bytes"] == needed
    with setting("max_activation_bytes", needed):
        assert post_teacher(client, path, teacher_config).status_code == 201


def test_activation_bytes_by_hand() -> None:
    # Input [1, 4, 4]: 64 bytes; conv, batch norm, ReLU [2, 4, 4]: 128 each; pool [2, 2, 2] and
    # flatten [8]: 32 each; logits [3]: 12.
    spec, signature = CnnSpec(channels=[2]), ModelSignature.for_tensor([1, 4, 4], 3)
    assert activation_bytes(spec, signature) == 64 + 3 * 128 + 2 * 32 + 12
    # Flatten [12], Linear+ReLU [5] each, logits [2].
    mlp = MlpSpec(hidden_sizes=[5])
    assert activation_bytes(mlp, ModelSignature.for_tensor([3, 4], 2)) == 48 + 48 + 20 + 20 + 8


def test_activation_bytes_allocate_nothing() -> None:
    spec = CnnSpec(channels=[1] * 8)
    with measured() as usage:
        needed = activation_bytes(spec, ModelSignature.for_tensor([4, 65_536, 65_536], 2))
    assert needed > 4 * 65_536 * 65_536 * 4  # more than the input alone (64 GiB)
    assert usage.seconds < REFUSAL_SECONDS and usage.rss_growth_bytes < RSS_GROWTH_BOUND


# --- Case 2: .npz datasets and the decoded-memory budget -------------------------------------


def npz_bomb(classes: int = 1) -> bytes:
    """The issue's 1.08 MB archive: 1 GiB of float32 zeros ``x`` [4194304, 1, 8, 8] and
    4194304 int64 labels (all 0, or ``classes`` values), deflated at level 9."""
    n = 4_194_304
    buffer = io.BytesIO()
    y = np.zeros(n, dtype=np.int64) if classes == 1 else np.arange(n, dtype=np.int64) % classes
    np.savez_compressed(buffer, x=np.zeros((n, 1, 8, 8), dtype=np.float32), y=y)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = npz_bomb()
    assert 1_000_000 < len(data) < 1_200_000  # about 1 MB
    return data


def post_npz(client: TestClient, data: bytes) -> dict[str, Any]:
    response = client.post("/v1/datasets", files={"file": ("data.npz", data)})
    body: dict[str, Any] = {"status": response.status_code, **response.json()}
    return body


# The bomb's arrays as their headers declare them: x 1 GiB (float32), y 32 MiB (int64).
BOMB_DECODED_BYTES = 4_194_304 * 64 * 4 + 4_194_304 * 8


def test_npz_bomb_over_the_memory_budget_is_refused_undecoded(
    client: TestClient, bomb: bytes
) -> None:
    budget = 512 * MIB
    files = stored_files()
    with setting("max_dataset_memory_bytes", budget), measured() as usage:
        body = post_npz(client, bomb)
    assert body["status"] == 422, body
    assert body["code"] == "invalid_dataset"
    assert f"{BOMB_DECODED_BYTES:,} bytes" in body["detail"]
    assert f"budget of {budget:,} bytes" in body["detail"]
    assert usage.traced_peak_bytes < TRACED_PEAK_BOUND
    assert usage.rss_growth_bytes < RSS_GROWTH_BOUND
    assert uploaded(client) == [] and stored_files() == files


def test_npz_bomb_with_one_class_is_refused_before_its_inputs_are_decoded(
    client: TestClient, bomb: bytes
) -> None:
    # At the default budget (2 GiB) its 1.03 GiB fit; the labels are read first (32 MiB) and
    # hold one class, so `x` is never decoded.
    assert get_settings().max_dataset_memory_bytes > BOMB_DECODED_BYTES
    files = stored_files()
    with measured() as usage:
        body = post_npz(client, bomb)
    assert body["status"] == 422, body
    assert (body["code"], body["field"]) == ("invalid_dataset", "y")
    assert "two classes" in body["detail"]
    assert usage.traced_peak_bytes < TRACED_PEAK_BOUND
    assert usage.rss_growth_bytes < RSS_GROWTH_BOUND
    assert uploaded(client) == [] and stored_files() == files


def test_one_class_dataset_is_refused(client: TestClient) -> None:
    x = np.random.default_rng(0).random((30, 4), dtype=np.float32)
    files = stored_files()
    body = post_npz(client, npz_bytes(x=x, y=np.full(30, 3)))
    assert body["status"] == 422, body
    assert (body["code"], body["field"]) == ("invalid_dataset", "y")
    assert "every label is 3" in body["detail"] and "at least two classes" in body["detail"]
    assert uploaded(client) == [] and stored_files() == files


def test_a_bomb_within_budget_is_decoded_without_copies(tmp_path: Path) -> None:
    # Two classes: the 1 GiB float32 `x` is decoded once, neither cast nor copied by the
    # finiteness check (a float32 copy and a boolean mask were 1.25 GiB more).
    path = tmp_path / "data.npz"
    path.write_bytes(npz_bomb(classes=2))
    with measured() as usage:
        data = read_dataset_npz(path, max_bytes=2 * GIB)
    assert data.x.shape == (4_194_304, 1, 8, 8) and data.x.dtype == np.float32
    assert data.y is not None and data.num_classes == 2
    assert usage.traced_peak_bytes < BOMB_DECODED_BYTES + TRACED_PEAK_BOUND
    with pytest.raises(InvalidDataset, match="budget of"):
        read_dataset_npz(path, max_bytes=BOMB_DECODED_BYTES - 1)


def test_casts_count_against_the_budget_and_nan_is_found_in_any_chunk(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    x = np.zeros((3 * 2**20 + 5, 1))  # float64: 8 bytes each, plus a 4-byte float32 cast
    x[-1, 0] = np.nan  # in the last, partial chunk
    y = np.arange(len(x)) % 2
    path.write_bytes(npz_bytes(x=x, y=y))
    decoded = x.size * (8 + 4) + y.size * y.dtype.itemsize
    with pytest.raises(InvalidDataset, match=f"{decoded:,} bytes"):
        read_dataset_npz(path, max_bytes=decoded - 1)
    with pytest.raises(InvalidDataset, match="NaN"):
        read_dataset_npz(path, max_bytes=decoded)
    # float64 beyond float32's range is infinite once cast.
    path.write_bytes(npz_bytes(x=np.array([[1e300], [0.0], [1.0]]), y=np.array([0, 1, 1])))
    with pytest.raises(InvalidDataset, match="infinite"):
        read_dataset_npz(path)
