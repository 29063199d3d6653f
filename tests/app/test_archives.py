"""Safe unpacking of uploaded archives: what a model directory needs passes, every attack is
refused while streaming, with a 422 naming the member, and nothing lands outside the folder."""

import hashlib
import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from app.errors import InvalidModel
from app.ml.archives import archive_kind, extract_archive, zip_directory_size, zip_files

Entries = list[tuple[str, bytes]]


def make_zip(path: Path, entries: Entries, method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def refused(
    path: Path, destination: Path, code: str, **limits: int
) -> tuple[InvalidModel, list[Path]]:
    """Unpacking fails with ``code``; returns the error and what the destination holds."""
    with pytest.raises(InvalidModel) as caught:
        extract_archive(path, destination, **limits)
    assert caught.value.code == code, caught.value.detail
    assert str(destination) not in caught.value.detail
    return caught.value, list(destination.rglob("*"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    destination = tmp_path / "out" / "deep"
    destination.mkdir(parents=True)
    return destination


def test_a_zipped_folder_is_unpacked_without_its_top_folder(tmp_path: Path, out: Path) -> None:
    path = make_zip(
        tmp_path / "m.zip",
        [
            ("model/config.json", b"{}"),
            ("model/sub/vocab.txt", b"a\nb\n"),
            ("__MACOSX/model/._config.json", b"resource fork"),
        ],
    )
    root = extract_archive(path, out)
    assert root == out / "model"
    assert (root / "config.json").read_bytes() == b"{}"
    assert (root / "sub" / "vocab.txt").read_bytes() == b"a\nb\n"
    assert not (out / "__MACOSX").exists()


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tars_are_unpacked(tmp_path: Path, out: Path, mode: str) -> None:
    path = make_tar(
        tmp_path / "m.tar",
        [
            (tar_member("config.json"), b"{}"),
            (tar_member("tokenizer", tarfile.DIRTYPE), b""),
            (tar_member("tokenizer/vocab.txt"), b"a\n"),
        ],
        mode,
    )
    assert extract_archive(path, out) == out
    assert (out / "config.json").read_bytes() == b"{}"
    assert (out / "tokenizer" / "vocab.txt").read_bytes() == b"a\n"


def test_kinds_are_recognised_from_the_first_bytes(tmp_path: Path) -> None:
    made: dict[str, Callable[[Path], Path]] = {
        "zip": lambda p: make_zip(p, [("a", b"1")]),
        "tar": lambda p: make_tar(p, [(tar_member("a"), b"1")]),
        "gzip": lambda p: make_tar(p, [(tar_member("a"), b"1")], "w:gz"),
    }
    for kind, make in made.items():
        assert archive_kind(make(tmp_path / kind).read_bytes()[:262]) == kind
    assert archive_kind(b"\x08\x01\x12\x00 an onnx protobuf") is None


def test_zip_bomb_is_refused_by_its_ratio(tmp_path: Path, out: Path) -> None:
    path = make_zip(tmp_path / "bomb.zip", [("model.safetensors", bytes(4 << 20))])
    assert path.stat().st_size < 64 << 10  # 4 MiB of zeros deflate to a few KiB
    error, written = refused(path, out, "archive_too_large")
    assert "model.safetensors" in error.detail and error.extra["member"] == "'model.safetensors'"
    assert sum(p.stat().st_size for p in written if p.is_file()) <= 2 << 20  # stopped early


def test_gzip_bomb_is_refused_by_its_ratio(tmp_path: Path, out: Path) -> None:
    path = make_tar(tmp_path / "bomb.tar.gz", [(tar_member("zeros"), bytes(4 << 20))], "w:gz")
    refused(path, out, "archive_too_large")


def test_too_many_members(tmp_path: Path, out: Path) -> None:
    path = make_zip(tmp_path / "many.zip", [(f"f{i}", b"") for i in range(6)])
    refused(path, out, "archive_too_large", max_members=5)
    tar = make_tar(tmp_path / "many.tar", [(tar_member(f"f{i}"), b"") for i in range(6)])
    refused(tar, out, "archive_too_large", max_members=5)


def test_too_many_bytes(tmp_path: Path, out: Path) -> None:
    entries = [("a", b"x" * 600), ("b", b"y" * 600)]
    path = make_zip(tmp_path / "big.zip", entries, zipfile.ZIP_STORED)
    error, _ = refused(path, out, "archive_too_large", max_total_bytes=1000)
    assert "'b'" in error.detail


@pytest.mark.parametrize(
    "name", ["../x", "model/../../x", "/etc/x", "C:/x", "..\\x", "a\x01b", "a\x7fb"]
)
def test_unsafe_zip_names(tmp_path: Path, out: Path, name: str) -> None:
    path = make_zip(tmp_path / "evil.zip", [("config.json", b"{}"), (name, b"owned")])
    error, _ = refused(path, out, "archive_unsafe")
    assert error.extra["member"] == repr(name)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "x").exists()


def test_nul_in_a_zip_name_is_refused(tmp_path: Path, out: Path) -> None:
    # zipfile cuts a name at NUL when it reads it; the name as stored is what is checked.
    data = make_zip(tmp_path / "a.zip", [("configXjson", b"{}")]).read_bytes()
    path = tmp_path / "nul.zip"
    path.write_bytes(data.replace(b"configXjson", b"config\x00json"))
    refused(path, out, "archive_unsafe")


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a\x1bb"])
def test_unsafe_tar_names(tmp_path: Path, out: Path, name: str) -> None:
    path = make_tar(tmp_path / "evil.tar", [(tar_member(name), b"owned")])
    refused(path, out, "archive_unsafe")
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "x").exists()


@pytest.mark.parametrize(
    ("kind", "linkname", "what"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symbolic link"),
        (tarfile.SYMTYPE, "config.json", "symbolic link"),  # even one that stays inside
        (tarfile.LNKTYPE, "config.json", "hard link"),
        (tarfile.CHRTYPE, "", "device"),
        (tarfile.BLKTYPE, "", "device"),
        (tarfile.FIFOTYPE, "", "FIFO"),
    ],
)
def test_links_devices_and_fifos_in_tar(
    tmp_path: Path, out: Path, kind: bytes, linkname: str, what: str
) -> None:
    path = make_tar(
        tmp_path / "evil.tar",
        [(tar_member("config.json"), b"{}"), (tar_member("link", kind, linkname), b"")],
        "w:gz",
    )
    error, written = refused(path, out, "archive_unsafe")
    assert what in error.detail and "'link'" in error.detail
    assert all(not p.is_symlink() and (p.is_file() or p.is_dir()) for p in written)


def test_symlink_in_zip(tmp_path: Path, out: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("config.json")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    error, _ = refused(path, out, "archive_unsafe")
    assert "symbolic link" in error.detail
    assert not (out / "config.json").is_symlink()


def test_duplicate_names(tmp_path: Path, out: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = make_zip(tmp_path / "dup.zip", [("config.json", b"{}"), ("config.json", b"[]")])
    refused(path, out, "archive_unsafe")
    tar = make_tar(tmp_path / "dup.tar", [(tar_member("a"), b"1"), (tar_member("./a"), b"2")])
    refused(tar, out, "archive_unsafe")


def test_a_file_used_as_a_folder(tmp_path: Path, out: Path) -> None:
    path = make_zip(tmp_path / "clash.zip", [("a", b"1"), ("a/b", b"2")])
    refused(path, out, "archive_unsafe")


def test_central_directory_larger_than_its_entries(tmp_path: Path, out: Path) -> None:
    path = tmp_path / "padded.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("config.json")
        info.comment = b"x" * 8192  # central directory bytes no real entry needs
        archive.writestr(info, "{}")
    refused(path, out, "archive_unsafe")


def test_encrypted_and_exotic_methods_are_refused(tmp_path: Path, out: Path) -> None:
    path = make_zip(tmp_path / "bz.zip", [("config.json", b"{}")], zipfile.ZIP_BZIP2)
    error, _ = refused(path, out, "archive_unsafe")
    assert "stored or deflated" in error.detail
    data = bytearray(make_zip(tmp_path / "plain.zip", [("config.json", b"{}")]).read_bytes())
    for at in (6, data.rfind(b"PK\x01\x02") + 8):  # the flag bits, local and central
        data[at] |= 0x1
    (tmp_path / "enc.zip").write_bytes(bytes(data))
    refused(tmp_path / "enc.zip", out, "archive_unsafe")


def test_corrupt_and_foreign_files(tmp_path: Path, out: Path) -> None:
    data = make_zip(tmp_path / "ok.zip", [("config.json", b"{}" * 1000)]).read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.zip", out, "archive_unreadable")
    (tmp_path / "not.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    refused(tmp_path / "not.gz", out, "archive_unreadable")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07" + b"\x00" * 300)
    refused(tmp_path / "model.onnx", out, "archive_unreadable")


def test_zip_files_is_reproducible_and_follows_links(tmp_path: Path, out: Path) -> None:
    source = tmp_path / "snapshot"
    (source / "sub").mkdir(parents=True)
    (tmp_path / "blob").write_bytes(b"weights")
    (source / "model.safetensors").symlink_to(tmp_path / "blob")
    (source / "sub" / "vocab.txt").write_text("a\n")
    digests = set()
    for name, order in (("one.zip", 1), ("two.zip", -1)):
        zip_files(source, ["model.safetensors", "sub/vocab.txt"][::order], tmp_path / name)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    root = extract_archive(tmp_path / "one.zip", out)
    assert (root / "model.safetensors").read_bytes() == b"weights"
    assert not (root / "model.safetensors").is_symlink()


def test_zip_directory_size_is_read_from_the_end_record(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_zip(tmp_path / "a.zip", [(f"file-{i}.txt", b"x") for i in range(7)])
    entries, central_bytes = zip_directory_size(path)
    assert entries == 7
    assert central_bytes == sum(46 + len(f"file-{i}.txt") for i in range(7))
    # A zip64 end record, as zipfile writes past 65,535 entries (here: past 1).
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
        zip64 = make_zip(tmp_path / "z64.zip", [("a", b"1"), ("b", b"2"), ("c", b"3")])
    assert b"PK\x06\x06" in zip64.read_bytes()
    assert zip_directory_size(zip64)[0] == 3
    assert extract_archive(zip64, out) == out and (out / "c").read_bytes() == b"3"
