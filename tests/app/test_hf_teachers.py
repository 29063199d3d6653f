"""Hugging Face teachers: an archive of a ``save_pretrained`` directory is inspected into a text
signature and opened into a backend that answers as transformers does; everything that would
run uploaded code, or does not fit, is refused before anything is stored."""

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from httpx import Response
from safetensors.torch import load_file, save_file

from app.errors import InvalidModel
from app.ml.signature import TextPreprocessing
from app.ml.teacher_formats import FORMATS, TeacherDeclarations, TeacherInfo, inspect_teacher
from app.ml.teacher_formats.huggingface import HuggingFaceTeacher, takes_token_types
from app.ml.text import TextTokenizer
from app.storage import get_store
from tests.helpers.text_teachers import (
    WORDS,
    build_tokenizer,
    synthetic_sentiment,
    tar_dir,
    tiny_bert_dir,
    zip_dir,
)


class WritesAFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def upload(client: TestClient, path: Path, **data: str) -> Response:
    with open(path, "rb") as f:
        return client.post("/v1/teachers", files={"file": (path.name, f)}, data=data)


def stored_files() -> set[Path]:
    return {p for p in get_store().root.rglob("*") if p.is_file()}


def refused(client: TestClient, path: Path, status: int, code: str) -> dict[str, Any]:
    """Uploading ``path`` is refused with ``status`` and ``code``, and nothing of it is kept."""
    before = stored_files()
    response = upload(client, path)
    assert response.status_code == status, response.text
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code, problem
    assert stored_files() == before
    assert client.get("/v1/teachers").json()["items"] == []
    return problem


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def bert_parameters(directory: Path) -> int:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    """An untrained tiny BERT directory to alter (labels left as transformers names them)."""
    return tiny_bert_dir(tmp_path / "bert")


@pytest.fixture(scope="module")
def text_teacher_info(text_teacher_zip: Path) -> TeacherInfo:
    return inspect_teacher(text_teacher_zip, text_teacher_zip.name, None)


def test_zipped_teacher_is_inspected(
    client: TestClient, text_teacher_dir: Path, text_teacher_zip: Path
) -> None:
    response = upload(client, text_teacher_zip)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "huggingface"
    signature = body["signature"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in signature["inputs"]] == [
        ("input_ids", "INT64", ["sequence"]),
        ("attention_mask", "INT64", ["sequence"]),
        ("token_type_ids", "INT64", ["sequence"]),
    ]
    assert signature["preprocessing"] == {
        "kind": "text",
        "tokenizer": "tokenizer.json",
        "max_length": 128,  # tokenizer_config.json's model_max_length (positions: 128 too)
        "pad_token_id": 0,
        "pairs": False,
    }
    assert signature["outputs"][0]["classes"] == ["negative", "positive"]
    assert body["num_classes"] == 2 and body["scores_choice"]["output"] == "logits"
    assert body["parameter_count"] == bert_parameters(text_teacher_dir)
    assert [layer["name"] for layer in body["feature_layers"]] == [
        "hidden_states.0",
        "hidden_states.1",
        "hidden_states.2",
    ]
    assert {layer["shape"][0] for layer in body["feature_layers"]} == {32}
    architecture = body["architecture"]
    assert architecture["model_type"] == "bert" and architecture["hidden_size"] == 32
    assert architecture["num_hidden_layers"] == 2 and architecture["vocab_size"] == len(WORDS) + 5
    assert architecture["distill"] == {"max_positions": 128}
    assert client.get(f"/v1/teachers/{body['id']}").json()["sha256"] == body["sha256"]


@pytest.mark.parametrize(("kind", "prefix"), [("zip", "model/"), ("tar.gz", "")])
def test_tarred_and_folder_prefixed_teachers(
    client: TestClient, bert: Path, tmp_path: Path, kind: str, prefix: str
) -> None:
    archive = tmp_path / f"teacher.{kind}"
    (zip_dir if kind == "zip" else tar_dir)(bert, archive, prefix=prefix)
    response = upload(client, archive)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "huggingface"
    assert body["signature"]["outputs"][0]["classes"] is None  # LABEL_0, LABEL_1: no names
    assert body["parameter_count"] == bert_parameters(bert)


