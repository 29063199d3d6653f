"""Text datasets: labelled (or unlabelled) strings, as uploaded and as stored.

Contract (the rest of Distill relies on these names):
- ``TextRecords``: a text dataset in memory, train and test splits.
- ``read_text_upload(...)``: read and check an upload (CSV, TSV, JSONL, Parquet).
- ``write_records(records, path)`` / ``read_records(path, classes)``: the stored form (Parquet).

An upload, as ``read_text_upload`` reads it:

- Format by the file name's suffix (``TEXT_FORMATS``), UTF-8 only, read by pyarrow (never
  pickle, never eval): ``.csv`` (a header row, then comma-separated rows; RFC 4180 quotes, so a
  quoted field may span lines), ``.tsv`` (a header row, then tab-separated rows without quoting,
  as GLUE's files: a field holds no tab or line break), ``.jsonl``/``.ndjson`` (one JSON object
  per line), ``.parquet``. Text columns are read as strings whatever they look like.
- Columns: those the form fields name, else detected: the text from ``TEXT_COLUMNS`` (else the
  only string column), its pair from ``PAIR_COLUMNS`` (``sentence1`` -> ``sentence2``...), the
  label from ``LABEL_COLUMNS`` (none: an unlabelled transfer set). Several candidates: refused.
- Test split: a ``split`` column (``train``; ``test``, ``dev`` or ``validation`` for the test
  split, any case), else a second file (``test_path``, same columns), else a fixed-seed held-out
  split, as for ``.npz`` (``holdout_split``).
- Labels: class indices (integers from 0, also when written as strings, as a CSV holds them;
  ``classes`` then names them) or class names (the ``classes`` order, else sorted), surrounding
  spaces removed. Texts are kept exactly as written.

Refusals are 422 problems with a ``code``, the ``field`` at fault (``file`` or ``test_file``),
the ``column``, and ``rows``: the first few records at fault, numbered from 1 in file order (a
CSV/TSV header row and blank lines are not records). Codes: ``unreadable_text`` (not UTF-8,
not parseable), ``missing_column``, ``ambiguous_column``, ``invalid_column`` (a column of the
wrong type), ``empty_text``, ``text_too_long``, ``too_few_rows``, ``too_many_rows`` (a 422: the
upload's bytes are within their limit; its record count is not), ``invalid_split``,
``missing_label``, ``invalid_label``, ``unknown_label``, ``labels_not_zero_based``,
``single_class``, and ``invalid_dataset`` for Parquet text that would decode past the budget.
"""

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from app.datasets.npz import MAX_CLASSES, MIN_SAMPLES, holdout_split
from app.errors import InvalidDataset, LabelsNotZeroBased, UnsupportedFormat, unstorable_character
from app.ml.signature import Datatype, ModelSignature
from app.ml.text import TEXT, TEXT_PAIR, text_records_signature

