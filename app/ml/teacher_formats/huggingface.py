"""Hugging Face teachers: a zip, tar or tar.gz of the directory ``save_pretrained`` writes for a
sequence classifier: ``config.json``, safetensors weights (``model.safetensors``, or shards with
``model.safetensors.index.json``) and the tokenizer (``tokenizer.json``, or the files a fast
tokenizer is built from, such as ``vocab.txt`` and ``tokenizer_config.json``).

Nothing uploaded is executed. The model is a class transformers ships, chosen by the config's
``model_type`` (a config or tokenizer config naming remote code, ``auto_map``, is refused, and
remote code is never trusted anywhere), built with ``from_config`` and given the safetensors
tensors, strictly; pickled weights (``pytorch_model.bin``) are refused. Inspecting loads the
weights and runs the model once, on two short texts, in a separate process under the trial's time
and memory limits (``app.ml.sandbox``), as an ONNX graph's trial runs: a config can ask for any
size of model. Building a tokenizer from its source files (no ``tokenizer.json``) runs there too.

The teacher takes int64 ``input_ids``, ``attention_mask`` and, for models with segment embeddings,
``token_type_ids`` (``app.ml.text``); its feature layers are the hidden states,
``hidden_states.0`` (the embeddings) to ``hidden_states.{num_hidden_layers}``, ``[hidden]`` per
token. Its ``architecture`` is the whole config (transformers' defaults filled in), plus what
Distill found or fetched under ``distill``: ``max_positions`` (the most tokens a record may have)
and, for a Hub reference, ``hub`` (repository, revision, commit, each file's sha256).

A folder holding an ONNX graph instead of safetensors weights (the layout Hugging Face Optimum's
export writes) is an ONNX text classifier: ``app.ml.teacher_formats.onnx_text``.
"""

