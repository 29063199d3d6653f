"""Student families, registered once: adding one is a module and one line in ``FAMILIES``.

The public spec type ``StudentSpec`` (a discriminated union on ``architecture``) is derived from
the registry, so the API, the job spec, safetensors teacher configs and artifact manifests all
accept exactly the registered families.
"""

from typing import TYPE_CHECKING, Any, Union

from pydantic import Field, TypeAdapter
from torch import nn

from app.ml.signature import ModelSignature, TextPreprocessing
from app.ml.students.base import Standardize, StudentFamily, StudentSpecBase
from app.ml.students.cnn import CNN, CnnSpec
from app.ml.students.mlp import MLP, MlpSpec
from app.ml.students.mobilenet import MOBILENET_V2, MobilenetV2Spec
from app.ml.students.resnet import RESNET, ResnetSpec
from app.ml.students.text_cnn import TEXT_CNN, TextCnnSpec
from app.ml.students.transformer import TRANSFORMER, TransformerSpec
from app.ml.text import TOKEN_TYPE_IDS, is_text, text_model_signature

FAMILIES: dict[str, StudentFamily[Any]] = {
    family.name: family for family in (MLP, CNN, TRANSFORMER, TEXT_CNN, RESNET, MOBILENET_V2)
}

if TYPE_CHECKING:
    StudentSpec = StudentSpecBase
else:
    from typing import Annotated

    StudentSpec = Annotated[
        Union[tuple(family.spec for family in FAMILIES.values())],  # noqa: UP007
        Field(discriminator="architecture"),
    ]

_spec_adapter: TypeAdapter[StudentSpecBase] = TypeAdapter(StudentSpec)

__all__ = [
    "FAMILIES",
    "CnnSpec",
    "MlpSpec",
    "MobilenetV2Spec",
    "ResnetSpec",
    "Standardize",
    "StudentFamily",
    "StudentSpec",
    "StudentSpecBase",
    "TextCnnSpec",
    "TransformerSpec",
    "architecture_of",
    "build_model",
    "build_student",
    "family_of",
    "parameter_count",
    "parse_spec",
    "resolve_student",
    "student_signature",
]


def family_of(spec: StudentSpecBase) -> StudentFamily[Any]:
    return FAMILIES[spec.architecture]


def parse_spec(data: Any) -> StudentSpecBase:
    """A stored spec (job row, manifest, teacher config) back into its family's type."""
    return _spec_adapter.validate_python(data)


def resolve_student(
    spec: StudentSpecBase, teacher_architecture: dict[str, Any] | None
) -> StudentSpecBase:
    """``spec`` with what its family takes from the teacher (its ``architecture``: a Hugging
    Face teacher's config) filled in; unchanged for families that take nothing.

    Raises:
        ValueError: the student cannot be built from this teacher (the reason).
    """
    family = family_of(spec)
    return spec if family.resolve is None else family.resolve(spec, teacher_architecture)


def build_model(spec: StudentSpecBase, signature: ModelSignature) -> nn.Module:
    """A freshly initialised architecture for ``signature``'s inputs and classes."""
    return family_of(spec).build(spec, signature)


def build_student(
    spec: StudentSpecBase, signature: ModelSignature, fit_inputs: Any = None
) -> nn.Module:
    """A student: input standardisation (fitted on ``fit_inputs`` ``[N, *input_shape]`` when
    given), then the architecture. Serving rebuilds it without ``fit_inputs`` and loads the
    statistics. Text students take token ids: the architecture alone."""
    if is_text(signature):
        return build_model(spec, signature)
    standardize = Standardize(signature.input_shape)
    if fit_inputs is not None:
        standardize.fit(fit_inputs)
    return nn.Sequential(standardize, build_model(spec, signature))


def architecture_of(student: nn.Module) -> nn.Module:
    """The architecture inside a student built by ``build_student`` (where layer paths start)."""
    if isinstance(student, nn.Sequential) and isinstance(student[0], Standardize):
        return student[1]
    return student


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def student_signature(teacher: ModelSignature, data: ModelSignature) -> ModelSignature:
    """What a student of ``teacher`` distilled on ``data`` takes and returns.

    Inputs: the dataset's as stored (its input standardisation absorbs any scaling the teacher
    declared); for text, the teacher's tokenised inputs (the student shares its tokenizer).
    Outputs: logits, one per teacher score (which may be more than the dataset's classes),
    named as the teacher names its classes, else as the dataset does.
    """
    classes = teacher.scores.classes or data.class_names
    classes = classes + [str(i) for i in range(len(classes), teacher.num_classes)]
    if isinstance(teacher.preprocessing, TextPreprocessing):
        pairs = len(data.inputs) == 2  # a text dataset's records: one string, or a pair
        return text_model_signature(
            teacher.num_classes,
            preprocessing=teacher.preprocessing.model_copy(update={"pairs": pairs}),
            token_type_ids=any(t.name == TOKEN_TYPE_IDS for t in teacher.inputs),
            classes=classes,
        )
    return ModelSignature.for_tensor(
        data.input_shape, teacher.num_classes, classes=classes, preprocessing=data.preprocessing
    )
