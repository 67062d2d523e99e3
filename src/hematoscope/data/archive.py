"""Reading zip files safely: no path traversal, no absolute paths, no links, bounded sizes
and compression ratios (zip bombs)."""
from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

MAX_MEMBERS = 200_000
MAX_MEMBER_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024 * 1024
MAX_RATIO = 200  # uncompressed / compressed; real images compress far less than this


class UnsafeArchiveError(ValueError):
    """A zip file is malformed or tries something dangerous (traversal, bomb, links)."""


@dataclass(frozen=True)
class ZipMember:
    name: str  # normalised relative posix path
    info: zipfile.ZipInfo


def safe_members(zf: zipfile.ZipFile) -> list[ZipMember]:
    """Validate every entry of an open zip file and return the regular files in it."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise UnsafeArchiveError(f"zip has {len(infos)} entries (limit {MAX_MEMBERS})")
    total = 0
    members = []
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
            raise UnsafeArchiveError(f"zip entry {info.filename!r} escapes the archive (path traversal)")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"zip entry {info.filename!r} is a symbolic link")
        if info.is_dir():
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            raise UnsafeArchiveError(f"zip entry {info.filename!r} is {info.file_size} bytes (limit {MAX_MEMBER_BYTES})")
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 1 << 20:
            raise UnsafeArchiveError(f"zip entry {info.filename!r} has compression ratio "
                                     f"{info.file_size // info.compress_size}:1 (zip bomb?)")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise UnsafeArchiveError(f"zip expands to more than {MAX_TOTAL_BYTES} bytes")
        members.append(ZipMember(PurePosixPath(*parts).as_posix(), info))
    return members


def open_zip(src: Path | str | BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchiveError(f"not a readable zip file ({exc})") from None


def read_member(zf: zipfile.ZipFile, member: ZipMember) -> bytes:
    """Read one member, never more than its declared size (headers can lie)."""
    with zf.open(member.info) as f:
        data = f.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES or len(data) != member.info.file_size:
        raise UnsafeArchiveError(f"zip entry {member.name!r} does not match its declared size")
    return data


def iter_zip_files(src: Path | str | BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield (relative name, bytes) for every regular file, after validating the whole archive."""
    with open_zip(src) as zf:
        for m in safe_members(zf):
            yield m.name, read_member(zf, m)


def extract_zip_safely(src: Path | str | BinaryIO, dest: Path) -> list[Path]:
    """Extract all regular files into ``dest`` after validation; returns the written paths."""
    dest = Path(dest)
    written = []
    for name, data in iter_zip_files(src):
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        written.append(out)
    return written