import inspect as pyinspect
import json
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from app.config import get_settings
from app.errors import InvalidModel, PickleRefused, UnsupportedFormat, find_unstorable
from app.ml.archives import archive_kind, extract_archive
from app.ml.layers import FeatureLayer
from app.ml.onnx_io import torch_latency_ms
from app.ml.sandbox import TrialFailed, TrialOutOfMemory, TrialTimeout, run_isolated
from app.ml.signature import LOGITS_NAME, ModelSignature, TextPreprocessing
from app.ml.teacher_formats.base import ModelInputs, ScoresChoice, TeacherBackend, TeacherInfo
from app.ml.teacher_formats.onnx import TRIAL_SLOTS
from app.ml.text import (
    ATTENTION_MASK,
    TOKEN_TYPE_IDS,
    TOKENIZER_FILE,
    TextTokenizer,
    TokenizedInputs,
    text_model_signature,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# config.json and tokenizer_config.json (whose added tokens can be many) are read whole.
MAX_JSON_BYTES = 16 << 20
# Far above the largest tokenizers published (a 256k-token vocabulary is about 35 MB).
MAX_TOKENIZER_BYTES = 128 << 20
# The longest records a teacher is given unless its upload declares a `preprocessing.max_length`.
DEFAULT_MAX_LENGTH = 512
# transformers writes a `model_max_length` of int(1e30) for "no limit".
NO_LIMIT = 1_000_000
MAX_LABELS = 100_000  # as a safetensors teacher's `num_classes`
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
HIDDEN_STATES = "hidden_states"
# What Distill adds to a teacher's `architecture` (its config): {"max_positions": int | None}.
DISTILL_KEY, MAX_POSITIONS = "distill", "max_positions"
_HIDDEN_STATE = re.compile(rf"{HIDDEN_STATES}\.(\d+)")
# Two records of different lengths, so that the trial also runs a padded one.
TRIAL_TEXTS = (
    "Distill checks this teacher.",
    "A second, longer text: the first one is padded to its length in the same batch.",
)
SAVE_HELP = (
    "Upload a zip or tar.gz of the directory written by `model.save_pretrained(dir)` and "
    "`tokenizer.save_pretrained(dir)` for a `*ForSequenceClassification` model."
)
CONVERT_HELP = (
    "Save the weights as safetensors: `AutoModelForSequenceClassification.from_pretrained(dir)"
    ".save_pretrained(dir)` with transformers 5 (which writes safetensors), or "
    "`.save_pretrained(dir, safe_serialization=True)` with transformers 4; then archive the "
    "directory again (without the .bin files)."
)
LAYOUT_HELP = (
    "A checkpoint saved in a layout older than its model class can be re-saved in the class's "
    "own: `AutoModelForSequenceClassification.from_pretrained(dir).save_pretrained(dir, "
    "save_original_format=False)`."
)


@dataclass(frozen=True)
class TokenizerSource:
    """The model's fast tokenizer, the id it pads with (the model's ``pad_token_id``, else the
    tokenizer's) and its ``model_max_length`` (None: not stated)."""

    tokenizer: Tokenizer
    pad_token_id: int | None
    model_max_length: int | None


@dataclass(frozen=True)
class ModelDirectory:
    """A ``save_pretrained`` directory, read and checked without running anything: its config,
    its safetensors files and their tensors' shapes and dtypes, its tokenizer."""

    raw_config: dict[str, Any]
    config: "PreTrainedConfig"
    weights: list[Path]
    tensors: dict[str, tuple[list[int], str]]
    tokenizer: TokenizerSource


class WeightsMismatch(Exception):
    """The weights' names or shapes are not the model's (each list sorted)."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__("the weights do not fit the model")
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from the archive.

    Raises:
        InvalidModel: too large, not JSON, or not an object.
    """
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InvalidModel(f"`{what}` is larger than {MAX_JSON_BYTES:,} bytes.", field="file")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # RecursionError: deep nesting
        raise InvalidModel(f"`{what}` is not valid JSON.", field="file") from e
    if not isinstance(value, dict):
        raise InvalidModel(f"`{what}` must hold a JSON object.", field="file")
    return value


def _refuse_remote_code(raw: dict[str, Any], what: str) -> None:
    if "auto_map" in raw:
        raise InvalidModel(
            f"`{what}` names custom code (`auto_map`): Distill runs only the model classes "
            "transformers ships, never code from an upload. Save the model with a class of "
            "transformers itself.",
            code="remote_code",
            field="file",
        )


def model_config(raw: dict[str, Any]) -> "PreTrainedConfig":
    """The config class transformers ships for ``raw["model_type"]``, built from ``raw``."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def _read_config(directory: Path, filename: str) -> tuple[dict[str, Any], "PreTrainedConfig"]:
    """``config.json``, checked: a model type transformers ships, no remote code, a sequence
    classifier of at least two labels.

    Raises:
        UnsupportedFormat: no ``config.json`` (415: an archive of something else).
        InvalidModel: 422 with code ``remote_code``, ``unknown_model_type``,
            ``not_a_sequence_classifier``, or ``invalid_model``.
    """
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as CLASSIFIERS,
    )

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UnsupportedFormat(
            f"`{filename}` is an archive, but not of a Hugging Face model: it has no "
            f"`{CONFIG_FILE}` at its top (or in its one top folder). {SAVE_HELP}"
        )
    raw = _read_json(path, CONFIG_FILE)
    _refuse_remote_code(raw, CONFIG_FILE)
    if isinstance(raw.get("num_labels"), int) and raw["num_labels"] > MAX_LABELS:
        # (before the config is built: it would name every label)
        raise InvalidModel(
            f"`{CONFIG_FILE}` has {raw['num_labels']} labels; at most {MAX_LABELS} are taken.",
            field="file",
        )
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InvalidModel(
            f"`{CONFIG_FILE}` has `model_type` {model_type!r}, which is not a model type "
            "transformers ships (such as `bert`, `roberta`, `distilbert`, `deberta-v2`).",
            code="unknown_model_type",
            field="file",
        )
    architectures = raw.get("architectures")
    expected = CLASSIFIERS.get(model_type)
    if expected is None or architectures not in (None, [expected]):
        raise InvalidModel(
            "Only sequence classifiers (`*ForSequenceClassification`) are supported; "
            f"`{CONFIG_FILE}` has `model_type` {model_type!r} and `architectures` "
            f"{architectures!r}"
            + ("." if expected is None else f" (a {model_type} classifier is {expected})."),
            code="not_a_sequence_classifier",
            field="file",
        )
    try:
        config = model_config(raw)
    except Exception as e:  # the config classes validate their fields, each its own way
        raise InvalidModel(
            f"`{CONFIG_FILE}` is not a valid {model_type} config: {str(e)[:300]}", field="file"
        ) from e
    labels = num_labels(config)
    if labels < 2 or config.problem_type in ("regression", "multi_label_classification"):
        raise InvalidModel(
            "Distill distils classifiers that choose one of two or more labels; this model has "
            f"{labels} label(s) and problem type {config.problem_type!r}.",
            code="not_a_sequence_classifier",
            field="file",
        )
    return raw, config


def num_labels(config: "PreTrainedConfig") -> int:
    return int(config.num_labels or 0)


def _weight_files(directory: Path) -> tuple[list[Path], set[str] | None]:
    """The safetensors files: ``model.safetensors``, or the shards its index names (then also
    the tensors the index maps).

    Raises:
        PickleRefused: no safetensors but pickled weights (415, with how to convert them).
        InvalidModel: no weights, or an index naming files the archive lacks.
    """
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, WEIGHTS_INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidModel(f"`{WEIGHTS_INDEX_FILE}` has no `weight_map`.", field="file")
        names = sorted({str(name) for name in weight_map.values()})
        missing = [
            n for n in names if "/" in n or n in ("", ".", "..") or not (directory / n).is_file()
        ]
        if missing:
            raise InvalidModel(
                f"`{WEIGHTS_INDEX_FILE}` names shards the archive does not hold beside it: "
                f"{missing[:5]}.",
                field="file",
            )
        return [directory / n for n in names], {str(tensor) for tensor in weight_map}
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE], None
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PickleRefused(
            f"The model's weights are pickled ({', '.join(pickles[:3])}), which Distill never "
            f"loads. {CONVERT_HELP}"
        )
    raise InvalidModel(
        f"The archive has no `{WEIGHTS_FILE}` (nor `{WEIGHTS_INDEX_FILE}` and its shards). "
        f"{SAVE_HELP}",
        field="file",
    )


def _tensors(weights: list[Path]) -> dict[str, tuple[list[int], str]]:
    """Each tensor's shape and safetensors dtype, from the files' headers only.

    Raises:
        InvalidModel: a file that is not safetensors, or a tensor in two shards.
    """
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, tuple[list[int], str]] = {}
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open is not a dict)
                    if name in tensors:
                        raise InvalidModel(f"The tensor {name!r} is in two shards.", field="file")
                    tensor = f.get_slice(name)
                    tensors[name] = (list(tensor.get_shape()), str(tensor.get_dtype()))
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidModel(
                f"`{file.name}` is not a valid safetensors file.", field="file"
            ) from e
    return tensors


def _check_index(mapped: set[str] | None, tensors: dict[str, tuple[list[int], str]]) -> None:
    """A shard index must name exactly the tensors its shards hold."""
    if mapped is not None and mapped != set(tensors):
        differing = sorted(mapped ^ set(tensors))
        raise InvalidModel(
            f"`{WEIGHTS_INDEX_FILE}` and its shards disagree on the tensors (first differences: "
            f"{differing[:5]}).",
            field="file",
        )


def _pad_token(tokenizer: Tokenizer, tokenizer_config: dict[str, Any]) -> int | None:
    """The tokenizer's padding id: its config's pad token's, else the one it pads with."""
    token = tokenizer_config.get("pad_token")
    if isinstance(token, dict):  # an AddedToken, serialised
        token = token.get("content")
    pad_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if pad_id is None and tokenizer.padding is not None:
        pad_id = tokenizer.padding.get("pad_id")
    return pad_id if isinstance(pad_id, int) else None


def _max_length(value: object) -> int | None:
    return value if isinstance(value, int) and 0 < value < NO_LIMIT else None


def convert_tokenizer(directory: str) -> tuple[str, int | None, int | None]:
    """Build the fast tokenizer from a directory's tokenizer files (transformers' own classes and
    converters; no remote code), as ``tokenizer.json`` text, its pad id and ``model_max_length``.
    The ``fn`` of a ``run_isolated`` at inspection."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError("not a fast tokenizer")
    pad_id = tokenizer.pad_token_id
    return (
        backend.to_str(),
        pad_id if isinstance(pad_id, int) else None,
        _max_length(tokenizer.model_max_length),
    )


Convert = Callable[[Path], tuple[str, int | None, int | None]]


def _parse_tokenizer(text: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise InvalidModel(
            f"`{TOKENIZER_FILE}` cannot be read as a tokenizer.", field="file"
        ) from e


def tokenizer_source(directory: Path, model_pad: int | None, convert: Convert) -> TokenizerSource:
    """``tokenizer.json`` as it is, else the fast tokenizer ``convert`` builds from the other
    tokenizer files; padding with ``model_pad`` (the config's ``pad_token_id``) if given.

    Raises:
        InvalidModel: remote code in ``tokenizer_config.json``, or no readable tokenizer (code
            ``no_tokenizer``).
    """
    config_path = directory / TOKENIZER_CONFIG_FILE
    tokenizer_config = (
        _read_json(config_path, TOKENIZER_CONFIG_FILE) if config_path.is_file() else {}
    )
    _refuse_remote_code(tokenizer_config, TOKENIZER_CONFIG_FILE)
    path = directory / TOKENIZER_FILE
    if path.is_file():
        if path.stat().st_size > MAX_TOKENIZER_BYTES:  # it is parsed in this process
            raise InvalidModel(
                f"`{TOKENIZER_FILE}` is larger than {MAX_TOKENIZER_BYTES:,} bytes.", field="file"
            )
        tokenizer = _parse_tokenizer(path.read_text(encoding="utf-8", errors="replace"))
        return TokenizerSource(
            tokenizer,
            model_pad if model_pad is not None else _pad_token(tokenizer, tokenizer_config),
            _max_length(tokenizer_config.get("model_max_length")),
        )
    if not config_path.is_file() and not any(
        (directory / name).is_file() for name in ("vocab.txt", "vocab.json", "spiece.model")
    ):
        raise InvalidModel(
            f"The archive has no tokenizer (`{TOKENIZER_FILE}`, or the files one is built from). "
            f"{SAVE_HELP}",
            code="no_tokenizer",
            field="file",
        )
    text, pad_id, max_length = convert(directory)
    return TokenizerSource(
        _parse_tokenizer(text), model_pad if model_pad is not None else pad_id, max_length
    )


def read_directory(directory: Path, filename: str, convert: Convert) -> ModelDirectory:
    """Read and check a ``save_pretrained`` directory (nothing in it runs; ``convert`` builds a
    tokenizer that comes without ``tokenizer.json``).

    Raises:
        UnsupportedFormat, PickleRefused: 415 (not a Hugging Face model; pickled weights).
        InvalidModel: 422, what is wrong with it.
    """
    raw, config = _read_config(directory, filename)
    weights, mapped = _weight_files(directory)
    tensors = _tensors(weights)
    _check_index(mapped, tensors)
    model_pad = config.pad_token_id if isinstance(config.pad_token_id, int) else None
    tokenizer = tokenizer_source(directory, model_pad, convert)
    return ModelDirectory(raw, config, weights, tensors, tokenizer)


def load_model(config: "PreTrainedConfig", weights: list[Path]) -> tuple[nn.Module, list[str]]:
    """The sequence classifier transformers builds for ``config``, in float32, with the
    safetensors tensors of ``weights`` loaded strictly, in eval mode without gradients; and the
    stored tensors it ignored (buffers the class no longer saves, such as ``position_ids``).

    A weight tied to another (``all_tied_weights_keys``) may be absent: ``save_pretrained``
    writes only one of the two.

    Raises:
        WeightsMismatch: missing, unexpected or differently shaped tensors.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    # float32 whatever the config's `dtype`: a teacher's outputs are float32.
    model: nn.Module = AutoModelForSequenceClassification.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.float32
    )
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in weights:
        state.update(load_file(str(file)))
    buffers = {name for name, _ in model.named_buffers()} - set(expected)
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    ignored = sorted(
        name
        for name in state
        if name not in expected and (name in buffers or any(re.search(p, name) for p in patterns))
    )
    for name in ignored:
        del state[name]
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{name}: {list(state[name].shape)} for {list(expected[name].shape)}"
        for name in set(state) & set(expected)
        if state[name].shape != expected[name].shape
    )
    if missing or unexpected or mismatched:
        raise WeightsMismatch(missing, unexpected, mismatched)
    model.load_state_dict(state, strict=False)  # strict but for the tied weights, checked above
    return model.eval().requires_grad_(False), ignored


