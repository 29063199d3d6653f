"""Image datasets: an image-folder archive (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``) read into
uint8 arrays, stored as an ``.npz`` like any other upload.

An archive, as ``read_image_archive`` reads it (optionally all under one top-level folder):

- class folders: ``<class>/<image>``; the test split is then the fixed-seed holdout of ``.npz``
  uploads (``holdout_split``);
- a split: ``train/<class>/<image>`` and ``test/<class>/<image>``;
- or a ``labels.csv`` (header ``file,label``) naming each image's class, ``file`` being its path
  relative to the folder holding ``labels.csv``.

Class names are the folders' names (or the labels), sorted, unless the ``classes`` form field
gives their order. OS clutter is ignored: ``__MACOSX/``, ``Thumbs.db``, ``desktop.ini`` and
dotfiles (``.DS_Store``, ``._photo.png``). Images are PNG, JPEG or WebP by their content (any
suffix); Pillow is never asked to try its other formats. Each is converted to RGB (grey to RGB;
transparency composited on white; 16-bit grey scaled to 8 bits) and, with ``image_size``,
resized (bicubic, no crop). Nothing is decoded before every image's header has been read: the
layout, the formats, each image's pixel count (``MAX_IMAGE_PIXELS``: decompression bombs), the
sizes and the memory the arrays will take are checked first. The dataset's signature declares
``ARCHIVE_PREPROCESSING``: the stored values are the pixels themselves. ``probe_image`` and
``decode_image`` read one image with the same checks (``/predict``'s encoded images too).

Refusals are 422 ``InvalidDataset`` problems with ``field="file"``, a ``code`` and, where one
file is at fault, ``member``: its path inside the archive (never a server path). Codes:
``not_an_image``, ``corrupt_image``, ``image_too_large``, ``image_sizes_differ``,
``unexpected_file`` (a file outside the layout, or not listed in ``labels.csv``),
``invalid_labels`` (``labels.csv`` unreadable, or a row without a file or label, or twice),
``missing_image`` (``labels.csv`` names a file the archive lacks), ``unknown_label`` (a class
the ``classes`` field lacks), ``invalid_class_name``, ``no_images``, ``too_few_images``,
``one_class``, ``dataset_too_large``, ``invalid_image_size``; and the archive checks' own
(``archive_unsafe``, ``archive_too_large``, ``archive_unreadable``: ``extract_archive``).
"""

import csv
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.datasets.npz import MIN_SAMPLES
from app.errors import InvalidDataset, InvalidModel, unstorable_character
from app.ml.archives import extract_archive
from app.ml.signature import ImagePreprocessing

IMAGE_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Pillow format names, as ``Image.open(...).format`` gives them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Pixels (width * height) one image may declare; read from its header before it is decoded.
# Below Pillow's own bomb threshold (``Image.MAX_IMAGE_PIXELS``, 89M), which is also honoured.
MAX_IMAGE_PIXELS = 40_000_000
# Archive members (images and folders): extract_archive's default (1,000) suits model folders.
MAX_ARCHIVE_MEMBERS = 100_000
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 1024
LABELS_FILE = "labels.csv"
TRAIN, TEST = "train", "test"
CLUTTER = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# Composited under transparent pixels.
BACKGROUND = (255, 255, 255)
_IMAGE_SIZE = re.compile(r"\s*(\d{1,5})\s*(?:[xX×]\s*(\d{1,5})\s*)?")
# Leading bytes of the formats read, and of others named in a refusal.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
}
_FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
_ALLOWED = "PNG, JPEG or WebP"
# What an archive's stored values are: RGB pixels as they are (value = pixel * 1.0).
ARCHIVE_PREPROCESSING = ImagePreprocessing(scale=1.0, channel_order="RGB")


