"""Reading and checking an uploaded ``.npz`` dataset without unpickling or unbounded memory."""

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, StringConstraints, TypeAdapter, ValidationError

from app.errors import InvalidDataset, LabelsNotZeroBased
from app.ml.signature import MAX_RANK

ALLOWED_ARRAYS = {"x", "y", "x_test", "y_test"}
MAX_CLASSES = 100_000
# Enough for a training, a validation and a held-out test sample.
MIN_SAMPLES = 3
UNREADABLE_ZIP = (
    "The archive's entries are encrypted or use a compression numpy cannot read: save it with "
    "`np.savez` or `np.savez_compressed`."
)
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0
# Elements per block of the finiteness check: its temporary is at most this many bytes.
FINITE_CHUNK = 1 << 20


@dataclass(frozen=True)
class NpzDataset:
    """``y`` is None for an unlabelled transfer set (which then has a labelled test split).
    ``x`` and ``x_test`` are cast to float32; ``x_dtype`` names the dtype ``x`` was stored in."""

    x: np.ndarray
    y: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    x_dtype: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def label_range(self) -> tuple[int, int]:
        """The smallest and largest label over ``y`` and ``y_test``."""
        labels = [a for a in (self.y, self.y_test) if a is not None and len(a)]
        return min(int(a.min()) for a in labels), max(int(a.max()) for a in labels)

    @property
    def num_classes(self) -> int:
        """Classes counted from the labels: the largest label + 1."""
        return self.label_range[1] + 1


ClassNames = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=255)]],
    Field(min_length=1, max_length=MAX_CLASSES),
]
_CLASS_NAMES: TypeAdapter[list[str]] = TypeAdapter(ClassNames)


def parse_classes(raw: str) -> list[str]:
    """The ``classes`` form field: a JSON list of unique, non-empty names (one per label value).

    Raises:
        InvalidDataset: 422 naming field ``classes``.
    """
    try:
        names = _CLASS_NAMES.validate_json(raw)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = "".join(f"[{p}]" for p in error["loc"])
        raise InvalidDataset(
            f"`classes` must be a JSON list of 1 to {MAX_CLASSES} unique, non-empty class names "
            f"of at most 255 characters; {where + ': ' if where else ''}{error['msg']}.",
            field="classes",
        ) from e
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidDataset(
                f"`classes` names {name!r} more than once; class names must be unique.",
                field="classes",
            )
        seen.add(name)
    return names


def check_labels(data: NpzDataset, classes: list[str] | None) -> None:
    """Labels index the class names: below ``len(classes)``, or, unnamed, starting at 0.

    Raises:
        InvalidDataset: a label has no name in ``classes`` (field ``classes``).
        LabelsNotZeroBased: no ``classes`` and the smallest label is above 0 (field ``y``, or
            ``y_test`` for an unlabelled transfer set).
    """
    low, high = data.label_range
    if classes is not None:
        if high >= len(classes):
            raise InvalidDataset(
                f"`classes` names {len(classes)} classes (label values 0 to {len(classes) - 1}), "
                f"but the labels go up to {high}: give one name per label value, index 0 "
                "included.",
                field="classes",
            )
        return
    if low > 0:
        raise LabelsNotZeroBased(
            f"Labels run from {low} to {high}, but class indices start at 0: "
            f"{high - low + 1} classes would be counted as {high + 1}. Subtract {low} from the "
            "labels. (Only if lower class indices truly exist but have no samples here, name "
            "every class with the `classes` form field, one name per index from 0.)",
            field="y" if data.y is not None else "y_test",
        )


def holdout_test_size(n: int) -> int:
    return max(1, round(n * HOLDOUT_FRACTION))


