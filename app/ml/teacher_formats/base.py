"""The protocol every teacher format implements, and what inspecting an upload yields."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidModel
from app.ml.layers import FeatureLayer
from app.ml.signature import (
    AnyPreprocessing,
    ImagePreprocessing,
    ModelSignature,
    OutputKind,
    OutputSpec,
)
from app.ml.text import TextTokenizer, TokenizedInputs

# What a teacher runs on: a float array ``[N, *input_shape]``, or tokenised text records.
ModelInputs = np.ndarray | TokenizedInputs

OnBatch = Callable[[], None] | None
# Teacher passes run in batches of this many samples. On CPU, a convolutional teacher runs 4x
# faster per sample at 128 than at 1024 (measured on the example teacher: its activations stay in
# cache), and onnxruntime is no slower.
BATCH_SIZE = 128


# Outputs named like class scores are chosen as them (sklearn-onnx names its `output_probability`).
SCORES_NAMES = (
    "logits",
    "probabilities",
    "output_probability",
    "probs",
    "log_probabilities",
    "log_probs",
)


class ScoresChoice(BaseModel):
    """Which of a model's outputs are its class scores, and how their kind is known.

    ``by``: ``declared`` (the upload's `output` field), ``name`` (named like scores), ``only``
    (the one candidate), ``classes`` (the one whose width is the count of the declared class
    names, or of the dataset's classes, chosen by a preflight), ``position`` (the first of
    several; a preflight may choose again).
    ``kind_by``: ``declared`` (the upload's `output_kind`), ``assumed`` (logits, not yet seen),
    ``detected`` (from the scores a preflight saw).
    """

    model_config = ConfigDict(frozen=True)
    output: str
    by: Literal["declared", "name", "only", "classes", "position"]
    kind_by: Literal["declared", "assumed", "detected"] = "assumed"


class TeacherDeclarations(BaseModel):
    """What the uploader says of a teacher that the file cannot say (the upload's form fields)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    output: str | None = Field(default=None, description="The output holding the class scores.")
    output_kind: OutputKind | None = Field(
        default=None, description="`logits`, `probabilities` or `log_probabilities`."
    )
    classes: list[str] | None = Field(default=None, description="Class names, by score index.")
    preprocessing: AnyPreprocessing | None = Field(
        default=None,
        description="How the teacher's inputs are made from the dataset's records, e.g. "
        '`{"kind": "image", "scale": 0.00392156862745098}` for a teacher trained on pixels / 255.',
    )


@dataclass(frozen=True)
class TeacherInfo:
    """What inspection learns of an upload without running its code in the API's process.

    ``signature.outputs`` lists every output that can be class scores (``[batch, N]`` floats),
    the chosen ones first (``scores_choice``). ``architecture`` is what ``open`` needs besides
    the file (a safetensors teacher's config).
    """

    format: str
    signature: ModelSignature
    parameter_count: int
    scores_choice: ScoresChoice
    architecture: dict[str, Any] | None = None
    feature_layers: list[FeatureLayer] = field(default_factory=list)


def with_scores(
    signature: ModelSignature, layers: list[FeatureLayer], output: str
) -> tuple[ModelSignature, list[FeatureLayer]]:
    """``signature`` with the output named ``output`` as its scores (first, of the kind the
    scores had), and ``layers`` without it; scores given up become a feature layer (an ONNX
    teacher's layers are its outputs)."""
    previous = signature.scores
    # What was declared of the scores (their kind) goes with them to the output now chosen.
    chosen = next(o for o in signature.outputs if o.name == output).model_copy(
        update={"kind": previous.kind}
    )
    reordered = signature.model_copy(
        update={"outputs": [chosen, *(o for o in signature.outputs if o.name != output)]}
    )
    if previous.name != output and all(layer.name != previous.name for layer in layers):
        layers = [*layers, FeatureLayer(name=previous.name, shape=[int(previous.shape[-1])])]
    return reordered, [layer for layer in layers if layer.name != output]


def _check_channels(preprocessing: ImagePreprocessing, signature: ModelSignature) -> None:
    """Per-channel ``mean``/``std`` must have one value, or one per channel (``shape[0]`` of an
    input ``[C, H, W]``)."""
    shape = signature.inputs[0].shape
    channels = shape[0] if len(shape) >= 2 else 1
    for name in ("mean", "std"):
        values = getattr(preprocessing, name)
        if values is not None and len(values) not in (1, channels):
            raise InvalidModel(
                f"`preprocessing.{name}` has {len(values)} values, but the teacher's input "
                f"{shape} has {channels} channel(s): give one value, or one per channel.",
                field="preprocessing",
            )


def apply_declarations(info: TeacherInfo, declared: TeacherDeclarations) -> TeacherInfo:
    """Choose the scores among the candidate outputs (declared, else by name, else the only one,
    else the first) and record what the uploader declared.

    Raises:
        InvalidModel: a declared output the model lacks, or class names of the wrong count.
    """
    names = [o.name for o in info.signature.outputs]
    if declared.output is not None:
        if declared.output not in names:
            raise InvalidModel(
                f"`output` {declared.output!r} is not among the outputs that can be class "
                f"scores ([batch, classes] floats): {names}.",
                field="output",
            )
        choice = ScoresChoice(output=declared.output, by="declared")
    else:
        named = [n for n in names if n.lower() in SCORES_NAMES]
        # Declared class names say how wide the scores are.
        fitting = [
            o.name
            for o in info.signature.outputs
            if declared.classes is not None and o.shape[-1] == len(declared.classes)
        ]
        if named:
            choice = ScoresChoice(output=named[0], by="name")
        elif len(names) == 1:
            choice = ScoresChoice(output=names[0], by="only")
        elif len(fitting) == 1:
            choice = ScoresChoice(output=fitting[0], by="classes")
        else:
            choice = ScoresChoice(output=names[0], by="position")
    signature, layers = with_scores(info.signature, info.feature_layers, choice.output)
    scores: OutputSpec = signature.scores
    updates: dict[str, Any] = {}
    if declared.output_kind is not None:
        updates["kind"] = declared.output_kind
        choice = choice.model_copy(update={"kind_by": "declared"})
    if isinstance(declared.preprocessing, ImagePreprocessing):
        _check_channels(declared.preprocessing, info.signature)
    if declared.classes is not None:
        if len(declared.classes) != scores.shape[-1] or len(set(declared.classes)) != len(
            declared.classes
        ):
            raise InvalidModel(
                f"`classes` must name each of the {scores.shape[-1]} scores of `{scores.name}` "
                f"once; got {len(declared.classes)} names ({len(set(declared.classes))} distinct).",
                field="classes",
            )
        updates["classes"] = declared.classes
    outputs = [scores.model_copy(update=updates), *signature.outputs[1:]]
    signature = ModelSignature.model_validate(
        {
            **signature.model_dump(),
            "outputs": [o.model_dump() for o in outputs],
            **(
                {}
                if declared.preprocessing is None
                else {"preprocessing": declared.preprocessing.model_dump()}
            ),
        }
    )
    return replace(info, signature=signature, feature_layers=layers, scores_choice=choice)


class TeacherBackend(ABC):
    """A loaded teacher, frozen (eval mode, no gradients), run in batches on float32 numpy
    inputs ``[N, *input_shape]`` or on tokenised text (``TokenizedInputs``: batches of records
    of similar length, each padded only to its longest). A format implements ``run`` (one batch)
    and ``latency_ms``; ``on_batch`` runs before every batch (the worker's heartbeat on long
    passes)."""

    signature: ModelSignature
    # Where the exported graph fixes its batch size (users exporting with one example): every
    # run then gets exactly this many samples, the last batch padded.
    fixed_batch: int | None = None

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """How a text teacher's records are tokenised (None: the teacher takes arrays)."""
        return None

    @abstractmethod
    def run(self, batch: ModelInputs, names: list[str] | None) -> list[np.ndarray]:
        """One batch's class scores (``names`` None: a one-element list), or its outputs at
        ``names`` (``feature_layers`` names)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The teacher's parameters by name (a text student starts from them).

        Raises:
            NotImplementedError: a format whose weights a student cannot take.
        """
        raise NotImplementedError(f"{type(self).__name__} does not give its weights")

    @abstractmethod
    def latency_ms(self, batch: int = 1) -> float:
        """Median latency of ``batch`` samples on onnxruntime, one CPU thread (as students are
        timed: ``app.ml.onnx_io.onnx_latency_ms``)."""

    def scores(
        self, x: ModelInputs, batch_size: int = BATCH_SIZE, on_batch: OnBatch = None
    ) -> np.ndarray:
        """The class scores ``[N, classes]`` as the teacher returns them, as float32."""
        return self._batched(x, None, batch_size, on_batch)[0]

    def logits(
        self, x: ModelInputs, batch_size: int = BATCH_SIZE, on_batch: OnBatch = None
    ) -> np.ndarray:
        """Logits ``[N, classes]`` float32, whatever kind of scores the teacher returns."""
        return as_logits(self.scores(x, batch_size, on_batch), self.signature.scores.kind)

    def features(
        self,
        x: ModelInputs,
        names: list[str],
        batch_size: int = BATCH_SIZE,
        on_batch: OnBatch = None,
    ) -> list[np.ndarray]:
        """The outputs at ``names`` for every sample, float32."""
        return self._batched(x, names, batch_size, on_batch)

    def _batched(
        self, x: ModelInputs, names: list[str] | None, batch_size: int, on_batch: OnBatch
    ) -> list[np.ndarray]:
        """``run`` over ``x`` in batches, its outputs written into float32 arrays allocated once
        (a feature method's can be the job's largest)."""
        if isinstance(x, TokenizedInputs):
            return self._batched_text(x, names, batch_size, on_batch)
        arrays: list[np.ndarray] = []
        batch_size = self.fixed_batch or batch_size
        for start in range(0, len(x), batch_size):
            if on_batch is not None:
                on_batch()
            batch = np.ascontiguousarray(x[start : start + batch_size])
            if self.fixed_batch is not None and len(batch) < batch_size:
                padding = np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, padding])
            outputs = self.run(batch, names)
            outputs = [o[: len(x) - start] for o in outputs]
            if not arrays:
                arrays = [np.empty((len(x), *o.shape[1:]), np.float32) for o in outputs]
            for array, output in zip(arrays, outputs, strict=True):
                array[start : start + len(output)] = output
        return arrays

    def _batched_text(
        self, x: TokenizedInputs, names: list[str] | None, batch_size: int, on_batch: OnBatch
    ) -> list[np.ndarray]:
        """``run`` over records sorted by length, so each batch is padded only to its own
        longest record (most of a teacher pass's time is spent on padding otherwise); outputs
        go back to the records' order. Per-token outputs ``[batch, tokens, ...]`` are padded
        with zeros to the longest record of ``x``."""
        order = np.argsort(x.lengths, kind="stable")
        arrays: list[np.ndarray] = []
        for start in range(0, len(x), batch_size):
            if on_batch is not None:
                on_batch()
            rows = order[start : start + batch_size]
            outputs = self.run(x[rows], names)
            if not arrays:
                # Per record: the scores, or per-token outputs padded to the longest record.
                shapes = [
                    o.shape[1:] if o.ndim == 2 else (x.input_ids.shape[1], *o.shape[2:])
                    for o in outputs
                ]
                arrays = [np.zeros((len(x), *shape), np.float32) for shape in shapes]
            for array, output in zip(arrays, outputs, strict=True):
                if output.ndim == 2:
                    array[rows] = output
                else:
                    array[rows, : output.shape[1]] = output
        return arrays


class TeacherFormat(Protocol):
    """One teacher file format: recognise it, inspect it into a signature, open it."""

    name: str

    def sniff(self, head: bytes, size: int) -> bool:
        """Does a file starting with ``head`` (its first ``SNIFF_BYTES``: 262, since a tar
        names itself at byte 257) of ``size`` bytes look like this format?"""
        ...

    def inspect(self, path: Path, filename: str, config: str | None) -> TeacherInfo:
        """Check the upload and describe it, never running code from it.

        Raises:
            InvalidModel: the file or its ``config`` cannot be used (422).
        """
        ...

    def open(
        self,
        path: Path,
        signature: ModelSignature,
        architecture: dict[str, Any] | None,
        device: torch.device,
    ) -> TeacherBackend:
        """Load the stored teacher frozen, on ``device`` where the runtime can use it."""
        ...


def as_logits(scores: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Class scores ``[N, classes]`` as finite logits, which every loss and metric takes.

    Probabilities become their log, whose softmax gives them back exactly; log-probabilities
    already are logits (a softmax ignores a per-row constant). A score of probability zero
    (``0``, or ``-inf`` in log space) becomes the row's maximum plus ``log(tiny)`` (about -87.3,
    the log of float32's smallest normal number), to which a softmax gives at most 1.2e-38:
    losses and metrics never meet ``-inf``, and a method that compares logits directly meets no
    value further out than a confident teacher's.
    NaN and ``+inf`` stay as they are (the preflight refuses them).
    """
    with np.errstate(divide="ignore"):
        logits = np.log(scores) if kind is OutputKind.PROBABILITIES else scores
    logits = logits.astype(np.float32, copy=kind is not OutputKind.PROBABILITIES)
    row_max = np.max(np.where(np.isneginf(logits), -np.inf, logits), axis=-1, keepdims=True)
    floor = np.where(np.isfinite(row_max), row_max, 0.0) + np.log(np.finfo(np.float32).tiny)
    result: np.ndarray = np.where(np.isneginf(logits), floor, logits).astype(np.float32)
    return result