def _mismatch_error(
    missing: list[str], unexpected: list[str], mismatched: list[str]
) -> InvalidModel:
    parts = [
        f"{what} {names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of other shapes", mismatched),
        )
        if names
    ]
    return InvalidModel(
        f"The weights do not fit the model `{CONFIG_FILE}` describes: {'; '.join(parts)}. "
        f"{LAYOUT_HELP}",
        code="weights_mismatch",
        field="file",
    )


def max_positions(model: nn.Module, config: "PreTrainedConfig") -> int | None:
    """The most tokens one record may have: the learned position embeddings' count, less the
    ids below the first position where positions start after the padding id (RoBERTa and its
    kin: ``padding_idx + 1``); else ``max_position_embeddings``; None: no stated limit."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            offset = 0 if module.padding_idx is None else module.padding_idx + 1
            return module.num_embeddings - offset
    return _max_length(getattr(config, "max_position_embeddings", None))


def trial(
    raw_config: dict[str, Any], weights: list[str], feed: dict[str, list[list[int]]], longest: int
) -> dict[str, Any]:
    """Load the model, run it on one tokenised batch (``feed``), then on one record of
    ``longest`` tokens or of its position limit if fewer. Returns the logits' shape, whether
    they are finite, each hidden state's width, the weights that are not finite, the stored
    tensors ignored, the position limit (``max_positions``) and the length that ran
    (``max_length``); or, for weights that do not fit, ``{"mismatch": [missing, unexpected,
    mismatched]}``. The ``fn`` of a ``run_isolated``: plain data only."""
    torch.set_num_threads(1)  # as the ONNX trial: one thread, and no per-thread memory arenas
    config = model_config(raw_config)
    try:
        model, ignored = load_model(config, [Path(w) for w in weights])
    except WeightsMismatch as e:
        return {"mismatch": [e.missing, e.unexpected, e.mismatched]}
    non_finite = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    limit = max_positions(model, config)
    length = longest if limit is None else min(longest, limit)
    # The first record stretched to `length` tokens by repeating its second token: as long a
    # record as the teacher will be given, its special first and last tokens kept (BART, say,
    # classifies at its end-of-sequence token).
    real = sum(feed[ATTENTION_MASK][0])
    full = {
        k: [v[0][:1] + v[0][1:2] * (length - 2) + v[0][real - 1 : real]] for k, v in feed.items()
    }
    with torch.inference_mode():
        outputs = model(**{k: torch.tensor(v) for k, v in feed.items()}, output_hidden_states=True)
        model(**{k: torch.tensor(v) for k, v in full.items()})
    hidden = getattr(outputs, "hidden_states", None) or ()  # (encoder-decoders have none)
    return {
        "logits": list(outputs.logits.shape),
        "finite": bool(torch.isfinite(outputs.logits).all()),
        "hidden": [int(h.shape[-1]) for h in hidden],
        "non_finite": non_finite[:5],
        "ignored": ignored,
        "max_positions": limit,
        "max_length": length,
    }


def _isolated(fn: Callable[..., Any], *args: Any, what: str, memory_bytes: int) -> Any:
    """``fn(*args)`` under the trial's limits (``run_isolated``), its failures as 422s.

    Raises:
        InvalidModel: it timed out, ran out of memory or failed.
    """
    timeout_s = get_settings().teacher_trial_timeout_s
    try:
        with TRIAL_SLOTS:
            return run_isolated(fn, *args, timeout_s=timeout_s, memory_bytes=memory_bytes)
    except TrialTimeout as e:
        raise InvalidModel(f"{what} did not finish within {timeout_s:g} s.", field="file") from e
    except TrialOutOfMemory as e:
        raise InvalidModel(
            f"{what} needed more than {memory_bytes / (1 << 30):.3g} GiB of memory.", field="file"
        ) from e
    except TrialFailed as e:
        raise InvalidModel(f"{what} failed ({e.error_type}).", field="file") from e


def _convert_isolated(directory: Path) -> tuple[str, int | None, int | None]:
    result: tuple[str, int | None, int | None] = tuple(
        _isolated(
            convert_tokenizer,
            str(directory),
            what="Building the fast tokenizer from the archive's tokenizer files",
            memory_bytes=get_settings().teacher_trial_memory_bytes,
        )
    )
    return result


def takes_token_types(config: "PreTrainedConfig") -> bool:
    """Is the model fed ``token_type_ids``? When its ``forward`` takes them and it has more than
    one segment (``type_vocab_size`` > 1, as BERT); a model of one segment (RoBERTa) reads zeros,
    which it makes itself."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    model_class = cast(type[nn.Module], MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)])
    segments = getattr(config, "type_vocab_size", 0)
    return (
        TOKEN_TYPE_IDS in pyinspect.signature(model_class.forward).parameters
        and isinstance(segments, int)
        and segments > 1
    )


