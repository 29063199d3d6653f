"""Text dataset uploads (CSV, TSV, JSON lines, Parquet): checked fully, stored as Parquet, read
back exactly; each refusal is a 422 with its own code, naming the records, and keeps nothing."""

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from app import config
from app.config import get_settings
from app.datasets.loading import load_uploaded
from app.datasets.npz import holdout_split
from app.datasets.text import TextRecords, read_records, read_text_upload, write_records
from app.errors import InvalidDataset
from app.ml.text import text_records_signature
from app.storage import ArtifactStore, get_store, keys
from tests.helpers.api import npz_bytes

Rows = list[dict[str, Any]]

# Texts kept exactly as written: accents, CJK, emoji, right-to-left, combining marks, quotes
# (without a tab or line break, so that a TSV holds them too), surrounding spaces.
TEXTS = [
    "Hello, world!",
    "Café crème brûlée",
    "naïve façade — déjà vu",
    "日本語のテキストです",
    "中文文本，标点。",
    "한국어 문장",
    "emoji 😀🎉 and a skin tone 👍🏽",
    "Ελληνικά κείμενα",
    "עברית מימין לשמאל",
    "combining e\u0301 and ligature ﬁ",
    'she said "hi", then left',
    "  padded with spaces  ",
]
LABELS = [i % 3 for i in range(len(TEXTS))]
SST2_TEST = Path("/work/shared/data/sst2/test.tsv")
# The head of SST-2's test.tsv (GLUE's dev split), for machines without the file.
SST2_HEAD = (
    "sentence\tlabel\n"
    "it 's a charming and often affecting journey . \t1\n"
    "unflinchingly bleak and desperate \t0\n"
    "allows us to hope that nolan is poised to embark a major career as a commercial yet "
    "inventive filmmaker . \t1\n"
    "the acting , costumes , music , cinematography and sound are all astounding given the "
    "production 's austere locales . \t1\n"
    "it 's slow -- very , very slow . \t0\n"
)


