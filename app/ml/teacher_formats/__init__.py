"""Teacher formats, registered once: adding one is a module and one line in ``FORMATS``.

An upload is first checked for what Distill never loads (pickles, ``torch.save`` and
TorchScript archives: they run code), then given to the first format whose ``sniff`` recognises
it, in registry order. Any other zip or tar archive is a Hugging Face model directory, or refused.
"""

import zipfile
from pathlib import Path

from app.errors import InvalidModel, PickleRefused, UnsupportedFormat
from app.ml.archives import SNIFF_BYTES, archive_kind, zip_directory_size
from app.ml.signature import TextPreprocessing
from app.ml.teacher_formats.base import (
    ScoresChoice,
    TeacherBackend,
    TeacherDeclarations,
    TeacherFormat,
    TeacherInfo,
    apply_declarations,
)
from app.ml.teacher_formats.huggingface import HUGGINGFACE, position_limit
from app.ml.teacher_formats.onnx import ONNX
from app.ml.teacher_formats.safetensors import SAFETENSORS

# In sniffing order: ONNX has no magic bytes, so it comes last.
FORMATS: dict[str, TeacherFormat] = {f.name: f for f in (SAFETENSORS, HUGGINGFACE, ONNX)}

__all__ = [
    "FORMATS",
    "ScoresChoice",
    "TeacherBackend",
    "TeacherDeclarations",
    "TeacherFormat",
    "TeacherInfo",
    "inspect_teacher",
]

EXPORT_HELP = (
    "Export the model instead: to ONNX with "
    "`torch.onnx.export(model.eval(), (example_batch,), 'teacher.onnx', input_names=['input'], "
    "output_names=['logits'], dynamic_shapes=({0: torch.export.Dim('batch')},), "
    "external_data=False)`, or, for an "
    "architecture Distill builds (a student family: `mlp`, `cnn`, `resnet`, `mobilenet_v2`...), "
    "to safetensors with "
    "`safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors')` uploaded with a "
    "`config` describing the architecture."
)
PICKLE_PROTOCOL_OPCODE = 0x80
# A zip's central directory is listed to find a checkpoint's pickle up to this size.
MAX_LISTED_BYTES = 16 << 20
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


def _zip_kind(path: Path) -> str | None:
    """'pickle' for a torch.save zip, 'torchscript', 'other' for any other zip; None if no zip."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        # A directory too large to list is no checkpoint: it is left to the archive's own checks
        # (which refuse it) rather than parsed here.
        if zip_directory_size(path)[1] > MAX_LISTED_BYTES:
            return "other"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, InvalidModel):  # (no end record zip_directory_size can read)
        return "other"
    if any(n.startswith("code/") or "/code/" in n for n in names):
        return "torchscript"
    return "pickle" if any(n.endswith(".pkl") for n in names) else "other"


def _refuse_code(path: Path, filename: str, head: bytes) -> None:
    """Raise for files whose loading would run code, whatever their name."""
    if head[:1] == bytes([PICKLE_PROTOCOL_OPCODE]) and 2 <= head[1] <= 5:
        raise PickleRefused(
            f"`{filename}` is a Python pickle, which Distill never loads. {EXPORT_HELP}"
        )
    zip_kind = _zip_kind(path)
    if zip_kind == "pickle":
        raise PickleRefused(
            f"`{filename}` is a torch.save checkpoint (a zip holding a pickle), which Distill "
            f"never loads. {EXPORT_HELP}"
        )
    if zip_kind == "torchscript":
        raise UnsupportedFormat(
            f"`{filename}` is a TorchScript archive: it is code, and Distill does not run uploaded "
            f"code. {EXPORT_HELP}"
        )
    if zip_kind == "other" and archive_kind(head) is None:  # (a zip behind other bytes)
        raise UnsupportedFormat(f"`{filename}` is a zip archive, not a model. {EXPORT_HELP}")


def _text_declarations(info: TeacherInfo, declared: TeacherDeclarations) -> TeacherDeclarations:
    """A declared text preprocessing changes only the fields the uploader set (`max_length`,
    say): the tokenizer and padding inspection found stay.

    Raises:
        InvalidModel: preprocessing of another kind for a text teacher, or a `max_length` past
            the model's position embeddings.
    """
    found, given = info.signature.preprocessing, declared.preprocessing
    if not isinstance(found, TextPreprocessing) or given is None:
        return declared
    if not isinstance(given, TextPreprocessing):
        raise InvalidModel(
            f"This teacher takes text: its `preprocessing` is of kind `text`, not `{given.kind}`.",
            field="preprocessing",
        )
    merged = found.model_copy(
        update={name: getattr(given, name) for name in given.model_fields_set}
    )
    positions = position_limit(info.architecture)
    if positions is not None and merged.max_length > positions:
        raise InvalidModel(
            f"`preprocessing.max_length` {merged.max_length} is more than the {positions} "
            "tokens the model's position embeddings take.",
            field="preprocessing",
        )
    return declared.model_copy(update={"preprocessing": merged})


def inspect_teacher(
    path: Path,
    filename: str,
    config: str | None,
    declared: TeacherDeclarations | None = None,
) -> TeacherInfo:
    """Recognise and check an uploaded teacher without running its code in this process (an
    ONNX graph's trial inference, and a Hugging Face model's, run in a separate, limited
    process), then choose its class scores and record what the uploader ``declared``.

    Raises:
        PickleRefused, UnsupportedFormat: 415, with how to export instead.
        InvalidModel: 422, the file, its ``config`` or a declaration cannot be used.
    """
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    size = path.stat().st_size
    _refuse_code(path, filename, head)
    teacher_format = next(f for f in FORMATS.values() if f.sniff(head, size))
    if teacher_format is ONNX and Path(filename).suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(
            f"`{filename}` is neither ONNX nor safetensors; files of this kind usually hold a "
            f"pickle, which Distill never loads. {EXPORT_HELP}"
        )
    info = teacher_format.inspect(path, filename, config)
    declared = _text_declarations(info, declared or TeacherDeclarations())
    return apply_declarations(info, declared)
