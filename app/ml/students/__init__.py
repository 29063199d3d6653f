"""Student families, registered once: adding one is a module and one line in ``FAMILIES``.

The public spec type ``StudentSpec`` (a discriminated union on ``architecture``) is derived from
the registry, so the API, the job spec, safetensors teacher configs and artifact manifests all
accept exactly the registered families.
"""

from typing import TYPE_CHECKING, Any, Union

from pydantic import Field, TypeAdapter
from torch import nn

from app.ml.signature import ModelSignature
from app.ml.students.base import Standardize, StudentFamily, StudentSpecBase
from app.ml.students.cnn import CNN, CnnSpec
from app.ml.students.mlp import MLP, MlpSpec

FAMILIES: dict[str, StudentFamily[Any]] = {family.name: family for family in (MLP, CNN)}

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
    "Standardize",
    "StudentFamily",
    "StudentSpec",
    "StudentSpecBase",
    "build_model",
    "build_student",
    "family_of",
    "parameter_count",
    "parse_spec",
]


def family_of(spec: StudentSpecBase) -> StudentFamily[Any]:
    return FAMILIES[spec.architecture]


def parse_spec(data: Any) -> StudentSpecBase:
    """A stored spec (job row, manifest, teacher config) back into its family's type."""
    return _spec_adapter.validate_python(data)


def build_model(spec: StudentSpecBase, signature: ModelSignature) -> nn.Module:
    """A freshly initialised architecture for ``signature``'s inputs and classes."""
    return family_of(spec).build(spec, signature)


def build_student(
    spec: StudentSpecBase, signature: ModelSignature, fit_inputs: Any = None
) -> nn.Sequential:
    """A student: input standardisation (fitted on ``fit_inputs`` ``[N, *input_shape]`` when
    given), then the architecture. Serving rebuilds it without ``fit_inputs`` and loads the
    statistics."""
    standardize = Standardize(signature.input_shape)
    if fit_inputs is not None:
        standardize.fit(fit_inputs)
    return nn.Sequential(standardize, build_model(spec, signature))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