def csv_bytes(rows: Rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def tsv_bytes(rows: Rows) -> bytes:
    """As GLUE writes them: a header, tab-separated fields, no quoting."""
    lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in row.values()) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def jsonl_bytes(rows: Rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def parquet_bytes(rows: Rows) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


WRITERS: dict[str, Callable[[Rows], bytes]] = {
    "data.csv": csv_bytes,
    "data.tsv": tsv_bytes,
    "data.jsonl": jsonl_bytes,
    "data.ndjson": jsonl_bytes,
    "data.parquet": parquet_bytes,
}


def post(
    client: TestClient,
    filename: str,
    data: bytes,
    test: tuple[str, bytes] | None = None,
    **form: str,
) -> dict[str, Any]:
    files = {"file": (filename, data)} | ({} if test is None else {"test_file": test})
    response = client.post("/v1/datasets", files=files, data=form)
    assert response.headers["content-type"] in ("application/json", "application/problem+json")
    body: dict[str, Any] = {"status": response.status_code, **response.json()}
    return body


def stored(body: dict[str, Any]) -> TextRecords:
    """The records as the worker reads them."""
    path = get_store().path(keys.dataset(body["ref"], "parquet"))
    return read_records(path, body["signature"]["outputs"][0]["classes"])


def uploaded(client: TestClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get("/v1/datasets").json()["items"]
    return [d for d in items if d["kind"] == "uploaded"]


def kept_files() -> set[Path]:
    """Every file under the store's datasets and staging folders."""
    root = get_settings().resolved_storage_dir
    return {p for folder in ("datasets", "staging") for p in (root / folder).rglob("*")}


@pytest.fixture
def nothing_kept(client: TestClient) -> Iterator[None]:
    """The test's uploads are all refused: no row, no file kept or left staged."""
    before = kept_files()
    yield
    assert uploaded(client) == []
    assert kept_files() == before


def rows_of(texts: list[Any], labels: list[Any] | None = None, **columns: list[Any]) -> Rows:
    """Records with a `text`, a `label` (unless None) and other columns."""
    if labels is not None:
        columns = {"label": labels} | columns
    return [
        {"text": text} | {name: values[i] for name, values in columns.items()}
        for i, text in enumerate(texts)
    ]


def held_out(
    texts: list[str], labels: list[int]
) -> tuple[list[str], list[int], list[str], list[int]]:
    """The split every upload without a test split gets (as .npz uploads)."""
    train, y_train, test, y_test = holdout_split(np.arange(len(texts)), np.array(labels))
    return [texts[i] for i in train], y_train.tolist(), [texts[i] for i in test], y_test.tolist()


def assert_records(
    records: TextRecords,
    texts_train: list[str],
    y_train: list[int] | None,
    texts_test: list[str],
    y_test: list[int],
) -> None:
    assert (records.texts_train, records.texts_test) == (texts_train, texts_test)
    assert (None if records.y_train is None else records.y_train.tolist()) == y_train
    assert records.y_test.tolist() == y_test
    assert records.y_test.dtype == np.int64


# --- Formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", list(WRITERS))
def test_each_format_round_trips_exactly(client: TestClient, filename: str) -> None:
    body = post(client, filename, WRITERS[filename](rows_of(TEXTS, LABELS)))
    assert body["status"] == 201, body
    assert (body["kind"], body["modality"], body["input_shape"]) == ("uploaded", "text", None)
    assert (body["train_size"], body["test_size"]) == (10, 2)
    assert (body["num_classes"], body["labelled"], body["has_test_split"]) == (3, True, False)
    assert body["signature"] == text_records_signature(3, pairs=False).model_dump(mode="json")
    assert body["input_stats"] is None
    lengths = [len(t) for t in TEXTS]
    assert body["text_stats"] == {
        "records": 12,
        "pairs": False,
        "mean_chars": pytest.approx(sum(lengths) / 12),
        "max_chars": max(lengths),
    }
    records = stored(body)
    assert_records(records, *held_out(TEXTS, LABELS))
    assert records.classes == ["0", "1", "2"] and records.pairs_train is None
    assert client.get(f"/v1/datasets/{body['ref']}").json() == {
        k: v for k, v in body.items() if k != "status"
    }
    assert [d["ref"] for d in uploaded(client)] == [body["ref"]]


def test_csv_quoting_line_breaks_and_numeric_looking_texts(client: TestClient) -> None:
    texts = ['a "quoted", comma', "two\nlines", "\ttabbed", "007", "1.50", "NULL", "NaN", "true"]
    body = post(client, "d.csv", csv_bytes(rows_of(texts, [0, 1] * 4)))
    assert body["status"] == 201, body
    records = stored(body)
    assert sorted(records.texts_train + records.texts_test) == sorted(texts)
    assert_records(records, *held_out(texts, [0, 1] * 4))


def test_tsv_keeps_quotes_as_written(client: TestClient) -> None:
    data = b'sentence\tlabel\n"unbalanced quote\t0\nsays "hi" \t1\nplain\t0\n'
    body = post(client, "d.tsv", data)
    assert body["status"] == 201, body
    records = stored(body)
    assert sorted(records.texts_train + records.texts_test) == [
        '"unbalanced quote',
        "plain",
        'says "hi" ',
    ]


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("d.csv", b'\xef\xbb\xbftext,label\r\n"x\r\ny",0\r\nb ,1\r\n\r\nc,0\r\n'),
        ("d.tsv", b"\xef\xbb\xbftext\tlabel\r\nx\t0\r\nb \t1\r\n\r\nc\t0\r\n"),
        (
            "d.jsonl",
            b'\xef\xbb\xbf{"text": "x\\r\\ny", "label": 0}\r\n{"text": "b ", "label": 1}\n\n'
            b'{"text": "c", "label": 0}',
        ),
    ],
)
def test_byte_order_mark_crlf_and_blank_lines(
    client: TestClient, filename: str, data: bytes
) -> None:
    body = post(client, filename, data)
    assert body["status"] == 201, body
    records = stored(body)
    texts = ["x", "b ", "c"] if filename == "d.tsv" else ["x\r\ny", "b ", "c"]  # TSV: no breaks
    assert sorted(records.texts_train + records.texts_test) == sorted(texts)