@dataclass(frozen=True)
class ImageDataset:
    """Decoded images: ``x`` uint8 ``[N, 3, H, W]`` (RGB, channels first), ``y`` int64 ``[N]``
    indexing ``classes``; ``x_test``, ``y_test`` likewise, or None (no test split given)."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    classes: list[str]


@dataclass(frozen=True)
class _Image:
    """An image file found in the archive: where it is, what the archive calls it, its class
    name, whether it is in the test split, and what its header declares."""

    path: Path
    member: str
    label: str
    test: bool
    size: tuple[int, int] = (0, 0)  # width, height


def is_image_archive(filename: str) -> bool:
    """Whether an upload's file name names an image-folder archive (``IMAGE_ARCHIVE_SUFFIXES``,
    any case)."""
    return filename.lower().endswith(IMAGE_ARCHIVE_SUFFIXES)


def parse_image_size(raw: str) -> tuple[int, int]:
    """The ``image_size`` form field: ``"64"`` (square) or ``"64x48"`` (width x height), each
    side in pixels from ``MIN_IMAGE_SIDE`` to ``MAX_IMAGE_SIDE``. Returns (width, height).

    Raises:
        InvalidDataset: 422 ``invalid_image_size`` naming field ``image_size``.
    """
    match = _IMAGE_SIZE.fullmatch(raw)
    sides = None if match is None else [int(s) for s in match.groups() if s is not None]
    if sides is None or not all(MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE for s in sides):
        raise InvalidDataset(
            f"`image_size` must be a side (`64`) or width x height (`64x48`) in pixels, each "
            f"from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}; got {raw[:40]!r}.",
            code="invalid_image_size",
            field="image_size",
        )
    return sides[0], sides[-1]


def image_memory_bytes(n_train: int, n_test: int, width: int, height: int) -> int:
    """Bytes the decoded dataset takes at its peak: the uint8 images, then, when the stored
    ``.npz`` is checked (``read_dataset_npz``), the same arrays with their float32 copies and
    int64 labels."""
    n = n_train + n_test
    return n * 3 * height * width * (1 + 4) + n * 8


def read_image_archive(
    path: Path,
    *,
    image_size: tuple[int, int] | None = None,
    classes: list[str] | None = None,
    max_bytes: int,
) -> ImageDataset:
    """Unpack the archive at ``path`` (``extract_archive``'s checks, up to
    ``MAX_ARCHIVE_MEMBERS`` members) into a temporary folder, find its layout, read every
    image's header, then decode the images into RGB uint8 arrays ``[N, 3, H, W]``.

    ``image_size`` (width, height) resizes every image (bicubic); without it every image must
    have the same size. ``classes`` fixes the class order (each class found must be in it; it
    may name more); without it the names are sorted. The arrays and the float32 copies the
    stored ``.npz``'s check makes take at most ``max_bytes`` (``image_memory_bytes``), checked
    before anything is decoded.

    Raises:
        InvalidDataset: 422 with the refusal's code (see the module's docstring).
    """
    with tempfile.TemporaryDirectory(prefix="distill-images-") as tmp:
        root = Path(tmp)
        try:
            extract_archive(path, root, max_members=MAX_ARCHIVE_MEMBERS)
        except InvalidModel as e:  # the same refusal, as a dataset's
            raise InvalidDataset(e.detail, code=e.code, **e.extra) from e
        images = _find_images(root)
        if classes is None:
            names = sorted({image.label for image in images})
        else:
            names = classes
            known = set(classes)
            for image in images:
                if image.label not in known:
                    raise _refusal(
                        f"The class {image.label!r} (of {image.member!r}) is not among the "
                        "`classes` given.",
                        "unknown_label",
                        image.member,
                    )
        images = [_probe(image) for image in images]
        train = [image for image in images if not image.test]
        test = [image for image in images if image.test]
        _check_counts(train, test)
        width, height = image_size or _common_size(images)
        needed = image_memory_bytes(len(train), len(test), width, height)
        if needed > max_bytes:
            raise InvalidDataset(
                f"{len(images)} images of {width}x{height} pixels take {needed:,} bytes in "
                f"memory (as uint8 RGB arrays and their float32 copies), more than the budget "
                f"of {max_bytes:,} bytes for checking an upload; nothing was decoded. Send a "
                "smaller `image_size`, or fewer images.",
                code="dataset_too_large",
                field="file",
            )
        index = {name: i for i, name in enumerate(names)}
        x, y = _decode_all(train, index, (width, height))
        x_test, y_test = _decode_all(test, index, (width, height)) if test else (None, None)
    return ImageDataset(x, y, x_test, y_test, names)


def write_image_npz(data: ImageDataset, out: IO[bytes]) -> None:
    """Write ``data`` as an ``.npz`` (``x``, ``y``, and ``x_test``, ``y_test`` when there is a
    test split) that ``read_dataset_npz`` reads; stored uncompressed with fixed timestamps, so
    the same images give the same bytes (and sha256)."""
    arrays = {"x": data.x, "y": data.y}
    if data.x_test is not None and data.y_test is not None:
        arrays |= {"x_test": data.x_test, "y_test": data.y_test}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", (1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def _refusal(detail: str, code: str, member: str | None = None) -> InvalidDataset:
    extra = {} if member is None else {"member": member}
    return InvalidDataset(detail, code=code, field="file", **extra)


def _is_clutter(relative: PurePosixPath) -> bool:
    return any(part in CLUTTER or part.startswith(".") for part in relative.parts)


def _files(root: Path) -> list[PurePosixPath]:
    """Every regular file under ``root`` (an unpacked archive holds nothing else), relative,
    sorted, clutter left out."""
    found = (PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*"))
    return sorted(f for f in found if not _is_clutter(f) and (root / f).is_file())


def _content_root(files: list[PurePosixPath]) -> PurePosixPath:
    """The folder the layout starts in: the archive's top, or the one folder holding everything
    when it holds a layout (``labels.csv``, or files two folders down)."""
    tops = {f.parts[0] for f in files}
    if len(tops) == 1 and all(len(f.parts) > 1 for f in files):
        top = PurePosixPath(next(iter(tops)))
        if top / LABELS_FILE in files or any(len(f.parts) > 2 for f in files):
            return top
    return PurePosixPath()


def _find_images(root: Path) -> list[_Image]:
    """The image files of the layout with their class names and splits (unread). Raises
    ``InvalidDataset`` for a file outside the layout, ``no_images`` for none."""
    files = _files(root)
    base = _content_root(files)
    inside = [f.relative_to(base) for f in files]
    if PurePosixPath(LABELS_FILE) in inside:
        images = _labelled_images(root, base, inside)
    else:
        tops = {f.parts[0] for f in inside if len(f.parts) > 1}
        split = TRAIN in tops or TEST in tops
        if split and tops != {TRAIN, TEST}:
            raise _refusal(
                f"The archive's folders are {sorted(tops)}: a split archive holds exactly "
                f"`{TRAIN}/<class>/<image>` and `{TEST}/<class>/<image>`; otherwise give one "
                f"folder per class, none named `{TRAIN}` or `{TEST}`.",
                "unexpected_file",
            )
        depth = 3 if split else 2
        images = []
        for relative in inside:
            member = (base / relative).as_posix()
            if len(relative.parts) != depth:
                layout = (
                    f"`{TRAIN}/<class>/<image>` or `{TEST}/<class>/<image>`"
                    if split
                    else f"`<class>/<image>` (or a `{LABELS_FILE}`)"
                )
                raise _refusal(
                    f"The file {member!r} is not where images go: an image-folder archive "
                    f"holds {layout}.",
                    "unexpected_file",
                    member,
                )
            test = split and relative.parts[0] == TEST
            label = relative.parts[-2]
            images.append(_Image(root / base / relative, member, label, test))
    if not images:
        raise _refusal(
            f"The archive holds no images: give one folder per class (`<class>/<image>`), "
            f"`{TRAIN}/` and `{TEST}/` folders of them, or a `{LABELS_FILE}`.",
            "no_images",
        )
    for label in {image.label for image in images}:
        character = unstorable_character(label)
        if character is not None or not label or len(label) > 255:
            raise _refusal(
                f"The class name {label!r} cannot be stored: a class name has 1 to 255 "
                f"characters{f', and no {character}' if character else ''}.",
                "invalid_class_name",
            )
    return images


def _labelled_images(root: Path, base: PurePosixPath, inside: list[PurePosixPath]) -> list[_Image]:
    """The images ``labels.csv`` names (``file``: a path relative to its folder; ``label``: the
    class name); every other file of the archive is refused."""
    csv_member = (base / LABELS_FILE).as_posix()
    available = set(inside) - {PurePosixPath(LABELS_FILE)}
    labels: dict[PurePosixPath, str] = {}
    try:
        with open(root / base / LABELS_FILE, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "file" not in columns or "label" not in columns:
                raise _refusal(
                    f"{csv_member!r} must have a header with the columns `file` and `label`; "
                    f"it has {columns}.",
                    "invalid_labels",
                    csv_member,
                )
            reader.fieldnames = columns
            for row in reader:
                line = reader.line_num
                name, label = (str(row.get(c) or "").strip() for c in ("file", "label"))
                if not name or not label:
                    raise _refusal(
                        f"{csv_member!r} line {line} has no `file` or no `label`.",
                        "invalid_labels",
                        csv_member,
                    )
                relative = PurePosixPath(*(p for p in name.split("/") if p not in ("", ".")))
                if relative in labels:
                    raise _refusal(
                        f"{csv_member!r} names {name!r} twice (line {line}).",
                        "invalid_labels",
                        csv_member,
                    )
                if relative not in available:
                    raise _refusal(
                        f"{csv_member!r} line {line} names {name!r}, which the archive does "
                        f"not hold (paths are relative to the folder holding {LABELS_FILE}).",
                        "missing_image",
                        csv_member,
                    )
                labels[relative] = label
    except (UnicodeDecodeError, csv.Error) as e:
        raise _refusal(
            f"{csv_member!r} is not a readable UTF-8 CSV: {e}.", "invalid_labels", csv_member
        ) from e
    for relative in sorted(available - labels.keys()):
        member = (base / relative).as_posix()
        raise _refusal(
            f"The file {member!r} is not listed in {csv_member!r}: list every image with its "
            "label.",
            "unexpected_file",
            member,
        )
    return [
        _Image(root / base / relative, (base / relative).as_posix(), label, test=False)
        for relative, label in sorted(labels.items())
    ]


def _sniffed(head: bytes) -> str | None:
    """The image format a file's first bytes announce, if one is known here."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)


