"""The builtin datasets, by reference: one module per dataset, one registry line each.

A dataset module (``fashion_mnist``, ``digits``) holds everything about its data (where it comes
from, where its files are looked for, how it is read) and exports it as a ``BuiltinDataset``.
"""

from app.datasets.builtins import digits, fashion_mnist
from app.datasets.builtins.base import BuiltinDataset

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "digits", "fashion_mnist", "is_available"]

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.ref: d
    for d in (
        fashion_mnist.DATASET,
        digits.DATASET,
    )
}


def is_available(ref: str) -> bool:
    """Whether the files of builtin dataset ``ref`` are on this machine.

    Raises:
        KeyError: ``ref`` is not a builtin dataset.
    """
    return BUILTIN_DATASETS[ref].available()