def test_sharded_weights(tmp_path: Path, bert: Path) -> None:
    from transformers import BertForSequenceClassification

    sharded = tmp_path / "sharded"
    BertForSequenceClassification.from_pretrained(bert).save_pretrained(
        sharded, max_shard_size="40KB"
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((bert / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    archive = zip_dir(sharded, tmp_path / "sharded.zip")
    info = inspect_teacher(archive, archive.name, None)
    assert info.parameter_count == bert_parameters(bert)


def test_pickled_weights_are_refused_unread(client: TestClient, bert: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (bert / "model.safetensors").unlink()
    torch.save({"hook": WritesAFileWhenUnpickled(marker)}, bert / "pytorch_model.bin")
    archive = zip_dir(bert, tmp_path / "pickled.zip")
    problem = refused(client, archive, 415, "pickle_refused")
    assert "pytorch_model.bin" in problem["detail"]
    assert (
        "AutoModelForSequenceClassification.from_pretrained(dir).save_pretrained(dir)"
        in (problem["detail"])
    )
    assert not marker.exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused(client: TestClient, bert: Path, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    (bert / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    edit_json(bert / where, auto_map={"AutoModelForSequenceClassification": "modeling_evil.Evil"})
    problem = refused(client, zip_dir(bert, tmp_path / "t.zip"), 422, "remote_code")
    assert where in problem["detail"] and "auto_map" in problem["detail"]
    assert not marker.exists()


def test_unknown_model_type_is_refused(client: TestClient, bert: Path, tmp_path: Path) -> None:
    edit_json(bert / "config.json", model_type="my-own-bert")
    archive = zip_dir(bert, tmp_path / "t.zip")
    assert "my-own-bert" in refused(client, archive, 422, "unknown_model_type")["detail"]


def test_only_sequence_classifiers(client: TestClient, bert: Path, tmp_path: Path) -> None:
    edit_json(bert / "config.json", architectures=["BertForMaskedLM"])
    archive = zip_dir(bert, tmp_path / "t.zip")
    detail = refused(client, archive, 422, "not_a_sequence_classifier")["detail"]
    assert "ForSequenceClassification" in detail and "BertForMaskedLM" in detail


def test_tokenizer_that_is_not_the_models(client: TestClient, bert: Path, tmp_path: Path) -> None:
    # More words than the model has embeddings for.
    build_tokenizer([*WORDS, "extra", "words"]).save(str(bert / "tokenizer.json"))
    archive = zip_dir(bert, tmp_path / "t.zip")
    detail = refused(client, archive, 422, "tokenizer_mismatch")["detail"]
    assert f"hold {len(WORDS) + 5}" in detail


def test_weights_that_do_not_fit(client: TestClient, bert: Path, tmp_path: Path) -> None:
    weights = load_file(str(bert / "model.safetensors"))
    del weights["classifier.bias"]
    save_file(weights, str(bert / "model.safetensors"))
    archive = zip_dir(bert, tmp_path / "t.zip")
    detail = refused(client, archive, 422, "weights_mismatch")["detail"]
    assert "missing ['classifier.bias']" in detail


def test_weights_of_other_shapes(bert: Path, tmp_path: Path) -> None:
    edit_json(bert / "config.json", intermediate_size=48)
    archive = zip_dir(bert, tmp_path / "t.zip")
    with pytest.raises(InvalidModel, match="of other shapes") as caught:
        inspect_teacher(archive, archive.name, None)
    assert caught.value.code == "weights_mismatch"
    assert "bert.encoder.layer.0.intermediate.dense.weight: [64, 32] for [48, 32]" in (
        caught.value.detail
    )


def test_weights_that_are_not_finite(bert: Path, tmp_path: Path) -> None:
    weights = load_file(str(bert / "model.safetensors"))
    weights["classifier.weight"][0, 0] = float("nan")
    save_file(weights, str(bert / "model.safetensors"))
    archive = zip_dir(bert, tmp_path / "t.zip")
    with pytest.raises(InvalidModel, match=r"NaN or infinite.*classifier\.weight"):
        inspect_teacher(archive, archive.name, None)


def _traversal(bert: Path, path: Path) -> Path:
    zip_dir(bert, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("../../escaped.txt", "owned")
    return path


def _symlink(bert: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            archive.add(bert / name, name)
        link = tarfile.TarInfo("tokenizer_config.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return path


def _bomb(bert: Path, path: Path) -> Path:
    zip_dir(bert, path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("padding.bin", bytes(8 << 20))
    return path


@pytest.mark.parametrize(
    ("make", "code"),
    [(_traversal, "archive_unsafe"), (_symlink, "archive_unsafe"), (_bomb, "archive_too_large")],
)
def test_archive_attacks_are_refused(
    client: TestClient, bert: Path, tmp_path: Path, make: Any, code: str
) -> None:
    problem = refused(client, make(bert, tmp_path / "evil.zip"), 422, code)
    assert "member" in problem and str(tmp_path) not in json.dumps(problem)
    assert not list(tmp_path.parent.rglob("escaped.txt"))


def test_backend_answers_as_transformers_does(
    text_teacher_dir: Path, text_teacher_zip: Path, text_teacher_info: TeacherInfo
) -> None:
    from transformers import BertForSequenceClassification

    info = text_teacher_info
    backend = FORMATS["huggingface"].open(
        text_teacher_zip, info.signature, info.architecture, torch.device("cpu")
    )
    assert isinstance(backend, HuggingFaceTeacher)
    texts, labels = synthetic_sentiment(200, seed=1)  # not the training sentences
    records, truncated = backend.tokenizer.encode(texts)
    assert truncated == 0 and backend.tokenizer.max_length == 128
    logits = backend.logits(records, batch_size=64)
    reference = BertForSequenceClassification.from_pretrained(text_teacher_dir).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in records.arrays.items()}).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)
    assert (logits.argmax(1) == np.array(labels)).mean() > 0.9
    first, last = backend.features(records[np.arange(8)], ["hidden_states.0", "hidden_states.2"])
    assert first.shape == last.shape == (8, records[np.arange(8)].input_ids.shape[1], 32)
    assert first.dtype == np.float32
    assert set(backend.weights()) == set(reference.state_dict())
    with pytest.raises(TypeError, match="tokenised records"):
        backend.run(np.zeros((2, 5), np.float32), None)
    with pytest.raises(ValueError, match="not a layer"):
        backend.run(records[np.arange(2)], ["bert.pooler"])


def test_backend_latency(text_teacher_zip: Path, text_teacher_info: TeacherInfo) -> None:
    info = text_teacher_info
    backend = FORMATS["huggingface"].open(
        text_teacher_zip, info.signature, info.architecture, torch.device("cpu")
    )
    assert backend.latency_ms() > 0


def test_archives_are_recognised_as_hugging_face(text_teacher_dir: Path, tmp_path: Path) -> None:
    for archive in (
        zip_dir(text_teacher_dir, tmp_path / "t.zip"),
        tar_dir(text_teacher_dir, tmp_path / "t.tar.gz"),
    ):
        head = archive.read_bytes()[:262]
        chosen = next(f for f in FORMATS.values() if f.sniff(head, archive.stat().st_size))
        assert chosen is FORMATS["huggingface"]
    plain = tmp_path / "t.tar"
    with tarfile.open(plain, "w") as archive:
        archive.add(text_teacher_dir / "config.json", "config.json")
    assert FORMATS["huggingface"].sniff(plain.read_bytes()[:262], plain.stat().st_size)


def test_declared_text_preprocessing(text_teacher_zip: Path) -> None:
    def declared(preprocessing: dict[str, Any]) -> TeacherInfo:
        return inspect_teacher(
            text_teacher_zip,
            text_teacher_zip.name,
            None,
            TeacherDeclarations.model_validate({"preprocessing": preprocessing}),
        )

    info = declared({"kind": "text", "max_length": 64})
    # What was not declared stays as inspection found it.
    assert info.signature.preprocessing == TextPreprocessing(max_length=64, pad_token_id=0)
    with pytest.raises(InvalidModel, match="128 tokens"):
        declared({"kind": "text", "max_length": 200})
    with pytest.raises(InvalidModel, match="takes text"):
        declared({"kind": "image"})


def test_positions_after_the_padding_id_and_one_segment(tmp_path: Path) -> None:
    """RoBERTa numbers positions from its padding id + 1, so 66 position embeddings take
    records of 64 tokens; it has one segment, so it is not fed token_type_ids."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = build_tokenizer(WORDS)
    config = RobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
        type_vocab_size=1,
    )
    directory = tmp_path / "roberta"
    RobertaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    archive = zip_dir(directory, tmp_path / "roberta.zip")
    info = inspect_teacher(archive, archive.name, None)
    assert [t.name for t in info.signature.inputs] == ["input_ids", "attention_mask"]
    assert info.signature.preprocessing == TextPreprocessing(max_length=64, pad_token_id=1)
    assert info.architecture is not None and info.architecture["distill"]["max_positions"] == 64
    with pytest.raises(InvalidModel, match="64 tokens"):
        inspect_teacher(
            archive,
            archive.name,
            None,
            TeacherDeclarations.model_validate(
                {"preprocessing": {"kind": "text", "max_length": 66}}
            ),
        )


def test_token_types_follow_the_model_class() -> None:
    from transformers import BertConfig, DistilBertConfig

    assert takes_token_types(BertConfig())  # two segments
    assert not takes_token_types(BertConfig(type_vocab_size=1))
    assert not takes_token_types(DistilBertConfig())  # its forward takes none


def test_too_many_labels_are_refused_before_the_config_is_built(bert: Path, tmp_path: Path) -> None:
    config = json.loads((bert / "config.json").read_text())
    for key in ("id2label", "label2id"):
        config.pop(key, None)
    (bert / "config.json").write_text(json.dumps({**config, "num_labels": 10**9}))
    archive = zip_dir(bert, tmp_path / "t.zip")
    with pytest.raises(InvalidModel, match="at most 100000"):
        inspect_teacher(archive, archive.name, None)


def test_tokenizer_built_from_its_vocabulary(bert: Path, tmp_path: Path) -> None:
    vocabulary = sorted(build_tokenizer(WORDS).get_vocab().items(), key=lambda item: item[1])
    (bert / "tokenizer.json").unlink()
    (bert / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocabulary))
    (bert / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "model_max_length": 100})
    )
    archive = zip_dir(bert, tmp_path / "t.zip")
    info = inspect_teacher(archive, archive.name, None)
    assert info.signature.preprocessing == TextPreprocessing(max_length=100, pad_token_id=0)
    backend = FORMATS["huggingface"].open(
        archive, info.signature, info.architecture, torch.device("cpu")
    )
    records, _ = backend.tokenizer.encode(["the movie was good"])
    # The same ids as the tokenizer.json the vocabulary came from.
    expected, _ = TextTokenizer(build_tokenizer(WORDS), 128, 0).encode(["the movie was good"])
    np.testing.assert_array_equal(records.input_ids, expected.input_ids)


def test_a_refusal_never_leaves_a_500(client: TestClient, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    (tmp_path / "x.tar.gz").write_bytes(buffer.getvalue())
    refused(client, tmp_path / "x.tar.gz", 415, "unsupported_format")
    (tmp_path / "y.gz").write_bytes(b"\x1f\x8b" + bytes(64))
    refused(client, tmp_path / "y.gz", 422, "archive_unreadable")


HUB_REPO, HUB_COMMIT = "distill-tests/tiny-bert", "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, model: Path, marker: Path) -> None:
    """``model`` as huggingface_hub caches a repository's snapshot: blobs named by digest,
    the snapshot's files linking to them, ``refs/main`` naming its commit. The snapshot also
    holds what a reference never takes: a pickle, and code."""
    repo = root / f"models--{HUB_REPO.replace('/', '--')}"
    snapshot, blobs = repo / "snapshots" / HUB_COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    torch.save({"hook": WritesAFileWhenUnpickled(marker)}, model / "pytorch_model.bin")
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    for file in model.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bert: Path) -> Path:
    """An offline Hugging Face cache holding ``bert`` as ``HUB_REPO``; returns the marker a
    pickle or code from it would write."""
    from huggingface_hub import constants

    cache, marker = tmp_path / "hf-cache", tmp_path / "pwned"
    hub_cache(cache, bert, marker)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both when imported: its constants are what it consults.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return marker


def test_hub_reference(client: TestClient, bert: Path, offline_hub: Path) -> None:
    response = client.post("/v1/teachers", data={"reference": f"hf:{HUB_REPO}@main"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "huggingface" and body["name"] == f"hf:{HUB_REPO}@main"
    assert body["parameter_count"] == bert_parameters(bert)
    expected_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    hub = body["architecture"]["distill"]["hub"]
    assert hub == {
        "repo_id": HUB_REPO,
        "revision": "main",
        "commit": HUB_COMMIT,
        "files": {
            name: hashlib.sha256((bert / name).read_bytes()).hexdigest() for name in expected_files
        },
    }
    assert not offline_hub.exists()
    # The same commit named by its hash is the same archive, byte for byte.
    again = client.post("/v1/teachers", data={"reference": f"hf:{HUB_REPO}@{HUB_COMMIT}"})
    assert again.status_code == 201, again.text
    assert again.json()["sha256"] == body["sha256"]
    with zipfile.ZipFile(get_store().path(f"teachers/{body['id']}/teacher.huggingface")) as stored:
        assert set(stored.namelist()) == expected_files


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"reference": "hf:distill-tests/missing@main"}, "reference_unavailable"),
        ({"reference": f"hf:{HUB_REPO}@v9"}, "reference_unavailable"),
        ({"reference": f"hf:{HUB_REPO}@../../../etc"}, "invalid_input"),
        ({"reference": "https://example.com/model.zip"}, "invalid_input"),
        ({}, "invalid_input"),
    ],
)
def test_unusable_hub_references(
    client: TestClient, offline_hub: Path, data: dict[str, str], code: str
) -> None:
    response = client.post("/v1/teachers", data=data)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert response.json()["field"] in ("reference", "file")


def test_file_and_reference_together(
    client: TestClient, offline_hub: Path, text_teacher_zip: Path
) -> None:
    with open(text_teacher_zip, "rb") as f:
        response = client.post(
            "/v1/teachers",
            files={"file": ("t.zip", f)},
            data={"reference": f"hf:{HUB_REPO}@main"},
        )
    assert response.status_code == 422 and response.json()["field"] == "file"


def test_hub_model_too_large_is_refused_before_download(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.file_download import DryRunFileInfo

    downloads: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> Any:
        if not kwargs.get("dry_run"):
            downloads.append(kwargs)
            raise AssertionError("a model over the limit is never downloaded")
        return [
            DryRunFileInfo(
                commit_hash=HUB_COMMIT,
                file_size=3 << 30,
                filename="model.safetensors",
                local_path="",
                is_cached=False,
                will_download=True,
            )
        ]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    response = client.post("/v1/teachers", data={"reference": f"hf:{HUB_REPO}@main"})
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large" and downloads == []