def _classes(config: "PreTrainedConfig") -> list[str] | None:
    """Class names from ``id2label``; None when they are transformers' defaults (``LABEL_0``...)
    or do not name each label once."""
    id2label: dict[Any, Any] = dict(config.id2label or {})
    names = [id2label.get(i) for i in range(num_labels(config))]
    if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return [str(n) for n in names]


def text_tokenizer(config: "PreTrainedConfig | None", source: TokenizerSource) -> TextTokenizer:
    """The teacher's tokenizer, padding as the model does, truncating at ``DEFAULT_MAX_LENGTH``
    tokens or its ``model_max_length`` if fewer (the trial lowers it to the model's positions).

    Raises:
        InvalidModel: (code ``tokenizer_mismatch``) ids the model's embeddings (``vocab_size``
            in ``config``, when there is one) do not have.
    """
    tokenizer, pad_id = source.tokenizer, source.pad_token_id
    vocab_size = getattr(config, "vocab_size", None)
    top = max([*tokenizer.get_vocab(with_added_tokens=True).values(), pad_id or 0])
    if isinstance(vocab_size, int) and top >= vocab_size:
        raise InvalidModel(
            f"The tokenizer gives ids up to {top}, but the model's embeddings hold {vocab_size} "
            f"(`vocab_size` in `{CONFIG_FILE}`): the tokenizer is not this model's.",
            code="tokenizer_mismatch",
            field="file",
        )
    max_length = min(DEFAULT_MAX_LENGTH, source.model_max_length or DEFAULT_MAX_LENGTH)
    return TextTokenizer(tokenizer, max_length, pad_id or 0)