class ImageRefused(Exception):
    """An image not read: ``code`` is ``not_an_image``, ``corrupt_image`` or
    ``image_too_large``; ``message`` words it for any image's name."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code, self.why = code, why

    def message(self, name: str) -> str:
        """The refusal as a sentence about the image called ``name`` (quoted as the caller
        likes: a member's path, a request's field)."""
        if self.code == "not_an_image":
            return (
                f"{name} is {self.why}: images must be {_ALLOWED} (told by their "
                "content, not their names)."
            )
        if self.code == "corrupt_image":
            return f"The image {name} is corrupt or truncated ({self.why})."
        return (
            f"The image {name} declares more than {MAX_IMAGE_PIXELS:,} pixels{self.why}; it was "
            "not decoded (a decompression bomb?)."
        )


ImageSource = Path | IO[bytes]


def _not_an_image(source: ImageSource) -> ImageRefused:
    """The refusal of what Pillow did not identify, naming a known foreign format."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(12)
    else:
        source.seek(0)
        head = source.read(12)
    kind = _sniffed(head)
    if kind in _FORMAT_NAMES.values():  # the signature of a format read, not its content
        return ImageRefused("corrupt_image", f"its {kind} header is unreadable")
    return ImageRefused("not_an_image", f"a {kind} image" if kind else "not an image")


