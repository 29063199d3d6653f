"""Uploaded archives (``.zip``, ``.tar``, ``.tar.gz``) unpacked safely into a directory.

Every member is checked while the archive streams, never on its headers alone: names (no ``..``,
absolute paths, drive letters, backslashes, control characters or duplicates), kinds (regular
files and folders only: no links, devices or FIFOs), the member count, the bytes actually written
and the compression ratio (zip bombs). A zip's central directory is sized from its end record
before ``zipfile`` parses it, so an archive of millions of tiny entries is refused unread.
Refusals are 422s naming the member, never a server path.

The standard library's ``tarfile`` ``filter="data"`` is not used: it extracts whatever the
headers say within the destination, while here nothing but plain files and folders is written,
and only as many bytes as the limits allow.
"""

import errno
import gzip
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from app.errors import InvalidModel

ArchiveKind = Literal["zip", "gzip", "tar"]
# What a sniffer must read to recognise every kind: a tar's magic ends at byte 262.
SNIFF_BYTES = 262
MAX_TOTAL_BYTES = 4 << 30
MAX_MEMBERS = 1_000
# Uncompressed bytes per compressed byte; checked once a member (a zip's) or the stream (a
# gzip's) has given more than RATIO_FLOOR_BYTES, so that small, very compressible files pass.
MAX_RATIO = 100.0
RATIO_FLOOR_BYTES = 1 << 20
# A zip's central directory bytes per allowed member: far more than any real entry's name and
# extra fields, far less than what a directory of millions of entries takes.
CENTRAL_BYTES_PER_MEMBER = 4096
MAX_NAME_BYTES = 255  # per path component
CHUNK = 1 << 20
# Folders that archivers add and that hold nothing of the model (macOS resource forks).
SKIPPED_FOLDERS = frozenset({"__MACOSX"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


def archive_kind(head: bytes) -> ArchiveKind | None:
    """What archive a file starting with ``head`` (its first ``SNIFF_BYTES``) is, if any."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _shown(name: str) -> str:
    """A member's name as error messages quote it (control characters escaped, at most 200)."""
    text = repr(name)
    return text if len(text) <= 200 else text[:197] + "..."


def unsafe(detail: str, name: str | None = None) -> InvalidModel:
    """The 422 for an archive Distill will not unpack (code ``archive_unsafe``)."""
    extra = {} if name is None else {"member": _shown(name)}
    return InvalidModel(detail, code="archive_unsafe", field="file", **extra)


def too_large(detail: str, name: str | None = None) -> InvalidModel:
    """The 422 for an archive past a size limit (code ``archive_too_large``)."""
    extra = {} if name is None else {"member": _shown(name)}
    return InvalidModel(detail, code="archive_too_large", field="file", **extra)


@dataclass
class _Extraction:
    """The limits and what has been unpacked so far into ``root``."""

    root: Path
    max_total_bytes: int
    max_members: int
    max_ratio: float
    members: int = 0
    total_bytes: int = 0
    names: set[PurePosixPath] = field(default_factory=set)

    def member(self, name: str) -> PurePosixPath | None:
        """Count a member and check its name; its relative path, or None for one to skip.

        Raises:
            InvalidModel: ``archive_too_large`` past ``max_members``; ``archive_unsafe`` for a
                name that is absolute, climbs out (``..``), names a drive, holds a backslash or a
                control character, has a component over 255 bytes, or repeats another.
        """
        self.members += 1
        if self.members > self.max_members:
            raise too_large(f"The archive has more than {self.max_members} members.")
        if _CONTROL.search(name):
            raise unsafe(f"The member {_shown(name)} has a control character in its name.", name)
        if name.startswith("/") or _DRIVE.match(name) or "\\" in name:
            raise unsafe(
                f"The member {_shown(name)} has an absolute path, a drive or a backslash: "
                "archives must hold relative paths with `/`.",
                name,
            )
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise unsafe(f"The member {_shown(name)} climbs out of the archive (`..`).", name)
        if not parts:
            raise unsafe(f"The member {_shown(name)} has no name.", name)
        if any(len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for p in parts):
            raise unsafe(
                f"The member {_shown(name)} has a path component over {MAX_NAME_BYTES} bytes.",
                name,
            )
        path = PurePosixPath(*parts)
        if path in self.names:
            raise unsafe(f"The member {_shown(name)} appears twice.", name)
        self.names.add(path)
        return None if parts[0] in SKIPPED_FOLDERS else path

    def folder(self, path: PurePosixPath, name: str) -> None:
        try:
            (self.root / path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(e, name) from e

    def write(
        self,
        source: IO[bytes],
        path: PurePosixPath,
        name: str,
        declared_size: int,
        compressed: int | Callable[[], int],
    ) -> None:
        """Stream one file's bytes to ``path``, counting them against the limits;
        ``compressed`` is how many compressed bytes they come from (a callable: so far).

        Raises:
            InvalidModel: ``archive_too_large`` past the total or the ratio limit (declared or
                actual), ``archive_unsafe`` for a path another member holds as a file or folder.
        """
        if self.total_bytes + declared_size > self.max_total_bytes:
            raise self._over_total(name)
        target = self.root / path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:  # "x": never over another member
                written = 0
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    written += len(chunk)
                    self.total_bytes += len(chunk)
                    if self.total_bytes > self.max_total_bytes:
                        raise self._over_total(name)
                    so_far = compressed if isinstance(compressed, int) else compressed()
                    if written > RATIO_FLOOR_BYTES and written > self.max_ratio * max(1, so_far):
                        raise too_large(
                            f"The member {_shown(name)} decompresses more than "
                            f"{self.max_ratio:g} times its compressed size (a zip bomb?).",
                            name,
                        )
                    out.write(chunk)
        except OSError as e:  # a corrupt gzip stream (BadGzipFile) is one too
            raise _write_error(e, name) from e

    def _over_total(self, name: str) -> InvalidModel:
        return too_large(
            f"The archive unpacks to more than {self.max_total_bytes:,} bytes (at member "
            f"{_shown(name)}).",
            name,
        )


def _write_error(error: OSError, name: str) -> InvalidModel:
    """A member that cannot be written: it collides with another (a file used as a folder, or
    the reverse), or the system refuses it (its errno name only: the text holds a path)."""
    if isinstance(error, FileExistsError | NotADirectoryError | IsADirectoryError):
        return unsafe(f"The member {_shown(name)} collides with another member's path.", name)
    reason = errno.errorcode.get(error.errno or 0, type(error).__name__)
    return InvalidModel(
        f"The member {_shown(name)} could not be unpacked ({reason}).",
        code="archive_unreadable",
        field="file",
        member=_shown(name),
    )


def zip_directory_size(path: Path) -> tuple[int, int]:
    """The entry count and central directory bytes a zip's end record (zip64 or not) declares,
    read before ``zipfile`` parses the directory (it holds every entry in memory).

    Raises:
        InvalidModel: ``archive_unreadable`` when there is no readable end record.
    """
    with open(path, "rb") as f:
        return _zip_directory(f, path.stat().st_size)


def _zip_directory(f: IO[bytes], size: int) -> tuple[int, int]:
    tail_size = min(size, _EOCD.size + 0xFFFF)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise _unreadable("zip")
    _, _, _, _, entries, central_size, _, _ = _EOCD.unpack_from(tail, at)
    if entries == 0xFFFF or central_size == 0xFFFFFFFF:
        locator_at = size - tail_size + at - _ZIP64_LOCATOR.size
        if locator_at < 0:
            raise _unreadable("zip")
        f.seek(locator_at)
        signature, _, record_at, _ = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
        f.seek(record_at)
        record = f.read(_ZIP64_EOCD.size)
        if signature != b"PK\x06\x07" or len(record) < _ZIP64_EOCD.size:
            raise _unreadable("zip")
        _, _, _, _, _, _, _, entries, central_size, _ = _ZIP64_EOCD.unpack(record)
    return entries, central_size


def _unreadable(kind: str) -> InvalidModel:
    return InvalidModel(
        f"The file cannot be read as a {kind} archive (truncated or corrupt).",
        code="archive_unreadable",
        field="file",
    )


def _extract_zip(path: Path, extraction: _Extraction) -> None:
    entries, central_size = zip_directory_size(path)
    if entries > extraction.max_members:
        raise too_large(f"The archive has more than {extraction.max_members} members.")
    if central_size > max(entries, 1) * CENTRAL_BYTES_PER_MEMBER:
        raise unsafe("The zip's central directory is larger than its entries can fill.")
    with zipfile.ZipFile(path) as archive:
        offsets: set[int] = set()
        for info in archive.infolist():
            # orig_filename: zipfile cuts `filename` at a NUL, which must be seen to be refused.
            name = info.orig_filename
            member = extraction.member(name)
            if info.header_offset in offsets:
                raise unsafe(f"The member {_shown(name)} overlaps another member's data.", name)
            offsets.add(info.header_offset)
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                raise unsafe(f"The member {_shown(name)} is {what}.", name)
            if info.flag_bits & 0x1:
                raise unsafe(f"The member {_shown(name)} is encrypted.", name)
            if info.compress_type not in _ZIP_METHODS:
                raise unsafe(
                    f"The member {_shown(name)} is compressed with method {info.compress_type}; "
                    "zip members must be stored or deflated.",
                    name,
                )
            if member is None:
                continue
            if info.is_dir():
                extraction.folder(member, name)
                continue
            with archive.open(info) as source:
                extraction.write(source, member, name, info.file_size, info.compress_size)


class _CountingReader:
    """A gzip stream read through: counts the bytes it gives, and refuses to give more than
    ``limit`` of them or more than ``max_ratio`` per compressed byte (``raw.tell()``), so that
    nothing ``tarfile`` reads on its own (headers, extended headers) escapes the limits."""

    def __init__(self, raw: IO[bytes], limit: int, max_ratio: float) -> None:
        self.raw, self.limit, self.max_ratio = raw, limit, max_ratio
        self.stream = gzip.GzipFile(fileobj=raw, mode="rb")
        self.given = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(CHUNK if n < 0 else min(n, CHUNK))
        self.given += len(data)
        if self.given > self.limit:
            raise too_large(f"The archive unpacks to more than {self.limit:,} bytes.")
        if self.given > RATIO_FLOOR_BYTES and self.given > self.max_ratio * max(1, self.raw.tell()):
            raise too_large(
                f"The archive decompresses more than {self.max_ratio:g} times its size (a gzip "
                "bomb?)."
            )
        return data


def _tar_type(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    return "not a regular file or folder"


def _extract_tar(path: Path, extraction: _Extraction, compressed: bool) -> None:
    with open(path, "rb") as raw:
        # Tar headers and padding: a bound on what reading the members themselves cannot count.
        limit = extraction.max_total_bytes + (extraction.max_members + 2) * 3 * tarfile.BLOCKSIZE
        source: IO[bytes] = (
            _CountingReader(raw, limit, extraction.max_ratio)  # type: ignore[assignment]
            if compressed
            else raw
        )
        with tarfile.open(fileobj=source, mode="r|") as archive:
            for member in archive:
                name = member.name
                relative = extraction.member(name)
                if not (member.isreg() or member.isdir()) or member.issparse():
                    raise unsafe(f"The member {_shown(name)} is {_tar_type(member)}.", name)
                if relative is None:
                    continue
                if member.isdir():
                    extraction.folder(relative, name)
                    continue
                data = archive.extractfile(member)
                if data is None:  # a regular file always has a reader; kept for the type
                    raise unsafe(f"The member {_shown(name)} cannot be read.", name)
                extraction.write(data, relative, name, member.size, raw.tell)


def extract_archive(
    path: Path,
    destination: Path,
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
    max_ratio: float = MAX_RATIO,
) -> Path:
    """Unpack the zip, tar or gzipped tar at ``path`` into the empty folder ``destination``;
    returns the folder holding its content: ``destination``, or the one folder the archive
    holds at its top (users archive the folder itself). ``__MACOSX/`` is skipped.

    Raises:
        InvalidModel: 422, with code ``archive_unsafe`` (a name, kind or layout that is not
            plain relative files and folders), ``archive_too_large`` (past ``max_total_bytes``
            unpacked, ``max_members`` members, or ``max_ratio`` uncompressed bytes per compressed
            byte) or ``archive_unreadable`` (not an archive of these kinds, or corrupt).
    """
    with open(path, "rb") as f:
        kind = archive_kind(f.read(SNIFF_BYTES))
    if kind is None:
        raise InvalidModel(
            "The file is not a zip, tar or tar.gz archive.", code="archive_unreadable", field="file"
        )
    extraction = _Extraction(destination, max_total_bytes, max_members, max_ratio)
    try:
        if kind == "zip":
            _extract_zip(path, extraction)
        else:
            _extract_tar(path, extraction, compressed=kind == "gzip")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise _unreadable("tar" if kind != "zip" else "zip") from e
    except gzip.BadGzipFile as e:
        raise _unreadable("gzip") from e
    top = list(destination.iterdir())
    return top[0] if len(top) == 1 and top[0].is_dir() else destination


def zip_files(directory: Path, names: list[str], path: Path) -> None:
    """Write the files ``names`` (relative to ``directory``, ``/``-separated) to a zip at
    ``path`` as regular files (links are followed: a Hugging Face cache's snapshot links to its
    blobs), stored uncompressed (weights do not compress), with fixed timestamps, in sorted
    order: the same files give the same bytes, so the same sha256."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(names):
            file = directory / name
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.file_size = file.stat().st_size  # zipfile chooses zip64 from it
            with open(file, "rb") as source, archive.open(info, "w") as out:
                shutil.copyfileobj(source, out, CHUNK)