def test_sst2_file_format(client: TestClient) -> None:
    data = SST2_TEST.read_bytes() if SST2_TEST.is_file() else SST2_HEAD.encode()
    lines = data.decode().splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines]
    labels = [int(line.split("\t")[1]) for line in lines]
    body = post(client, "test.tsv", data)
    assert body["status"] == 201, body
    n_test = max(1, round(len(texts) * 0.2))
    assert (body["train_size"], body["test_size"]) == (len(texts) - n_test, n_test)
    assert (body["num_classes"], body["signature"]["outputs"][0]["classes"]) == (2, None)
    assert_records(stored(body), *held_out(texts, labels))  # trailing spaces kept
    if SST2_TEST.is_file():
        assert (len(texts), body["train_size"], body["test_size"]) == (872, 698, 174)


# --- Labels -------------------------------------------------------------------------------------


def test_string_labels_without_classes_are_sorted(client: TestClient) -> None:
    names = ["pos", "neg", "neutral"]
    labels = [names[i % 3] for i in range(12)]
    body = post(client, "d.jsonl", jsonl_bytes(rows_of(TEXTS, labels)))
    assert body["status"] == 201, body
    classes = ["neg", "neutral", "pos"]
    assert body["signature"] == text_records_signature(3, pairs=False, classes=classes).model_dump(
        mode="json"
    )
    indices = [classes.index(label) for label in labels]
    records = stored(body)
    assert_records(records, *held_out(TEXTS, indices))
    assert records.classes == classes


def test_string_labels_follow_the_classes_order(client: TestClient) -> None:
    labels = [" pos", "neg ", "pos", "neg"] * 3  # spaces around a name are not part of it
    classes = ["pos", "neg", "unseen"]
    body = post(client, "d.csv", csv_bytes(rows_of(TEXTS, labels)), classes=json.dumps(classes))
    assert body["status"] == 201, body
    assert (body["num_classes"], body["signature"]["outputs"][0]["classes"]) == (3, classes)
    assert_records(stored(body), *held_out(TEXTS, [0, 1, 0, 1] * 3))


def test_integer_labels_index_the_classes(client: TestClient) -> None:
    classes = ["negative", "positive"]
    labels = [1, 0] * 6
    body = post(
        client, "d.parquet", parquet_bytes(rows_of(TEXTS, labels)), classes=json.dumps(classes)
    )
    assert body["status"] == 201, body
    assert body["signature"]["outputs"][0]["classes"] == classes
    records = stored(body)
    assert_records(records, *held_out(TEXTS, labels))
    assert records.classes == classes


def test_whole_float_labels_from_a_dataframe_are_indices(client: TestClient) -> None:
    rows = rows_of(TEXTS, [float(v) for v in LABELS])
    body = post(client, "d.parquet", parquet_bytes(rows))
    assert body["status"] == 201, body
    assert body["num_classes"] == 3
    assert_records(stored(body), *held_out(TEXTS, LABELS))


# --- Columns and splits -------------------------------------------------------------------------


def test_sentence_pairs_are_detected(client: TestClient) -> None:
    rows = [
        {"premise": f"premise {i} é", "hypothesis": f"hypothèse {i} 😀", "label": i % 2}
        for i in range(10)
    ]
    body = post(client, "nli.jsonl", jsonl_bytes(rows))
    assert body["status"] == 201, body
    assert body["signature"] == text_records_signature(2, pairs=True).model_dump(mode="json")
    assert body["text_stats"]["pairs"] is True
    records = stored(body)
    train, _, test, _ = holdout_split(np.arange(10), np.arange(10) % 2)
    assert records.texts_train == [rows[i]["premise"] for i in train]
    assert records.pairs_train == [rows[i]["hypothesis"] for i in train]
    assert records.pairs_test == [rows[i]["hypothesis"] for i in test]


def test_columns_named_by_the_form(client: TestClient) -> None:
    rows = [
        {"id": i, "q": f"question {i}", "passage": f"passage {i}", "answerable": i % 2}
        for i in range(6)
    ]
    body = post(
        client,
        "qa.csv",
        csv_bytes(rows),
        text_column="q",
        text_pair_column="passage",
        label_column="answerable",
    )
    assert body["status"] == 201, body
    assert body["text_stats"]["pairs"] is True
    records = stored(body)
    assert sorted(records.texts_train + records.texts_test) == [r["q"] for r in rows]
    assert sorted(records.pairs_train or []) == sorted(
        rows[i]["passage"] for i in holdout_split(np.arange(6), np.arange(6) % 2)[0]
    )