def _too_large(size: tuple[int, int] | None) -> ImageRefused:
    return ImageRefused("image_too_large", "" if size is None else f" ({size[0]}x{size[1]} pixels)")


def _pixel_limit() -> int:
    """This module's limit, or Pillow's if lower (it warns past its own, and refuses past
    twice it)."""
    pillow = Image.MAX_IMAGE_PIXELS
    return MAX_IMAGE_PIXELS if pillow is None else min(MAX_IMAGE_PIXELS, int(pillow))


def probe_image(source: ImageSource) -> tuple[int, int]:
    """The size (width, height) an image's header declares, read without decoding the pixels;
    PNG, JPEG or WebP by content only, within the pixel limit (``MAX_IMAGE_PIXELS``, or
    Pillow's if lower). A stream is read from its start (as Pillow reads it) and rewound.

    Raises:
        ImageRefused: ``not_an_image``, ``corrupt_image`` (an allowed format's signature with
            an unreadable header), ``image_too_large``.
    """
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own limit (its warning is an error where warnings are made errors)
        raise _too_large(None) from e
    except UnidentifiedImageError as e:
        raise _not_an_image(source) from e
    except MemoryError:
        raise
    except Exception as e:  # a hostile header may fail in any way: it is the file's fault
        raise ImageRefused("corrupt_image", _reason(e)) from e
    finally:
        if not isinstance(source, Path):
            source.seek(0)
    if width * height > _pixel_limit():
        raise _too_large((width, height))
    return width, height