def _architecture(config: "PreTrainedConfig") -> dict[str, Any]:
    """The whole config (defaults included) as JSON a database stores.

    Raises:
        InvalidModel: values JSON cannot hold (NaN) or text no database can (NUL).
    """
    try:
        architecture: dict[str, Any] = json.loads(config.to_json_string(use_diff=False))
        json.dumps(architecture, allow_nan=False)
    except ValueError as e:
        raise InvalidModel(
            f"`{CONFIG_FILE}` holds values that are not finite.", field="file"
        ) from e
    unstorable = find_unstorable(architecture, "")
    if unstorable is not None:
        raise InvalidModel(
            f"`{CONFIG_FILE}` holds a character no database can store ({unstorable[1]} at "
            f"`{unstorable[0]}`).",
            field="file",
        )
    return architecture


def _inspect(model: ModelDirectory, name: str) -> TeacherInfo:
    """Check the model against its tokenizer, then load and run it in the trial process.

    Raises:
        InvalidModel: 422, the first thing that does not fit.
    """
    config = model.config
    architecture = _architecture(config)
    tokenizer = text_tokenizer(config, model.tokenizer)
    records, _ = tokenizer.encode(list(TRIAL_TEXTS))
    feed = records.feed([t.name for t in text_model_signature_for(config, tokenizer).inputs])
    weight_bytes = sum(w.stat().st_size for w in model.weights)
    # The model (float32: twice float16 weights), the tensors read, and the forward pass.
    memory_bytes = get_settings().teacher_trial_memory_bytes + 3 * weight_bytes
    result = _isolated(
        trial,
        model.raw_config,
        [str(w) for w in model.weights],
        {k: v.tolist() for k, v in feed.items()},
        tokenizer.max_length,
        what="Loading the model and running it on two texts",
        memory_bytes=memory_bytes,
    )
    if "mismatch" in result:
        raise _mismatch_error(*result["mismatch"])
    if result["non_finite"]:
        raise InvalidModel(
            f"The weights contain NaN or infinite values (in {result['non_finite']}).",
            field="file",
        )
    expected = [len(TRIAL_TEXTS), num_labels(config)]
    if result["logits"] != expected or not result["finite"]:
        raise InvalidModel(
            f"On two texts the model returned logits shaped {result['logits']}"
            + ("" if result["finite"] else ", not all finite")
            + f"; expected {expected} finite scores.",
            field="file",
        )
    if result["max_length"] < 2:
        raise InvalidModel(
            f"The model takes records of {result['max_length']} token(s).", field="file"
        )
    tokenizer = TextTokenizer(tokenizer.tokenizer, result["max_length"], tokenizer.pad_token_id)
    ignored = set(result["ignored"])
    parameters = sum(
        math.prod(shape)
        for tensor, (shape, dtype) in model.tensors.items()
        if dtype in FLOAT_DTYPES and tensor not in ignored
    )
    return TeacherInfo(
        format=name,
        signature=text_model_signature_for(config, tokenizer),
        parameter_count=parameters,
        scores_choice=ScoresChoice(output=LOGITS_NAME, by="only"),
        architecture={**architecture, DISTILL_KEY: {MAX_POSITIONS: result["max_positions"]}},
        feature_layers=[
            FeatureLayer(name=f"{HIDDEN_STATES}.{i}", shape=[width])
            for i, width in enumerate(result["hidden"])
        ],
    )