def test_the_only_string_column_is_the_text(client: TestClient) -> None:
    rows = [{"id": i, "tweet": f"tweet {i}", "label": i % 2} for i in range(5)]
    body = post(client, "d.parquet", parquet_bytes(rows))
    assert body["status"] == 201, body
    assert sorted(stored(body).texts_train) == sorted(
        f"tweet {i}" for i in holdout_split(np.arange(5), np.arange(5) % 2)[0]
    )


def test_split_column(client: TestClient) -> None:
    splits = ["train", "test", "TRAIN", "dev", "train", " validation ", "train", "train"]
    rows = rows_of(TEXTS[:8], LABELS[:8], split=splits)
    body = post(client, "d.csv", csv_bytes(rows))
    assert body["status"] == 201, body
    assert (body["train_size"], body["test_size"], body["has_test_split"]) == (5, 3, True)
    test = [1, 3, 5]
    train = [i for i in range(8) if i not in test]
    assert_records(
        stored(body),
        [TEXTS[i] for i in train],
        [LABELS[i] for i in train],
        [TEXTS[i] for i in test],
        [LABELS[i] for i in test],
    )


def test_second_file_is_the_test_split(client: TestClient) -> None:
    test_texts = ["test é", "test 😀", "test 中文", "test four"]
    body = post(
        client,
        "train.jsonl",
        jsonl_bytes(rows_of(TEXTS, LABELS)),
        test=("test.csv", csv_bytes(rows_of(test_texts, [2, 0, 1, 0]))),
    )
    assert body["status"] == 201, body
    assert (body["train_size"], body["test_size"], body["has_test_split"]) == (12, 4, True)
    assert_records(stored(body), TEXTS, LABELS, test_texts, [2, 0, 1, 0])


def test_unlabelled_training_text_with_a_labelled_test_file(client: TestClient) -> None:
    body = post(
        client,
        "transfer.csv",
        csv_bytes(rows_of(TEXTS)),
        test=("test.tsv", tsv_bytes(rows_of(TEXTS[:3], ["a", "b", "a"]))),
    )
    assert body["status"] == 201, body
    assert (body["labelled"], body["train_size"], body["test_size"]) == (False, 12, 3)
    assert body["signature"]["outputs"][0]["classes"] == ["a", "b"]
    assert_records(stored(body), TEXTS, None, TEXTS[:3], [0, 1, 0])


def test_unlabelled_training_rows_with_a_labelled_split(client: TestClient) -> None:
    rows = rows_of(TEXTS[:6], [None, None, None, None, 1, 0], split=["train"] * 4 + ["test"] * 2)
    body = post(client, "d.jsonl", jsonl_bytes(rows))
    assert body["status"] == 201, body
    assert (body["labelled"], body["train_size"], body["test_size"]) == (False, 4, 2)
    assert_records(stored(body), TEXTS[:4], None, TEXTS[4:6], [1, 0])


def test_held_out_split_sizes(client: TestClient) -> None:
    for n in (3, 7, 23):
        texts = [f"text {i}" for i in range(n)]
        labels = [i % 2 for i in range(n)]
        body = post(client, "d.csv", csv_bytes(rows_of(texts, labels)))
        n_test = max(1, round(n * 0.2))
        assert (body["train_size"], body["test_size"]) == (n - n_test, n_test)
        assert_records(stored(body), *held_out(texts, labels))


def test_load_uploaded_reads_text_records(client: TestClient) -> None:
    body = post(client, "d.csv", csv_bytes(rows_of(TEXTS, ["x", "y", "z"] * 4)))
    records = load_uploaded(get_store().path(keys.dataset(body["ref"], "parquet")), None)
    assert isinstance(records, TextRecords)
    assert records.classes == ["0", "1", "2"]  # unnamed here: the caller passes the names
    assert records.digest() == stored(body).digest()


# --- Refusals -----------------------------------------------------------------------------------

