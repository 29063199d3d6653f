"""A text dataset's records tokenised with a teacher's tokenizer: what training, the preflight
and evaluation take (``DatasetArrays`` of ``TokenizedInputs``)."""

from app.datasets.arrays import DatasetArrays
from app.datasets.text import TextRecords
from app.ml.signature import TextPreprocessing
from app.ml.text import TextTokenizer


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