def holdout_split(
    x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed-seed 80/20 split, the same for every job on the same data."""
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(x))
    n_test = holdout_test_size(len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@dataclass(frozen=True)
class _Header:
    """What a ``.npy`` header declares, read before its data is decoded."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def memory_bytes(self) -> int:
        """Bytes the array takes once decoded."""
        return self.count * self.dtype.itemsize


def _cast_bytes(name: str, header: _Header) -> int:
    """Bytes of the copy ``read_dataset_npz`` makes to cast the array (float32 inputs, int64
    labels); 0 when it is stored in that dtype already."""
    target = np.dtype(np.float32) if name in ("x", "x_test") else np.dtype(np.int64)
    return 0 if header.dtype == target else header.count * target.itemsize


def _check_archive(path: Path, max_bytes: int) -> dict[str, _Header]:
    """Look inside the zip before numpy loads anything: entry names, and the size each array's
    header declares. The arrays and the copies casting them needs must fit in ``max_bytes``, so
    zip bombs and absurd shapes are refused before any memory is taken. Returns the headers by
    array name."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            names = {e.filename.removesuffix(".npy") for e in entries}
            if (
                len(entries) != len(names)
                or not names <= ALLOWED_ARRAYS
                or not all(e.filename.endswith(".npy") for e in entries)
            ):
                raise InvalidDataset(
                    f"An .npz dataset holds only the arrays {sorted(ALLOWED_ARRAYS)} (as .npy); "
                    f"found {sorted(e.filename for e in entries)}."
                )
            headers: dict[str, _Header] = {}
            for entry in entries:
                with archive.open(entry) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                headers[entry.filename.removesuffix(".npy")] = _Header(tuple(shape), dtype)
    except (RuntimeError, NotImplementedError) as e:  # encrypted, or an unknown compression
        raise InvalidDataset(UNREADABLE_ZIP) from e
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError) as e:
        raise InvalidDataset(f"The file is not a readable .npz archive: {e}") from e
    decoded = sum(h.memory_bytes + _cast_bytes(n, h) for n, h in headers.items())
    if decoded > max_bytes:
        raise InvalidDataset(
            f"The arrays decompress to {decoded:,} bytes in memory (the shapes and dtypes their "
            f"headers declare, float32 and int64 casts included), more than the budget of "
            f"{max_bytes:,} bytes for checking an upload; nothing was decoded."
        )
    inflated = sum(e.file_size for e in entries)
    if inflated > max_bytes:
        raise InvalidDataset(
            f"The archive's entries decompress to {inflated:,} bytes, more than the budget of "
            f"{max_bytes:,} bytes for checking an upload; nothing was decoded."
        )
    for name, header in headers.items():
        if header.dtype.hasobject:
            raise InvalidDataset(
                f"The arrays could not be read without pickle: `{name}` holds Python objects "
                f"(dtype {header.dtype}).",
                field=name,
            )
    return headers


def _check_inputs(header: _Header, name: str) -> None:
    if (
        header.dtype.kind not in "fiub"
        or not 2 <= len(header.shape) <= MAX_RANK + 1
        or 0 in header.shape[1:]
    ):
        raise InvalidDataset(
            f"`{name}` must be a numeric array shaped [samples, features...] (1 to {MAX_RANK} "
            f"non-empty feature dimensions); got dtype {header.dtype} and shape "
            f"{list(header.shape)}.",
            field=name,
        )


def _check_labels(header: _Header, name: str, n: int) -> None:
    if header.dtype.kind not in "iub" or len(header.shape) != 1:
        raise InvalidDataset(
            f"`{name}` must be a 1-D integer array of class indices; got dtype {header.dtype} "
            f"and shape {list(header.shape)}.",
            field=name,
        )
    if header.shape[0] != n:
        raise InvalidDataset(f"`{name}` has {header.shape[0]} labels for {n} samples.", field=name)


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a``, checked ``FINITE_CHUNK`` elements at a time (a bounded
    temporary) on a flat view of the contiguous array."""
    if a.dtype.kind not in "fc":
        return True
    flat = a.reshape(-1, order="A")
    return all(
        bool(np.isfinite(flat[start : start + FINITE_CHUNK]).all())
        for start in range(0, flat.size, FINITE_CHUNK)
    )


def _inputs(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` cast to float32 (copied once, only if stored in another dtype) and checked
    finite."""
    with np.errstate(over="ignore"):
        x = a.astype(np.float32, copy=False)
    # After the cast: a float64 beyond float32's range becomes infinite there.
    if a.dtype.kind == "f" and not _all_finite(x):
        raise InvalidDataset(f"`{name}` contains NaN or infinite values.", field=name)
    return x


def _labels(a: np.ndarray, name: str) -> np.ndarray:
    if len(a) and (a.min() < 0 or a.max() >= MAX_CLASSES):
        raise InvalidDataset(
            f"`{name}` labels must lie in [0, {MAX_CLASSES}); found {a.min()}..{a.max()}.",
            field=name,
        )
    return a.astype(np.int64, copy=False)


def read_dataset_npz(path: Path, max_bytes: int = 1 << 34) -> NpzDataset:
    """Read and check an uploaded ``.npz``: every shape and dtype from the headers first, then
    the labels, then the inputs, so a refusal decodes as little as it can. The arrays and their
    casts take at most ``max_bytes`` bytes.

    Raises:
        InvalidDataset: 422 naming the array at fault where there is one.
    """
    headers = _check_archive(path, max_bytes)
    if "x" not in headers:
        raise InvalidDataset("The .npz has no `x` array.", field="x")
    if ("x_test" in headers) != ("y_test" in headers):
        raise InvalidDataset("Give both `x_test` and `y_test`, or neither.")
    if "y" not in headers and "x_test" not in headers:
        raise InvalidDataset(
            "Without `y` (an unlabelled transfer set), give a labelled test split `x_test`, "
            "`y_test` to measure the student on.",
            field="y",
        )
    x_header = headers["x"]
    _check_inputs(x_header, "x")
    if "y" in headers:
        _check_labels(headers["y"], "y", x_header.shape[0])
    if "x_test" in headers:
        test_header = headers["x_test"]
        _check_inputs(test_header, "x_test")
        if test_header.shape[1:] != x_header.shape[1:]:
            raise InvalidDataset(
                f"`x_test` samples are shaped {list(test_header.shape[1:])}, `x` samples "
                f"{list(x_header.shape[1:])}.",
                field="x_test",
            )
        if test_header.shape[0] == 0:
            raise InvalidDataset("`x_test` is empty.", field="x_test")
        _check_labels(headers["y_test"], "y_test", test_header.shape[0])
    try:
        with np.load(path, allow_pickle=False) as npz:
            y = y_test = x_test = None
            if "y" in headers:
                y = _labels(npz["y"], "y")
                if len(y) and y.min() == y.max():  # (no samples: refused just below)
                    raise InvalidDataset(
                        f"`y` holds one class only (every label is {y[0]}): distilling needs "
                        "at least two classes.",
                        field="y",
                    )
            if "y_test" in headers:
                y_test = _labels(npz["y_test"], "y_test")
            x = _inputs(npz["x"], "x")
            if len(x) < MIN_SAMPLES:
                raise InvalidDataset(f"`x` needs at least {MIN_SAMPLES} samples.", field="x")
            if "x_test" in headers:
                x_test = _inputs(npz["x_test"], "x_test")
    except (RuntimeError, NotImplementedError) as e:
        raise InvalidDataset(UNREADABLE_ZIP) from e
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise InvalidDataset(f"The archive is corrupt: {e}") from e
    return NpzDataset(x, y, x_test, y_test, x_dtype=x_header.dtype.name)