REFUSALS = [
    pytest.param(
        "d.csv",
        b"text,label\nfine,0\nbad \xff\xfe byte,1\nfine too,1\nalso \xc3,0\n",
        {},
        (422, "unreadable_text", [2, 4]),
        "not UTF-8",
        id="invalid-utf8",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(["a", "", "c", "   ", "e"], [0, 1, 0, 1, 0])),
        {},
        (422, "empty_text", [2, 4]),
        "records 2, 4",
        id="empty-text",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(["a", None, "c"], [0, 1, 0])),
        {},
        (422, "empty_text", [2]),
        "record 2",
        id="missing-text",
    ),
    pytest.param(
        "d.csv",
        csv_bytes(rows_of(list("abcdef"), [0, 1, "", 1, " ", 0])),
        {},
        (422, "missing_label", [3, 5]),
        "no label in records 3, 5",
        id="missing-label",
    ),
    pytest.param(
        "d.tsv",
        tsv_bytes(rows_of(list("abcde"), ["pos", "neg", "meh", "pos", "bof"])),
        {"classes": '["neg", "pos"]'},
        (422, "unknown_label", [3, 5]),
        "['bof', 'meh']",
        id="unknown-label",
    ),
    pytest.param(
        "d.csv",
        csv_bytes(rows_of(list("abcde"), [0, 1, 2, 1, 0])),
        {"classes": '["neg", "pos"]'},
        (422, "unknown_label", [3]),
        "names 2 classes",
        id="unknown-label-index",
    ),
    pytest.param(
        "d.parquet",
        parquet_bytes([{"review_body": "a", "stars": 1}] * 4),
        {"text_column": "review"},
        (422, "missing_column", None),
        "`review_body`, `stars`",
        id="missing-column",
    ),
    pytest.param(
        "d.csv",
        csv_bytes(rows_of(list("abcd"), ["pos"] * 4)),
        {},
        (422, "single_class", None),
        "one class only (every label is 'pos')",
        id="one-class",
    ),
    pytest.param(
        "d.csv",
        csv_bytes(rows_of(list("abcd"), [1, 2, 1, 2])),
        {},
        (422, "labels_not_zero_based", None),
        "from 1 to 2",
        id="not-zero-based",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(list("abcd"), [0, -1, 1, 0])),
        {},
        (422, "invalid_label", [2]),
        "class index -1 in record 2",
        id="negative-label",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(list("abcd"), [0, 0.5, 1, 0])),
        {},
        (422, "invalid_label", [2]),
        "not class indices (0.5)",
        id="fractional-label",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(list("abcd"), [0, 1, 1, 0], split=["train", "val", "test", "x"])),
        {},
        (422, "invalid_split", [2, 4]),
        "'val'",
        id="invalid-split",
    ),
    pytest.param(
        "d.csv",
        csv_bytes([{"sentence": "a", "question": "b", "label": 0}] * 4),
        {},
        (422, "ambiguous_column", None),
        "`sentence`, `question`",
        id="ambiguous-column",
    ),
    pytest.param(
        "d.csv",
        csv_bytes([{"title": "a", "body": "b", "label": 0}] * 4),
        {},
        (422, "ambiguous_column", None),
        "several string columns",
        id="several-string-columns",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes([{"text": 5, "label": 0}] * 4),
        {},
        (422, "invalid_column", None),
        "holds int64, not strings",
        id="text-not-strings",
    ),
    pytest.param(
        "d.csv",
        csv_bytes(rows_of(["a", "b"], [0, 1])),
        {},
        (422, "too_few_rows", None),
        "at least 3",
        id="too-few-rows",
    ),
    pytest.param("d.csv", b"", {}, (422, "too_few_rows", None), "empty", id="empty-file"),
    pytest.param(
        "d.csv",
        csv_bytes(rows_of(list("abcd"))),
        {},
        (422, "missing_label", None),
        "unlabelled transfer set",
        id="unlabelled-without-test-split",
    ),
    pytest.param(
        "d.jsonl",
        b'{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c", "label": "x"}\n',
        {},
        (422, "unreadable_text", None),
        "in record 3",
        id="json-types-change",
    ),
    pytest.param(
        "d.csv",
        b"text,label\na,0\nb,1,extra\n",
        {},
        (422, "unreadable_text", None),
        "Expected 2 columns, got 3",
        id="csv-ragged",
    ),
    pytest.param(
        "d.csv",
        "text,label\na,0\n".encode("utf-16"),
        {},
        (422, "unreadable_text", None),
        "UTF-16",
        id="utf16",
    ),
    pytest.param(
        "d.parquet",
        b"PAR1 not really",
        {},
        (422, "unreadable_text", None),
        "as Parquet",
        id="bad-pq",
    ),
    pytest.param(
        "d.csv",
        b"te\xffxt,label\na,0\nb,1\nc,0\n",
        {},
        (422, "unreadable_text", None),
        "column names are not UTF-8",
        id="invalid-utf8-header",
    ),
    pytest.param(
        "d.csv",
        b"text,text,label\na,b,0\nc,d,1\ne,f,0\n",
        {},
        (422, "ambiguous_column", None),
        "2 columns named `text`",
        id="duplicate-columns",
    ),
    pytest.param(
        "d.parquet",
        parquet_bytes([{"text": ["a", "b"], "label": 0}] * 4),
        {},
        (422, "invalid_column", None),
        "holds list<element: string>",
        id="nested-column",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(list("abcd"), [True, False, True, False])),
        {},
        (422, "invalid_column", None),
        "holds bool",
        id="boolean-labels",
    ),
    pytest.param(
        "d.jsonl",
        jsonl_bytes(rows_of(list("abcd"), ["x", "nul\x00here", "y", "x"])),
        {},
        (422, "invalid_label", [2]),
        "cannot be class names",
        id="unstorable-label",
    ),
    pytest.param(
        "d.xlsx", b"whatever", {}, (415, "unsupported_format", None), "*.csv", id="suffix"
    ),
    pytest.param(
        "data.npz",
        npz_bytes(x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1])),
        {"text_column": "text"},
        (422, "invalid_dataset", None),
        "for text datasets",
        id="npz-with-text-options",
    ),
]