TextFormat = Literal["csv", "tsv", "jsonl", "parquet"]
TEXT_FORMATS: dict[str, TextFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_FORMAT_NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON lines", "parquet": "Parquet"}
# Default limits of an upload: records per file, and characters (code points) per text.
MAX_TEXT_ROWS = 10_000_000
MAX_TEXT_CHARS = 100_000

TEXT_COLUMNS = (
    "text",
    "sentence",
    "sentence1",
    "premise",
    "question",
    "question1",
    "review",
    "content",
)
PAIR_COLUMNS = {
    "text": "text_pair",
    "sentence1": "sentence2",
    "premise": "hypothesis",
    "question1": "question2",
}
LABEL_COLUMNS = ("label", "labels", "target", "class", "y")
SPLIT_COLUMN = "split"
# A `split` value (lower-cased, trimmed) -> whether the record is in the test split.
SPLITS = {"train": False, "test": True, "dev": True, "validation": True}

# The stored form's columns, besides TEXT and TEXT_PAIR, and where its TextStats are kept.
LABEL, SPLIT = "label", "split"
STATS_KEY = b"distill.text_stats"
# Records named in an error.
SHOWN_ROWS = 5
_INTEGER = re.compile(r"[+-]?\d+")
_PYARROW_ROW = re.compile(r"in row (\d+)")
# The readers take the whole file as one block (up to this), so a record of any length parses
# and the row numbers of their errors count from the start of the file.
_MAX_BLOCK = 1 << 30


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


class TextStats(BaseModel):
    """What a text dataset's records look like. Characters are Unicode code points, counted
    over every text of both splits (both texts of a pair)."""

    model_config = ConfigDict(frozen=True)

    records: int
    pairs: bool
    mean_chars: float
    max_chars: int


def text_stats(records: TextRecords) -> TextStats:
    groups = (records.texts_train, records.pairs_train, records.texts_test, records.pairs_test)
    lengths = [len(text) for group in groups if group is not None for text in group]
    return TextStats(
        records=len(records.texts_train) + len(records.texts_test),
        pairs=records.has_pairs,
        mean_chars=sum(lengths) / len(lengths),
        max_chars=max(lengths),
    )


def is_text_dataset(signature: ModelSignature) -> bool:
    """Are a dataset's records strings (a text dataset) rather than tensors?"""
    return all(spec.datatype == Datatype.BYTES for spec in signature.inputs)


def text_format(filename: str) -> TextFormat | None:
    """The text format a file name's suffix names, if any."""
    return TEXT_FORMATS.get(Path(filename).suffix.lower())


@dataclass(frozen=True)
class TextUpload:
    """A checked upload: its records, whether it brought a test split (else it was held out),
    and whether its classes have names (string labels, or the ``classes`` form field)."""

    records: TextRecords
    has_test_split: bool
    named_classes: bool

    @property
    def signature(self) -> ModelSignature:
        """The dataset's signature (class names only when they were given)."""
        records = self.records
        return text_records_signature(
            len(records.classes),
            pairs=records.has_pairs,
            classes=records.classes if self.named_classes else None,
        )


@dataclass(frozen=True)
class _Columns:
    """The columns an upload's file is read from."""

    text: str
    pair: str | None
    label: str | None
    split: str | None

    @property
    def used(self) -> list[str]:
        return [c for c in (self.text, self.pair, self.label, self.split) if c is not None]


@dataclass(frozen=True)
class _Labels:
    """A file's labels: their distinct values as written (integers, or class names without
    surrounding spaces) and, per record, the index of its value in ``values`` (-1: no label)."""

    values: list[int | str]
    codes: np.ndarray

    def value(self, row: int) -> int | str:
        """The label of a labelled record."""
        return self.values[int(self.codes[row])]

    def rows_where(self, test: Callable[[int | str], bool]) -> np.ndarray:
        """The records whose label passes ``test``."""
        return np.flatnonzero(
            np.isin(self.codes, [i for i, v in enumerate(self.values) if test(v)])
        )


@dataclass(frozen=True)
class _Part:
    """One uploaded file's records (``texts``, ``pairs``: strings), ``labels``, and ``test``:
    whether each record is in the test split."""

    where: str
    columns: _Columns
    texts: pa.ChunkedArray
    pairs: pa.ChunkedArray | None
    labels: _Labels
    test: np.ndarray


def _records(rows: np.ndarray | list[int]) -> str:
    """``rows`` (0-based) as the records a person reads: "records 3, 8 and 2 more"."""
    shown = ", ".join(str(int(r) + 1) for r in rows[:SHOWN_ROWS])
    more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return f"record{'s' if len(rows) > 1 else ''} {shown}{more}"


def _refuse(
    code: str, detail: str, where: str, rows: np.ndarray | list[int] | None = None, **extra: Any
) -> InvalidDataset:
    """A 422 naming the file (``field``) and, with ``rows``, the first records at fault."""
    if rows is not None:
        extra["rows"] = [int(r) + 1 for r in rows[:SHOWN_ROWS]]
    return InvalidDataset(detail, code=code, field=where, **extra)


def _is_string(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _is_bytes(kind: pa.DataType) -> bool:
    """Strings or binary: variable-length values."""
    return _is_string(kind) or bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


# --- Reading a file -------------------------------------------------------------------------


def _names(schema: pa.Schema, where: str) -> list[str]:
    try:
        names: list[str] = schema.names
    except UnicodeDecodeError as e:
        raise _refuse(
            "unreadable_text", f"`{where}`'s column names are not UTF-8 text: {e}.", where
        ) from e
    return names


def _pick(names: list[str], candidates: tuple[str, ...], where: str, what: str) -> str | None:
    """The one candidate column present, None if none is; several: refused."""
    found = [c for c in candidates if c in names]
    if len(found) > 1:
        raise _refuse(
            "ambiguous_column",
            f"`{where}` has several columns that could be the {what}: "
            f"{', '.join(f'`{c}`' for c in found)}. Name the one to use with `{what}_column`.",
            where,
            columns=names,
        )
    return found[0] if found else None


def _require(names: list[str], name: str, where: str, form_field: str) -> str:
    if name not in names:
        raise _refuse(
            "missing_column",
            f"`{where}` has no column `{name}` (from `{form_field}`); its columns are "
            f"{', '.join(f'`{c}`' for c in names)}.",
            where,
            column=name,
            columns=names,
        )
    return name


def _file_columns(
    schema: pa.Schema,
    *,
    text: str | None,
    pair: str | None,
    label: str | None,
    labels_elsewhere: bool,
) -> _Columns:
    """The columns of the first file: those named, else detected. ``labels_elsewhere``: a named
    label column may be missing here (a test file brings the labels)."""
    names = _names(schema, "file")
    if label is None:
        label = _pick(names, LABEL_COLUMNS, "file", "label")
    elif label not in names and labels_elsewhere:
        label = None
    else:
        label = _require(names, label, "file", "label_column")
    split = SPLIT_COLUMN if SPLIT_COLUMN in names else None
    if text is not None:
        text = _require(names, text, "file", "text_column")
    else:
        text = _pick(names, TEXT_COLUMNS, "file", "text") or _only_string_column(
            schema, names, {label, split, *PAIR_COLUMNS.values()}
        )
    if pair is not None:
        pair = _require(names, pair, "file", "text_pair_column")
    elif PAIR_COLUMNS.get(text) in names:
        pair = PAIR_COLUMNS[text]
    return _unique(names, _Columns(text, pair, label, split), "file")


def _only_string_column(schema: pa.Schema, names: list[str], others: set[str | None]) -> str:
    strings = [
        name
        for name, kind in zip(names, schema.types, strict=True)
        if name not in others
        and (_is_string(kind) or (pa.types.is_dictionary(kind) and _is_string(kind.value_type)))
    ]
    if len(strings) == 1:
        return strings[0]
    listed = ", ".join(f"`{c}`" for c in names)
    raise _refuse(
        "ambiguous_column" if strings else "missing_column",
        f"`file` has no column named like a text ({', '.join(TEXT_COLUMNS)}) and "
        f"{'several string columns' if strings else 'no string column'}; its columns are "
        f"{listed}. Name the text's column with `text_column`.",
        "file",
        columns=names,
    )


def _test_file_columns(schema: pa.Schema, first: _Columns, label: str | None) -> _Columns:
    """The test file's columns: the first file's; the label's, when that has none, named by
    ``label`` or detected. Its records must be labelled."""
    names = _names(schema, "test_file")
    text = _require(names, first.text, "test_file", "text_column")
    pair = (
        None if first.pair is None else _require(names, first.pair, "test_file", "text_pair_column")
    )
    if first.label is not None:
        label = _require(names, first.label, "test_file", "label_column")
    elif label is not None:
        label = _require(names, label, "test_file", "label_column")
    else:
        label = _pick(names, LABEL_COLUMNS, "test_file", "label")
    if label is None:
        raise _refuse(
            "missing_label",
            f"`test_file` has no label column (one of {', '.join(LABEL_COLUMNS)}, or name it "
            f"with `label_column`): the test split must be labelled. Its columns are "
            f"{', '.join(f'`{c}`' for c in names)}.",
            "test_file",
            columns=names,
        )
    split = SPLIT_COLUMN if SPLIT_COLUMN in names else None
    return _unique(names, _Columns(text, pair, label, split), "test_file")


def _unique(names: list[str], columns: _Columns, where: str) -> _Columns:
    for name in columns.used:
        if names.count(name) > 1:
            raise _refuse(
                "ambiguous_column",
                f"`{where}` has {names.count(name)} columns named `{name}`.",
                where,
                column=name,
                columns=names,
            )
    return columns


def _arrow_error(e: Exception, where: str, fmt: TextFormat) -> InvalidDataset:
    # pyarrow's JSON reader counts records from 0.
    message = _PYARROW_ROW.sub(lambda m: f"in record {int(m.group(1)) + 1}", str(e))
    return _refuse(
        "unreadable_text", f"`{where}` could not be read as {_FORMAT_NAMES[fmt]}: {message}", where
    )


def _read_text_file(path: Path, fmt: TextFormat, where: str, string_columns: set[str]) -> pa.Table:
    """A CSV, TSV or JSON lines file; ``string_columns`` are read as strings whatever they look
    like (the others are typed by inference, and unused)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise _refuse(
            "unreadable_text", f"`{where}` is UTF-16 (or UTF-32); save it as UTF-8.", where
        )
    block = max(1 << 20, min(path.stat().st_size + 1, _MAX_BLOCK))
    # An open file, not a path: pyarrow would decompress a path named like `.gz` on its own.
    with pa.OSFile(str(path)) as source:
        if fmt == "jsonl":
            return pa_json.read_json(source, read_options=pa_json.ReadOptions(block_size=block))
        return pa_csv.read_csv(
            source,
            read_options=pa_csv.ReadOptions(block_size=block),
            parse_options=pa_csv.ParseOptions(
                delimiter="," if fmt == "csv" else "\t",
                quote_char='"' if fmt == "csv" else False,
                newlines_in_values=fmt == "csv",
            ),
            # Invalid UTF-8 is found below, record by record.
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(string_columns, pa.string()), check_utf8=False
            ),
        )


def _read_parquet(
    path: Path,
    where: str,
    pick: Callable[[pa.Schema], _Columns],
    max_rows: int,
    max_bytes: int,
) -> tuple[pa.Table, _Columns]:
    """Only the columns used, flat ones, whose pages decompress within ``max_bytes``. Strings
    are read dictionary-encoded, and decoded once their size is known to fit ``max_bytes`` too:
    a small file may repeat a long text a million times."""
    parquet = pq.ParquetFile(path)
    columns = pick(parquet.schema_arrow)
    for name in columns.used:
        kind = parquet.schema_arrow.field(name).type
        if pa.types.is_nested(kind):
            raise _refuse(
                "invalid_column",
                f"Column `{name}` of `{where}` holds {kind}, not strings or labels.",
                where,
                column=name,
            )
    metadata = parquet.metadata
    _check_row_count(metadata.num_rows, where, max_rows)
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    _check_decoded(
        sum(
            chunk.total_uncompressed_size
            for group in groups
            for chunk in (group.column(j) for j in range(group.num_columns))
            if chunk.path_in_schema in columns.used
        ),
        where,
        max_bytes,
    )
    table = pq.read_table(path, columns=columns.used, read_dictionary=columns.used)
    decoded = 0
    for column in table.columns:
        if pa.types.is_dictionary(column.type) and _is_bytes(column.type.value_type):
            for chunk in column.chunks:
                lengths = pc.binary_length(chunk.dictionary)
                decoded += pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0
    _check_decoded(decoded, where, max_bytes)
    plain = [
        pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f
        for f in table.schema
    ]
    return table.cast(pa.schema(plain)), columns


def _check_decoded(size: int, where: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise _refuse(
            "invalid_dataset",
            f"`{where}`'s columns decode to {size:,} bytes, more than the budget of "
            f"{max_bytes:,} bytes for checking an upload; nothing was decoded.",
            where,
        )


def _check_row_count(rows: int, where: str, max_rows: int) -> None:
    if rows > max_rows:
        raise _refuse(
            "too_many_rows",
            f"`{where}` holds {rows:,} records, more than the limit of {max_rows:,}.",
            where,
            limit_rows=max_rows,
        )


def _read_table(
    path: Path,
    filename: str,
    where: str,
    pick: Callable[[pa.Schema], _Columns],
    string_columns: set[str],
    *,
    max_rows: int,
    max_bytes: int,
) -> tuple[pa.Table, _Columns]:
    """The file's table (its used columns, strings plain) and the columns ``pick`` chose."""
    fmt = text_format(filename)
    if fmt is None:
        raise UnsupportedFormat(
            f"`{filename}` is not a text format Distill reads: give a file named "
            f"{', '.join(f'*{s}' for s in TEXT_FORMATS)}.",
            field=where,
        )
    if path.stat().st_size == 0:
        raise _refuse("too_few_rows", f"`{where}` is empty.", where)
    try:
        if fmt == "parquet":
            return _read_parquet(path, where, pick, max_rows, max_bytes)
        table = _read_text_file(path, fmt, where, string_columns)
    except (pa.ArrowException, OSError) as e:
        raise _arrow_error(e, where, fmt) from e
    columns = pick(table.schema)
    _check_row_count(table.num_rows, where, max_rows)
    return table.select(columns.used), columns


# --- Checking columns -------------------------------------------------------------------------


def _strings(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    """Column ``name`` as UTF-8 strings (nulls kept).

    Raises:
        InvalidDataset: ``invalid_column`` (not strings), ``unreadable_text`` (not UTF-8).
    """
    column = table.column(name)
    if pa.types.is_null(column.type):  # every value missing
        return column.cast(pa.string())
    if not _is_string(column.type):
        raise _refuse(
            "invalid_column",
            f"Column `{name}` of `{where}` holds {column.type}, not strings.",
            where,
            column=name,
        )
    bad: list[int] = []
    start = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i, value in enumerate(chunk.cast(pa.binary()).to_pylist()):
                try:
                    (value or b"").decode()
                except UnicodeDecodeError:
                    bad.append(start + i)
        start += len(chunk)
    if bad:
        raise _refuse(
            "unreadable_text",
            f"Column `{name}` of `{where}` is not UTF-8 text in {_records(bad)}; save the file "
            "as UTF-8.",
            where,
            bad,
            column=name,
        )
    return column


def _texts(table: pa.Table, name: str, where: str, max_chars: int) -> pa.ChunkedArray:
    """Column ``name``: a text in every record, none too long."""
    column = _strings(table, name, where)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    empty = np.flatnonzero(pc.fill_null(blank, True).to_numpy())
    if len(empty):
        raise _refuse(
            "empty_text",
            f"Column `{name}` of `{where}` is empty (or blank) in {_records(empty)}: every "
            "record needs its text.",
            where,
            empty,
            column=name,
        )
    lengths = pc.utf8_length(column).to_numpy()
    long = np.flatnonzero(lengths > max_chars)
    if len(long):
        raise _refuse(
            "text_too_long",
            f"Column `{name}` of `{where}` holds texts longer than {max_chars:,} characters "
            f"(the longest: {int(lengths.max()):,}) in {_records(long)}.",
            where,
            long,
            column=name,
            limit_chars=max_chars,
        )
    return column.cast(pa.large_string())  # one type, whichever file it came from


def _distinct(column: pa.ChunkedArray) -> tuple[list[Any], np.ndarray]:
    """The distinct values of ``column`` (nulls aside) and, per record, the index of its value
    (-1: null); per-record work stays in Arrow and numpy."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    values: list[Any] = encoded.dictionary.to_pylist()
    return values, codes


def _labels(table: pa.Table, name: str | None, where: str) -> _Labels:
    """Labels as written: integers (whole floats too), or trimmed strings (blank: no label)."""
    if name is None:
        return _Labels([], np.full(table.num_rows, -1, np.int64))
    column = table.column(name)
    if pa.types.is_floating(column.type):
        values = column.to_numpy()
        present = ~np.isnan(values)
        whole = np.isfinite(values) & (values == np.trunc(values)) & (np.abs(values) < 2**62)
        bad = np.flatnonzero(present & ~whole)
        if len(bad):
            raise _refuse(
                "invalid_label",
                f"Column `{name}` of `{where}` holds labels that are not class indices "
                f"({values[bad[0]]}) in {_records(bad)}: labels are class indices (whole "
                "numbers) or class names.",
                where,
                bad,
                column=name,
            )
        column = pc.cast(column, pa.int64())
    elif pa.types.is_null(column.type) or _is_string(column.type):
        trimmed = pc.utf8_trim_whitespace(_strings(table, name, where))
        column = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, trimmed.type), trimmed)
    elif not pa.types.is_integer(column.type):
        raise _refuse(
            "invalid_column",
            f"Column `{name}` of `{where}` holds {column.type}: labels are class indices "
            "(integers) or class names (strings).",
            where,
            column=name,
        )
    return _Labels(*_distinct(column))


def _split(table: pa.Table, name: str | None, where: str) -> np.ndarray | None:
    """Whether each record is in the test split, by the ``split`` column (None: none)."""
    if name is None:
        return None
    values, codes = _distinct(pc.utf8_lower(pc.utf8_trim_whitespace(_strings(table, name, where))))
    known = [v in SPLITS for v in values]
    bad = np.flatnonzero(np.isin(codes, [i for i, k in enumerate(known) if not k]) | (codes < 0))
    if len(bad):
        value = values[codes[bad[0]]] if codes[bad[0]] >= 0 else None
        raise _refuse(
            "invalid_split",
            f"Column `{name}` of `{where}` holds {value!r} in {_records(bad)}: a record's split "
            "is `train`, or `test` (also `dev` or `validation`).",
            where,
            bad,
            column=name,
        )
    test: np.ndarray = np.array([SPLITS[v] for v in values], dtype=bool)[codes]
    return test


def _read_part(
    path: Path,
    filename: str,
    where: str,
    pick: Callable[[pa.Schema], _Columns],
    string_columns: set[str],
    *,
    test: bool,
    max_rows: int,
    max_text_chars: int,
    max_bytes: int,
) -> _Part:
    """Read and check one file; ``test``: its records are the test split, unless its ``split``
    column says otherwise."""
    table, columns = _read_table(
        path, filename, where, pick, string_columns, max_rows=max_rows, max_bytes=max_bytes
    )
    texts = _texts(table, columns.text, where, max_text_chars)
    pairs = None if columns.pair is None else _texts(table, columns.pair, where, max_text_chars)
    split = _split(table, columns.split, where)
    return _Part(
        where,
        columns,
        texts,
        pairs,
        _labels(table, columns.label, where),
        np.full(len(texts), test) if split is None else split,
    )


# --- Labels -------------------------------------------------------------------------------------


def _check_label_presence(parts: list[_Part]) -> bool:
    """Is the training split labelled? Every test record must be, and either every training
    record or none.

    Raises:
        InvalidDataset: ``missing_label``.
    """
    first = parts[0]
    labelled = bool((first.labels.codes[~first.test] >= 0).any())
    for part in parts:
        gaps = np.flatnonzero((part.labels.codes < 0) & (part.test | labelled))
        if len(gaps) == 0:
            continue
        label = part.columns.label
        split = "test split" if part.test[gaps[0]] else "training split"
        raise _refuse(
            "missing_label",
            f"`{part.where}` has no label in {_records(gaps)}"
            + (f" (column `{label}`)" if label else " (it has no label column)")
            + f": every record of a labelled {split} needs one.",
            part.where,
            gaps,
            column=label,
        )
    return labelled


def _label_indices(
    parts: list[_Part], classes: list[str] | None
) -> tuple[list[np.ndarray], list[str], bool]:
    """Each part's labels as class indices (-1: no label), the class names, and whether they
    were named (by ``classes`` or string labels).

    Raises:
        InvalidDataset: ``invalid_label``, ``unknown_label``.
        LabelsNotZeroBased: integer labels from above 0 without ``classes``.
    """
    values = [v for part in parts for v in part.labels.values]
    if all(isinstance(v, int) or _INTEGER.fullmatch(v) for v in values):
        _check_integer_labels(parts, classes)
        names = classes or [str(i) for i in range(max(int(v) for v in values) + 1)]
        lookups = [[int(v) for v in part.labels.values] for part in parts]
        named = classes is not None
    else:
        names = classes or sorted({str(v) for v in values})
        _check_class_names(parts, names)
        index = {name: i for i, name in enumerate(names)}
        for part in parts:
            unknown = part.labels.rows_where(lambda v: str(v) not in index)
            if len(unknown):
                shown = sorted({str(v) for v in part.labels.values} - set(index))[:SHOWN_ROWS]
                raise _refuse(
                    "unknown_label",
                    f"`{part.where}` has labels that are not in `classes` ({shown}) in "
                    f"{_records(unknown)}; the classes are {names}.",
                    part.where,
                    unknown,
                    column=part.columns.label,
                )
        lookups = [[index[str(v)] for v in part.labels.values] for part in parts]
        named = True
    indices = [
        np.array([*lookup, -1], np.int64)[part.labels.codes]  # -1 (no label) stays -1
        for part, lookup in zip(parts, lookups, strict=True)
    ]
    return indices, names, named


def _check_integer_labels(parts: list[_Part], classes: list[str] | None) -> None:
    """Class indices lie in [0, MAX_CLASSES), below ``len(classes)`` when given, and start at 0
    when not."""
    for part in parts:
        out = part.labels.rows_where(lambda v: not 0 <= int(v) < MAX_CLASSES)
        if len(out):
            raise _refuse(
                "invalid_label",
                f"`{part.where}` has class index {part.labels.value(out[0])} "
                f"in {_records(out)}: class indices lie in [0, {MAX_CLASSES}).",
                part.where,
                out,
                column=part.columns.label,
            )
        if classes is None:
            continue
        unknown = part.labels.rows_where(lambda v: int(v) >= len(classes))
        if len(unknown):
            raise _refuse(
                "unknown_label",
                f"`{part.where}` has class index {part.labels.value(unknown[0])} "
                f"in {_records(unknown)}, but `classes` names {len(classes)} classes (indices 0 "
                f"to {len(classes) - 1}).",
                part.where,
                unknown,
                column=part.columns.label,
            )
    present = [int(v) for part in parts for v in part.labels.values]
    low, high = min(present), max(present)
    if classes is None and low > 0:
        raise LabelsNotZeroBased(
            f"Labels run from {low} to {high}, but class indices start at 0: "
            f"{high - low + 1} classes would be counted as {high + 1}. Subtract {low} from the "
            "labels, or write the class names instead. (Only if lower class indices truly exist "
            "but have no records here, name every class with the `classes` form field, one "
            "name per index from 0.)",
            field=next(part.where for part in parts if part.labels.values),
        )


def _check_class_names(parts: list[_Part], names: list[str]) -> None:
    """String labels become class names: storable, at most 255 characters, not too many."""
    if len(names) > MAX_CLASSES:
        raise _refuse(
            "invalid_label",
            f"The labels name {len(names):,} classes, more than {MAX_CLASSES:,}.",
            parts[0].where,
        )
    for part in parts:
        bad = part.labels.rows_where(
            lambda v: len(str(v)) > 255 or unstorable_character(str(v)) is not None
        )
        if len(bad):
            raise _refuse(
                "invalid_label",
                f"`{part.where}` has labels that cannot be class names (longer than 255 "
                f"characters, or holding U+0000) in {_records(bad)}.",
                part.where,
                bad,
                column=part.columns.label,
            )


# --- An upload ----------------------------------------------------------------------------------


def read_text_upload(
    path: Path,
    filename: str,
    *,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    classes: list[str] | None,
    test_path: Path | None = None,
    test_filename: str | None = None,
    max_rows: int,
    max_text_chars: int,
    max_bytes: int,
) -> TextUpload:
    """Read and check an uploaded text dataset (and its test file) as the module's docstring
    says. Each file holds at most ``max_rows`` records; Parquet text decodes to at most
    ``max_bytes`` bytes per file (CSV and JSON lines hold theirs as written).

    Raises:
        UnsupportedFormat: 415, a file name without a text format's suffix.
        InvalidDataset: 422 with its own ``code``, naming the file, column and records at fault.
        LabelsNotZeroBased: integer labels from above 0, without ``classes``.
    """
    forms = {c for c in (text_column, text_pair_column, label_column) if c is not None}
    known = {*TEXT_COLUMNS, *PAIR_COLUMNS.values(), *LABEL_COLUMNS, SPLIT_COLUMN, *forms}
    limits = {"max_rows": max_rows, "max_text_chars": max_text_chars, "max_bytes": max_bytes}
    first = _read_part(
        path,
        filename,
        "file",
        lambda schema: _file_columns(
            schema,
            text=text_column,
            pair=text_pair_column,
            label=label_column,
            labels_elsewhere=test_path is not None,
        ),
        known,
        test=False,
        **limits,
    )
    parts = [first]
    if test_path is not None:
        parts.append(
            _read_part(
                test_path,
                test_filename or "",
                "test_file",
                lambda schema: _test_file_columns(schema, first.columns, label_column),
                known,
                test=True,
                **limits,
            )
        )
        _check_split_sources(first, parts[1])
    has_test = any(part.test.any() for part in parts)
    _check_counts(parts, has_test)
    labelled = _check_label_presence(parts)
    if not labelled and not has_test:
        raise _refuse(
            "missing_label",
            f"`file` has no labels (label columns are named {', '.join(LABEL_COLUMNS)}, or by "
            "`label_column`). For an unlabelled transfer set, give a labelled test split: "
            "`test_file`, or a `split` column.",
            "file",
            columns=first.columns.used,
        )
    indices, names, named = _label_indices(parts, classes)
    records = _records_of(parts, indices, names, labelled, has_test)
    if records.y_train is not None and len(np.unique(records.y_train)) == 1:
        raise _refuse(
            "single_class",
            f"The training records hold one class only (every label is "
            f"{names[int(records.y_train[0])]!r}): distilling needs at least two classes.",
            "file",
            column=first.columns.label,
        )
    return TextUpload(records, has_test_split=has_test, named_classes=named)


def _check_split_sources(first: _Part, test: _Part) -> None:
    """With a test file, the first file holds only training records and the test file only
    test records, whatever their ``split`` columns say."""
    for part, wrong, name in ((first, first.test, "test"), (test, ~test.test, "train")):
        rows = np.flatnonzero(wrong)
        if len(rows):
            raise _refuse(
                "invalid_split",
                f"`{part.where}` marks {_records(rows)} as `{name}` in its `split` column, but "
                "`test_file` holds the test split: give the test split one way only.",
                part.where,
                rows,
                column=SPLIT_COLUMN,
            )


def _check_counts(parts: list[_Part], has_test: bool) -> None:
    train = int((~parts[0].test).sum())
    if train < MIN_SAMPLES:
        raise _refuse(
            "too_few_rows",
            f"`file` has {train} training records; at least {MIN_SAMPLES} are needed.",
            "file",
        )
    if not has_test and len(parts) > 1:
        raise _refuse("too_few_rows", "`test_file` has no records.", "test_file")


def _records_of(
    parts: list[_Part],
    indices: list[np.ndarray],
    classes: list[str],
    labelled: bool,
    has_test: bool,
) -> TextRecords:
    """The training records (the first file's, but those its split marks as test) and the test
    ones, held out at a fixed seed when the upload has none."""
    texts = pa.chunked_array([c for part in parts for c in part.texts.chunks], pa.large_string())
    pairs = (
        None
        if parts[0].pairs is None
        else pa.chunked_array(
            [c for part in parts if part.pairs is not None for c in part.pairs.chunks],
            pa.large_string(),
        )
    )
    labels = np.concatenate(indices)
    test = np.concatenate([part.test for part in parts])
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    if not has_test:
        train_rows, _, test_rows, _ = holdout_split(train_rows, labels[train_rows])
    return TextRecords(
        texts_train=_take(texts, train_rows),
        pairs_train=None if pairs is None else _take(pairs, train_rows),
        y_train=labels[train_rows] if labelled else None,
        texts_test=_take(texts, test_rows),
        pairs_test=None if pairs is None else _take(pairs, test_rows),
        y_test=labels[test_rows],
        classes=classes,
    )


def _take(column: pa.ChunkedArray, rows: np.ndarray) -> list[str]:
    texts: list[str] = column.take(rows).to_pylist()
    return texts


# --- The stored form ----------------------------------------------------------------------------


def write_records(records: TextRecords, path: Path) -> None:
    """Store ``records``: one Parquet file, training records first, with columns ``text``,
    ``text_pair`` (pairs only), ``label`` (int64, null when unlabelled) and ``split``
    (``train``/``test``); its footer holds their ``TextStats``."""
    n_train, n_test = len(records.texts_train), len(records.texts_test)
    columns = {TEXT: pa.array(records.texts_train + records.texts_test, pa.large_string())}
    if records.pairs_train is not None and records.pairs_test is not None:
        pairs = records.pairs_train + records.pairs_test
        columns[TEXT_PAIR] = pa.array(pairs, pa.large_string())
    train_labels = (
        pa.nulls(n_train, pa.int64())
        if records.y_train is None
        else pa.array(records.y_train, pa.int64())
    )
    columns[LABEL] = pa.concat_arrays([train_labels, pa.array(records.y_test, pa.int64())])
    columns[SPLIT] = pa.array(["train"] * n_train + ["test"] * n_test, pa.string())
    table = pa.table(columns).replace_schema_metadata(
        {STATS_KEY: text_stats(records).model_dump_json()}
    )
    pq.write_table(table, path)


def read_records(path: Path, classes: list[str] | None = None) -> TextRecords:
    """Records stored by ``write_records``; ``classes`` names the label values (default: "0",
    "1"...).

    Raises:
        InvalidDataset: a label has no name in ``classes``.
    """
    table = pq.read_table(path)
    test = pc.equal(table.column(SPLIT), "test").to_numpy()
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    label = table.column(LABEL)
    labels = pc.fill_null(label, -1).to_numpy()
    num_classes = int(labels.max(initial=-1)) + 1
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    elif num_classes > len(classes):
        raise InvalidDataset(
            f"{len(classes)} class names for labels up to {num_classes - 1}.", field="classes"
        )
    texts = table.column(TEXT)
    pairs = table.column(TEXT_PAIR) if TEXT_PAIR in table.column_names else None
    return TextRecords(
        texts_train=_take(texts, train_rows),
        pairs_train=None if pairs is None else _take(pairs, train_rows),
        y_train=None if label.null_count else labels[train_rows],
        texts_test=_take(texts, test_rows),
        pairs_test=None if pairs is None else _take(pairs, test_rows),
        y_test=labels[test_rows],
        classes=classes,
    )


def read_text_stats(path: Path) -> TextStats:
    """The ``TextStats`` of records stored by ``write_records`` (their file's footer only)."""
    return TextStats.model_validate_json(pq.read_schema(path).metadata[STATS_KEY])
