"""Text datasets: labelled (or unlabelled) strings, as uploaded and as stored.

Contract (the rest of Distill relies on these names):
- ``TextRecords``: a text dataset in memory, train and test splits.
- ``read_text_upload(...)``: read and check an upload (CSV, TSV, JSONL, Parquet).
- ``write_records(records, path)`` / ``read_records(path, classes)``: the stored form (Parquet).
"""

import hashlib
from dataclasses import dataclass

import numpy as np

from app.ml.signature import ModelSignature
from app.ml.text import text_records_signature


@dataclass(frozen=True)
class TextRecords:
    """Strings with int64 labels ``[N]`` (``y_train`` None: an unlabelled transfer set, whose
    test split is labelled); ``pairs_*`` holds the second text of sentence pairs, else None.
    ``classes`` names the label values."""

    texts_train: list[str]
    pairs_train: list[str] | None
    y_train: np.ndarray | None
    texts_test: list[str]
    pairs_test: list[str] | None
    y_test: np.ndarray
    classes: list[str]

    @property
    def has_pairs(self) -> bool:
        return self.pairs_train is not None

    @property
    def signature(self) -> ModelSignature:
        return text_records_signature(len(self.classes), pairs=self.has_pairs, classes=self.classes)

    def digest(self) -> str:
        """sha256 of the records as training sees them, whatever file they came from."""
        digest = hashlib.sha256()
        for texts in (self.texts_train, self.pairs_train, self.texts_test, self.pairs_test):
            digest.update(b"none" if texts is None else f"{len(texts)}".encode())
            for text in texts or ():
                encoded = text.encode()
                digest.update(len(encoded).to_bytes(8, "little") + encoded)
        for labels in (self.y_train, self.y_test):
            digest.update(b"unlabelled" if labels is None else labels.astype(np.int64).tobytes())
        return digest.hexdigest()