@pytest.mark.parametrize(("filename", "data", "form", "expected", "words"), REFUSALS)
@pytest.mark.usefixtures("nothing_kept")
def test_refusals(
    client: TestClient,
    filename: str,
    data: bytes,
    form: dict[str, str],
    expected: tuple[int, str, list[int] | None],
    words: str,
) -> None:
    body = post(client, filename, data, None, **form)
    assert (body["status"], body["code"], body.get("rows")) == expected, body
    assert words in body["detail"], body["detail"]
    assert body["field"] == ("text_column" if "npz" in filename else "file")


def test_missing_column_names_the_columns(client: TestClient) -> None:
    body = post(client, "d.csv", csv_bytes(rows_of(list("abcd"), [0, 1, 0, 1])), label_column="y2")
    assert (body["status"], body["code"], body["column"]) == (422, "missing_column", "y2")
    assert body["columns"] == ["text", "label"]
    assert "its columns are `text`, `label`" in body["detail"]


@pytest.mark.usefixtures("nothing_kept")
def test_refusals_in_the_test_file(client: TestClient) -> None:
    train = csv_bytes(rows_of(TEXTS, LABELS))
    cases: list[tuple[bytes, str, list[int] | None]] = [
        (csv_bytes(rows_of(["a", "b", "c"], [0, "", 1])), "missing_label", [2]),
        (csv_bytes(rows_of(["a", "b"], [0, -3])), "invalid_label", [2]),
        (csv_bytes([{"sentence": "a", "label": 0}]), "missing_column", None),
        (csv_bytes(rows_of(["a", "b"], [0, 1], split=["test", "train"])), "invalid_split", [2]),
        (b"text,label\n", "too_few_rows", None),
    ]
    for data, code, rows in cases:
        body = post(client, "train.csv", train, test=("test.csv", data))
        assert (body["status"], body["code"], body.get("rows")) == (422, code, rows), body
    body = post(client, "train.csv", train, test=("test.npz", b"x"))
    assert (body["status"], body["code"], body["field"]) == (415, "unsupported_format", "test_file")
    unlabelled = post(
        client, "t.csv", csv_bytes(rows_of(TEXTS)), test=("t.csv", csv_bytes(rows_of(TEXTS)))
    )
    assert (unlabelled["code"], unlabelled["field"]) == ("missing_label", "test_file")


