"""The layers a feature method matches: defaults filled in and every pair checked at submission,
so a name or shape that cannot work is a 422 and the stored spec names its layers explicitly."""

import math
from typing import Any

from app.datasets.service import DatasetSummary
from app.errors import InvalidSpec
from app.jobs.methods import (
    AttentionKL,
    AttentionTransfer,
    FeatureMethod,
    FitNets,
    HiddenStates,
    LayerPair,
    TextFeatureMethod,
)
from app.ml.layers import FeatureLayer, feature_layers, last_feature_map, transformer_layers
from app.ml.signature import ModelSignature
from app.ml.students import StudentSpecBase, TransformerSpec
from app.ml.students.transformer import runs_on_onnx
from app.ml.teacher_formats.onnx import ONNX
from app.ml.text import ATTENTIONS, HIDDEN_STATES
from app.models import Teacher

FIELD = "distillation.layers"
BYTES_PER_VALUE = 4  # the teacher's outputs are held as float32
ONNX_HELP = (
    "An ONNX teacher exposes intermediate tensors as extra graph outputs after the logits, "
    "e.g. a module returning `(logits, features)` exported with "
    "`output_names=['logits', 'features']`; or upload it as safetensors with a `config`."
)


def _listing(layers: list[FeatureLayer]) -> str:
    shown = ", ".join(f"{layer.name} {layer.shape}" for layer in layers[:40])
    return shown + (", ..." if len(layers) > 40 else "")


def default_layer_pair(
    method: FeatureMethod, teacher: list[FeatureLayer], student: list[FeatureLayer]
) -> LayerPair:
    if isinstance(method, FitNets | AttentionTransfer):
        teacher_map, student_map = last_feature_map(teacher), last_feature_map(student)
        if teacher_map is None or student_map is None:
            which = "teacher" if teacher_map is None else "student"
            raise InvalidSpec(
                f"`{method.method}` by default matches the last feature map [C, H, W] of each "
                f"model, and the {which} has none. Name the layers in `layers`"
                + (" (FitNets also matches vectors)." if isinstance(method, FitNets) else ".")
                + " Or use a `cnn` student.",
                field=FIELD,
            )
        return LayerPair(teacher=teacher_map.name, student=student_map.name)
    # SP and RKD relate the samples of a batch to each other: the embedding the classifier reads.
    return LayerPair(teacher=teacher[-1].name, student=student[-1].name)


def _check_shapes(method: FeatureMethod, teacher: list[int], student: list[int]) -> None:
    same_grid = len(teacher) == len(student) == 3 and teacher[1:] == student[1:]
    if isinstance(method, AttentionTransfer) and not same_grid:
        raise InvalidSpec(
            f"Attention transfer compares spatial maps: both layers must be [C, H, W] with the "
            f"same H x W; got teacher {teacher} and student {student}.",
            field=FIELD,
        )
    if isinstance(method, FitNets) and not (same_grid or len(teacher) == len(student) == 1):
        raise InvalidSpec(
            f"FitNets regresses the teacher's features with a 1x1 convolution (maps of the same "
            f"H x W) or a linear layer (two vectors); got teacher {teacher} and student {student}.",
            field=FIELD,
        )


def resolve_layer_pairs(
    method: FeatureMethod,
    teacher: Teacher,
    student: StudentSpecBase,
    dataset: DatasetSummary,
    max_teacher_feature_bytes: int,
) -> list[LayerPair]:
    if teacher.feature_layers is None:
        raise InvalidSpec(
            f"Teacher {teacher.id} was uploaded before Distill listed feature layers; upload it "
            "again to use feature methods.",
            field="teacher",
        )
    teacher_layers = [FeatureLayer.model_validate(layer) for layer in teacher.feature_layers]
    if not teacher_layers:
        raise InvalidSpec(
            f"Teacher {teacher.id} exposes no intermediate outputs for `{method.method}`. "
            + (ONNX_HELP if teacher.format == ONNX.name else ""),
            field="teacher",
        )
    student_layers = feature_layers(student, ModelSignature.model_validate(teacher.signature))
    pairs = method.layers or [default_layer_pair(method, teacher_layers, student_layers)]
    by_name = {
        "teacher": {layer.name: layer for layer in teacher_layers},
        "student": {layer.name: layer for layer in student_layers},
    }
    feature_values = 0
    for pair in pairs:
        for side, name in (("teacher", pair.teacher), ("student", pair.student)):
            if name not in by_name[side]:
                listed = teacher_layers if side == "teacher" else student_layers
                raise InvalidSpec(
                    f"The {side} has no layer {name!r}; it has: {_listing(listed)}.", field=FIELD
                )
        teacher_shape = by_name["teacher"][pair.teacher].shape
        _check_shapes(method, teacher_shape, by_name["student"][pair.student].shape)
        feature_values += math.prod(teacher_shape)
    needed = dataset.train_size * feature_values * BYTES_PER_VALUE
    if needed > max_teacher_feature_bytes:
        raise InvalidSpec(
            f"The teacher's outputs at these layers take {needed / 2**20:,.0f} MiB for "
            f"{dataset.train_size:,} samples; this server allows "
            f"{max_teacher_feature_bytes / 2**20:,.0f} MiB. Choose a smaller (deeper) layer.",
            field=FIELD,
        )
    return pairs