def decode_image(
    source: ImageSource, size: tuple[int, int], mode: Literal["RGB", "L"] = "RGB"
) -> np.ndarray:
    """One image (``probe_image`` first: this decodes) as uint8 ``[H, W, 3]`` RGB or
    ``[H, W]`` grey (``mode`` ``L``, from RGB by ITU-R 601-2 luma) at ``size`` (width, height):
    made RGB as ``_to_rgb`` does, then resized (bicubic, no crop) if its size differs.

    Raises:
        ImageRefused: ``corrupt_image``; ``image_too_large`` for Pillow's own limit.
    """
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as opened:
            opened.load()
            converted = _to_rgb(opened)
        if mode == "L":
            converted = converted.convert("L")
        if converted.size != size:
            converted = converted.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(converted, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(None) from e
    except MemoryError:
        raise
    except Exception as e:  # truncated data, a bad checksum...: the file's fault
        raise ImageRefused("corrupt_image", _reason(e)) from e


def _probe(image: _Image) -> _Image:
    """``image`` with the size its header declares (``probe_image``).

    Raises:
        InvalidDataset: ``not_an_image``, ``corrupt_image``, ``image_too_large``.
    """
    try:
        size = probe_image(image.path)
    except ImageRefused as e:
        raise _refusal(e.message(repr(image.member)), e.code, image.member) from e
    return _Image(image.path, image.member, image.label, image.test, size)


def _check_counts(train: list[_Image], test: list[_Image]) -> None:
    if len(train) < MIN_SAMPLES:
        raise _refusal(
            f"The archive holds {len(train)} training images; at least {MIN_SAMPLES} are needed "
            "(to train, validate and test).",
            "too_few_images",
        )
    found = sorted({image.label for image in train})
    if len(found) < 2:
        where = "training images" if test else "images"
        raise _refusal(
            f"All the {where} are of one class ({found[0]!r}): distilling needs at least two.",
            "one_class",
        )


def _common_size(images: list[_Image]) -> tuple[int, int]:
    """The size every image has (width, height); refused when two differ."""
    first = images[0]
    for image in images[1:]:
        if image.size != first.size:
            raise _refusal(
                f"The images differ in size: {first.member!r} is {first.size[0]}x"
                f"{first.size[1]}, {image.member!r} is {image.size[0]}x{image.size[1]} "
                "(width x height). Send `image_size` (e.g. `64` or `64x48`) to resize them all.",
                "image_sizes_differ",
                image.member,
            )
    return first.size


def _decode_all(
    images: list[_Image], index: dict[str, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` decoded into uint8 ``[N, 3, H, W]`` and their class indices int64 ``[N]``; the
    array is allocated once and filled image by image."""
    width, height = size
    x = np.empty((len(images), 3, height, width), dtype=np.uint8)
    y = np.fromiter((index[image.label] for image in images), dtype=np.int64, count=len(images))
    for i, image in enumerate(images):
        x[i] = _decode(image, size).transpose(2, 0, 1)
    return x, y


def _decode(image: _Image, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 RGB ``[H, W, 3]`` at ``size`` (width, height): ``decode_image``.

    Raises:
        InvalidDataset: ``corrupt_image``; ``image_too_large`` for Pillow's own limit.
    """
    try:
        return decode_image(image.path, size)
    except ImageRefused as e:
        raise _refusal(e.message(repr(image.member)), e.code, image.member) from e


def _reason(error: Exception) -> str:
    """What Pillow said, when it says it in a few words (never a path: it reads an open file)."""
    text = str(error)
    return text if text and len(text) <= 120 and "/" not in text else type(error).__name__


def _to_rgb(opened: Image.Image) -> Image.Image:
    """``opened`` as 8-bit RGB: grey replicated, transparency composited on ``BACKGROUND``,
    16-bit (and 32-bit integer) grey scaled to 8 bits, float grey clipped to [0, 255]."""
    if opened.mode.startswith("I") or opened.mode == "F":
        values = np.asarray(opened, dtype=np.float64)
        if opened.mode != "F":  # 16-bit samples (PNG), as Pillow holds them
            values = values / 257.0
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if opened.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in opened.info:
        rgba = opened.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return opened.convert("RGB")
