"""A text dataset's records tokenised with a teacher's tokenizer: what training, the preflight
and evaluation take (``DatasetArrays`` of ``TokenizedInputs``)."""

from collections.abc import Sequence

from app.datasets.arrays import DatasetArrays
from app.datasets.text import TextRecords
from app.ml.signature import TextPreprocessing
from app.ml.teacher_formats import TeacherBackend
from app.ml.text import TextTokenizer

TOKENIZER_MISMATCH = "An ensemble's text teachers must share one tokenizer: theirs differ."


def shared_tokenizer(
    backends: Sequence[TeacherBackend],
) -> tuple[TextTokenizer, TextPreprocessing]:
    """The one tokenizer (and its preprocessing) of a job's text teachers.

    Raises:
        ValueError: an ensemble's teachers tokenise differently (``TOKENIZER_MISMATCH``).
    """
    tokenizers = [backend.tokenizer for backend in backends]
    first, preprocessing = tokenizers[0], backends[0].signature.preprocessing
    # A text dataset feeds only text teachers (checked at submission).
    assert first is not None and isinstance(preprocessing, TextPreprocessing)
    if any(t is None or t.to_str() != first.to_str() for t in tokenizers[1:]):
        raise ValueError(TOKENIZER_MISMATCH)
    return first, preprocessing


def tokenize_records(
    records: TextRecords, tokenizer: TextTokenizer, preprocessing: TextPreprocessing
) -> tuple[DatasetArrays, int]:
    """``records`` tokenised (``preprocessing`` recorded on the result), and how many records
    (train and test) were cut at ``max_length`` tokens."""
    train, train_truncated = tokenizer.encode(records.texts_train, records.pairs_train)
    test, test_truncated = tokenizer.encode(records.texts_test, records.pairs_test)
    data = DatasetArrays(
        train, records.y_train, test, records.y_test, records.classes, preprocessing
    )
    return data, train_truncated + test_truncated