def test_a_split_column_and_a_test_file_are_refused_together(client: TestClient) -> None:
    rows = rows_of(TEXTS[:5], LABELS[:5], split=["train", "train", "test", "train", "train"])
    body = post(client, "d.csv", csv_bytes(rows), test=("t.csv", csv_bytes(rows_of(["x"], [0]))))
    assert (body["status"], body["code"], body["rows"]) == (422, "invalid_split", [3])


def test_an_oversized_test_file_is_413_and_both_files_go(client: TestClient) -> None:
    before = kept_files()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_MAX_DATASET_BYTES", "2000")
        config.get_settings.cache_clear()
        body = post(
            client,
            "d.csv",
            csv_bytes(rows_of(TEXTS, LABELS)),
            test=("t.csv", csv_bytes(rows_of(["x" * 3000], [0]))),
        )
    config.get_settings.cache_clear()
    assert (body["status"], body["code"]) == (413, "payload_too_large")
    assert kept_files() == before
    assert uploaded(client) == []


def test_a_failure_after_staging_leaves_no_file(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both staged files go when keeping the dataset fails unexpectedly."""

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(ArtifactStore, "adopt", fail)
    before = kept_files()
    with TestClient(client.app, raise_server_exceptions=False, headers=client.headers) as failing:
        response = failing.post(
            "/v1/datasets",
            files={
                "file": ("d.csv", csv_bytes(rows_of(TEXTS, LABELS))),
                "test_file": ("t.csv", csv_bytes(rows_of(TEXTS[:2], [0, 1]))),
            },
        )
    assert response.status_code == 500
    assert kept_files() == before
    assert uploaded(client) == []


# --- Limits (read_text_upload directly) ---------------------------------------------------------


def read(path: Path, **limits: int) -> TextRecords:
    options: dict[str, Any] = {
        "text_column": None,
        "text_pair_column": None,
        "label_column": None,
        "classes": None,
        "max_rows": 1000,
        "max_text_chars": 1000,
        "max_bytes": 1 << 20,
    }
    return read_text_upload(path, path.name, **(options | limits)).records


def test_limits(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(csv_bytes(rows_of(["a", "b", "c", "dddd"], [0, 1, 0, 1])))
    assert len(read(path).texts_train) == 3
    with pytest.raises(InvalidDataset) as refused:
        read(path, max_rows=3)
    assert (refused.value.code, refused.value.extra["limit_rows"]) == ("too_many_rows", 3)
    with pytest.raises(InvalidDataset) as refused:
        read(path, max_text_chars=3)
    assert (refused.value.code, refused.value.extra["rows"]) == ("text_too_long", [4])
    assert "the longest: 4" in refused.value.detail


def test_parquet_text_is_decoded_only_within_the_budget(tmp_path: Path) -> None:
    """A long text repeated, dictionary-encoded, is a small file that decodes to a large one."""
    path = tmp_path / "d.parquet"
    long = "é" * 5000
    pq.write_table(pa.Table.from_pylist(rows_of([long] * 400, [0, 1] * 200)), path)
    assert path.stat().st_size < 100_000
    assert len(read(path, max_text_chars=10_000, max_bytes=1 << 23).texts_train) == 320
    with pytest.raises(InvalidDataset, match=r"decode to 4,000,000 bytes") as refused:
        read(path, max_text_chars=10_000, max_bytes=1 << 20)
    assert refused.value.code == "invalid_dataset"
    # Without a dictionary, its pages' declared sizes are refused before any is read.
    pq.write_table(
        pa.Table.from_pylist(rows_of([long] * 400, [0, 1] * 200)),
        path,
        use_dictionary=False,
        compression="zstd",
    )
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidDataset, match=r"decode to [\d,]+ bytes, more than the budget"):
        read(path, max_text_chars=10_000, max_bytes=1 << 20)


def test_read_records_names_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(csv_bytes(rows_of(TEXTS, LABELS)))
    records = read(path)
    assert records.classes == ["0", "1", "2"]
    stored_path = tmp_path / "stored.parquet"
    write_records(records, stored_path)
    assert read_records(stored_path, ["a", "b", "c"]).digest() == records.digest()
    with pytest.raises(InvalidDataset, match="2 class names for labels up to 2"):
        read_records(stored_path, ["a", "b"])