def text_model_signature_for(
    config: "PreTrainedConfig", tokenizer: TextTokenizer
) -> ModelSignature:
    """The signature of the sequence classifier ``config`` describes, fed by ``tokenizer``."""
    return text_model_signature(
        num_labels(config),
        preprocessing=TextPreprocessing(
            tokenizer=TOKENIZER_FILE,
            max_length=tokenizer.max_length,
            pad_token_id=tokenizer.pad_token_id,
        ),
        token_type_ids=takes_token_types(config),
        classes=_classes(config),
    )


def position_limit(architecture: dict[str, Any] | None) -> int | None:
    """The most tokens a record may have, as inspection found (None: not known, or no limit)."""
    found = (architecture or {}).get(DISTILL_KEY)
    limit = found.get(MAX_POSITIONS) if isinstance(found, dict) else None
    return limit if isinstance(limit, int) else None


def hidden_state_index(name: str) -> int:
    """``hidden_states.{i}`` -> ``i``.

    Raises:
        ValueError: another name.
    """
    match = _HIDDEN_STATE.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a layer of this teacher (`{HIDDEN_STATES}.<i>`)")
    return int(match.group(1))


class _Logits(nn.Module):
    """The model as ONNX exports it: the signature's inputs, in its order, to the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        types = {} if token_type_ids is None else {TOKEN_TYPE_IDS: token_type_ids}
        logits: torch.Tensor = self.model(
            input_ids=input_ids, attention_mask=attention_mask, **types
        ).logits
        return logits


class HuggingFaceTeacher(TeacherBackend):
    """A sequence classifier run by torch on tokenised records, frozen."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        signature: ModelSignature,
        device: torch.device,
    ) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.signature, self.device, self._tokenizer = signature, device, tokenizer
        self.input_names = [t.name for t in signature.inputs]

    @property
    def tokenizer(self) -> TextTokenizer:
        """The teacher's own tokenizer, set to its records' length and padding."""
        return self._tokenizer

    def run(self, batch: ModelInputs, names: list[str] | None) -> list[np.ndarray]:
        """The logits ``[batch, classes]``, or the hidden states at ``names``
        (``hidden_states.{i}``), each ``[batch, sequence, hidden]``; float32.

        Raises:
            TypeError: ``batch`` is not tokenised records.
            ValueError: a name that is no hidden state.
        """
        if not isinstance(batch, TokenizedInputs):
            raise TypeError("a text teacher runs on tokenised records (TokenizedInputs)")
        layers = [hidden_state_index(n) for n in names or []]
        feed = {
            name: torch.from_numpy(array).to(self.device)
            for name, array in batch.feed(self.input_names).items()
        }
        with torch.inference_mode():
            outputs = self.model(**feed, output_hidden_states=names is not None)
        if names is None:
            return [outputs.logits.float().cpu().numpy()]
        return [outputs.hidden_states[i].float().cpu().numpy() for i in layers]

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` (keys as transformers names them: ``bert.embeddings...``)."""
        return dict(self.model.state_dict())

    def latency_ms(self, batch: int = 1) -> float:
        latency = torch_latency_ms(_Logits(self.model), self.signature, batch)
        self.model.to(self.device)  # the export moved it to the CPU
        return latency


class HuggingFaceFormat:
    name = "huggingface"

    def sniff(self, head: bytes, size: int) -> bool:
        return archive_kind(head) is not None

    def inspect(self, path: Path, filename: str, config: str | None) -> TeacherInfo:
        if config is not None:
            raise InvalidModel(
                "`config` goes with a safetensors file; a Hugging Face model's is its "
                f"`{CONFIG_FILE}`.",
                field="config",
            )
        # (imported here: that module builds on this one)
        from app.ml.teacher_formats.onnx_text import graph_file, inspect_onnx_folder

        with tempfile.TemporaryDirectory(prefix="distill-hf-") as tmp:
            directory = extract_archive(path, Path(tmp))
            graph = graph_file(directory)
            if graph is not None:  # an ONNX export (Optimum's layout)
                return inspect_onnx_folder(directory, graph, self.name)
            return _inspect(read_directory(directory, filename, _convert_isolated), self.name)

    def open(
        self,
        path: Path,
        signature: ModelSignature,
        architecture: dict[str, Any] | None,
        device: torch.device,
    ) -> TeacherBackend:
        from app.ml.teacher_formats.onnx_text import graph_file, open_onnx_folder

        preprocessing = signature.preprocessing
        if not isinstance(preprocessing, TextPreprocessing):
            raise InvalidModel("A Hugging Face teacher's signature must take text.")
        with tempfile.TemporaryDirectory(prefix="distill-hf-") as tmp:
            directory = extract_archive(path, Path(tmp))
            graph = graph_file(directory)
            if graph is not None:
                return open_onnx_folder(path, directory, graph, signature, preprocessing, device)
            # The archive passed inspection: its tokenizer is converted here, in this process.
            model_dir = read_directory(directory, path.name, convert=_convert_in_process)
            try:
                model, _ = load_model(model_dir.config, model_dir.weights)
            except WeightsMismatch as e:
                raise _mismatch_error(e.missing, e.unexpected, e.mismatched) from e
        tokenizer = TextTokenizer(
            model_dir.tokenizer.tokenizer, preprocessing.max_length, preprocessing.pad_token_id
        )
        return HuggingFaceTeacher(model, tokenizer, signature, device)


def _convert_in_process(directory: Path) -> tuple[str, int | None, int | None]:
    return convert_tokenizer(str(directory))


HUGGINGFACE = HuggingFaceFormat()