def _transformer_sizes(config: dict[str, Any]) -> tuple[int, int, int]:
    return (
        int(config["num_hidden_layers"]),
        int(config["hidden_size"]),
        int(config["num_attention_heads"]),
    )


def default_text_pairs(
    method: TextFeatureMethod, teacher_depth: int, student_depth: int
) -> list[LayerPair]:
    """TinyBERT's uniform mapping for hidden states (student layer ``m`` to teacher layer
    ``m * T / S``, the embeddings ``0`` to ``0``); MiniLM's last layer for attention."""
    if isinstance(method, HiddenStates):
        return [
            LayerPair(
                teacher=f"{HIDDEN_STATES}.{round(m * teacher_depth / student_depth)}",
                student=f"{HIDDEN_STATES}.{m}",
            )
            for m in range(student_depth + 1)
        ]
    return [
        LayerPair(
            teacher=f"{ATTENTIONS}.{teacher_depth - 1}", student=f"{ATTENTIONS}.{student_depth - 1}"
        )
    ]


def resolve_text_layer_pairs(
    method: TextFeatureMethod, teacher: Teacher, student: StudentSpecBase
) -> list[LayerPair]:
    """The layer pairs of a text feature method between a Hugging Face teacher and a (resolved)
    transformer student: defaults filled, names and shapes checked.

    Raises:
        InvalidSpec: another teacher (an ONNX one has no layers) or student, an unknown layer,
            a pair of the wrong kind, attention pairs with different head counts.
    """
    config = teacher.architecture or {}
    if runs_on_onnx(config):
        raise InvalidSpec(
            f"`{method.method}` matches the teacher's hidden states or attentions, which an ONNX "
            "teacher does not give (its graph returns the logits only): use a logit method "
            "(e.g. `kd`), or upload the teacher as `save_pretrained` writes it (safetensors).",
            field="distillation.method",
        )
    if "num_hidden_layers" not in config:
        raise InvalidSpec(
            f"`{method.method}` matches a transformer's layers: use a Hugging Face teacher.",
            field="teacher",
        )
    if not isinstance(student, TransformerSpec):
        raise InvalidSpec(
            f"`{method.method}` matches a transformer's layers: use a `transformer` student.",
            field="student.architecture",
        )
    assert student.hidden_size is not None and student.num_heads is not None  # resolved
    depth, hidden, heads = _transformer_sizes(config)
    listed = {
        "teacher": {layer.name: layer for layer in transformer_layers(depth, hidden, heads)},
        "student": {
            layer.name: layer
            for layer in transformer_layers(
                student.num_layers, student.hidden_size, student.num_heads
            )
        },
    }
    kind = HIDDEN_STATES if isinstance(method, HiddenStates) else ATTENTIONS
    pairs = method.layers or default_text_pairs(method, depth, student.num_layers)
    for pair in pairs:
        for side, name in (("teacher", pair.teacher), ("student", pair.student)):
            layer = listed[side].get(name)
            if layer is None or layer.kind != kind:
                names = [n for n, other in listed[side].items() if other.kind == kind]
                raise InvalidSpec(
                    f"`{method.method}` matches `{kind}.<i>` layers; the {side} has no {name!r}. "
                    f"It has: {', '.join(names)}.",
                    field=FIELD,
                )
        if kind == ATTENTIONS and (
            listed["teacher"][pair.teacher].shape != listed["student"][pair.student].shape
        ):
            raise InvalidSpec(
                f"Attention distributions are compared head by head: the teacher has {heads} "
                f"heads, the student {student.num_heads}. Give the student `num_heads: {heads}`.",
                field=FIELD,
            )
    return pairs


def attention_transfer_student(
    method: TextFeatureMethod, student: TransformerSpec
) -> TransformerSpec:
    """The student spec an attention-distribution method trains: ``attention_dropout`` 0.

    MiniLM (Wang et al. 2020, eq. 5) and TinyBERT (Jiao et al. 2020, eq. 7) match the softmax
    itself; the attention ``transformers`` returns is taken after dropout, whose zeros a KL
    cannot take (``log 0``) and whose survivors are rescaled by ``1 / (1 - p)``. Other methods
    get the spec unchanged.

    Raises:
        InvalidSpec: ``attention_dropout`` set above 0 with ``attention_kl``.
    """
    if not isinstance(method, AttentionKL) or student.attention_dropout == 0.0:
        return student
    if student.attention_dropout is not None:
        raise InvalidSpec(
            f"`attention_kl` matches the student's attention distributions, which dropout "
            f"would zero and rescale: leave `attention_dropout` unset (0 for this method), "
            f"not {student.attention_dropout}.",
            field="student.attention_dropout",
        )
    return student.model_copy(update={"attention_dropout": 0.0})
