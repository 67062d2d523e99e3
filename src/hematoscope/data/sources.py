"""Turning the PATH arguments of ``hematoscope predict`` into a list of images to classify.

A PATH may be an image file, a folder (searched recursively; files with an image extension and
zip files are taken), a glob pattern (``"slides/**/*.jpg"``) or a zip file (read in place,
safely: see :mod:`hematoscope.data.archive`). Each image keeps a source name that tells the user
where it came from; a zip member is named ``"archive.zip!inner/path.jpg"``.

Files the user named explicitly are always attempted, so a named text file or a missing path is
reported with its reason; files met while walking a folder or matching a glob are taken only
when they look like images or zips. Nothing is dropped silently: a folder or zip without images,
a zip inside a zip, an unreadable zip and a hostile one (path traversal, links, bomb) each come
back as a :class:`SkippedFile` with the reason, and every other
input is still classified.
"""
from __future__ import annotations

import glob
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterable, Sequence

from hematoscope.data.archive import UnsafeArchiveError, ZipMember, open_zip, read_member, safe_members
from hematoscope.data.images import IMAGE_EXTENSIONS, is_image_file

if TYPE_CHECKING:
    import numpy as np

_GLOB_CHARS = frozenset("*?[")
#: Folders written by macOS into zips: resource forks with image extensions, never images.
_ZIP_JUNK_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class SkippedFile:
    """An input that could not be classified, and why."""

    source: str
    reason: str

    def __str__(self) -> str:  # how every report names a skipped input, as ImageError does
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class ImageSource:
    """One image to classify: a file on disk, a member of a zip file at ``path``, or an image
    already in memory (``data``: encoded bytes, or a decoded RGB uint8 array taken as it is)."""

    name: str
    path: Path | None = None
    member: ZipMember | None = None
    data: "bytes | np.ndarray | None" = field(default=None, compare=False, repr=False)


def expand_paths(paths: Iterable[str | Path], *,
                 left_out: list[str] | None = None) -> list[ImageSource | SkippedFile]:
    """Expand files, folders, globs and zip files into images, in a deterministic order.

    The order is the order of ``paths``; within a folder, glob or zip, sorted by name.

    Args:
        paths: what the user named.
        left_out: when given, gets the visible files inside folders and zips that were passed
            over because their extension is not an image's (notes, spreadsheets, or images
            saved under an extension this reader does not know); hidden and system files are
            not listed (:func:`left_out_summary`).

    Returns:
        One :class:`ImageSource` per image, and a :class:`SkippedFile` for a named path that
        does not exist, a glob that matches nothing, a folder or zip with no image in it, a zip
        inside a zip, and a zip that cannot be opened or is unsafe (path traversal, links, size
        or compression-ratio limits: none of its members is read). An image named more than
        once (a folder and a glob over it, the same folder twice, a link to a file also named)
        is listed once, with a warning: counted twice, it would be counted twice in a differential.
    """
    items: list[ImageSource | SkippedFile] = []
    for raw in paths:
        text = str(raw)
        path = Path(text)
        if path.exists():
            items.extend(_expand(path, explicit=True, left_out=left_out))
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                items.append(SkippedFile(text, "no file matches this pattern"))
            for match in matches:
                items.extend(_expand(Path(match), explicit=False, left_out=left_out))
        else:
            items.append(SkippedFile(text, "file not found"))
    return _once_each(items)


def _once_each(items: list[ImageSource | SkippedFile]) -> list[ImageSource | SkippedFile]:
    seen: set[tuple[str, str | None]] = set()
    kept, repeated = [], []
    for item in items:
        if isinstance(item, ImageSource) and item.path is not None:
            key = (os.path.realpath(item.path), item.member.name if item.member else None)
            if key in seen:
                repeated.append(item.name)
                continue
            seen.add(key)
        kept.append(item)
    if repeated:
        import warnings

        warnings.warn(f"{len(repeated)} image{'s were' if len(repeated) > 1 else ' was'} named more than once (e.g. "
                      f"{repeated[0]}) and {'are' if len(repeated) > 1 else 'is'} read once", UserWarning, stacklevel=3)
    return kept


def _is_zip(path: Path | str) -> bool:
    return str(path).lower().endswith(".zip")


#: Files a folder or zip may hold that nobody means as input (not reported as left out).
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})


def _unmeant(name: str) -> bool:
    """Hidden (a part of the path starts with "."), system or archive junk: never an input."""
    parts = name.split("/")
    return any(p.startswith(".") for p in parts) or parts[-1].lower() in _SYSTEM_FILES or \
        name.startswith(_ZIP_JUNK_PREFIXES)


def left_out_summary(left_out: Sequence[str]) -> str:
    """``left_out`` of :func:`expand_paths` in one line: how many, by extension."""
    counts = Counter(PurePosixPath(n.replace("\\", "/")).suffix.lower() or "(no extension)" for n in left_out)
    kinds = ", ".join(f"{ext} {n}" for ext, n in counts.most_common(6)) + (", ..." if len(counts) > 6 else "")
    n = len(left_out)
    return (f"{n} file{'s' if n != 1 else ''} in the folders or zips {'were' if n != 1 else 'was'} left out, not "
            f"being images by {'their' if n != 1 else 'its'} extension ({kinds}); images are read from "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files")


def _expand(path: Path, *, explicit: bool, left_out: list[str] | None = None) -> list[ImageSource | SkippedFile]:
    if path.is_dir():
        return _expand_folder(path, left_out)
    if not text_name(str(path)):
        return [SkippedFile(shown_name(str(path)), NOT_TEXT)]
    if _is_zip(path):
        return _expand_zip(path, left_out)
    if explicit or is_image_file(path):
        return [ImageSource(str(path), path)]
    return []


#: Why a file whose name is not text is passed over: tables, reports and the server carry names as text.
NOT_TEXT = "its name is not valid UTF-8 text (as written by an old Windows share or zip): rename the file"


def text_name(name: str) -> bool:
    """Whether ``name`` is text that reports can carry: a file name of undecodable bytes comes
    from the file system as a str with surrogate escapes, which UTF-8 files and tables refuse."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_name(name: str) -> str:
    """``name`` printable: undecodable bytes shown as ``\\xff``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _expand_folder(path: Path, left_out: list[str] | None) -> list[ImageSource | SkippedFile]:
    """Every image and zip under ``path``, following folder links once each; folders that cannot
    be read, broken links and link loops come back as skipped with the reason."""
    found: list[tuple[str, ImageSource | SkippedFile | list]] = []
    passed: list[str] | None = None if left_out is None else []
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:
        name = str(exc.filename or path)
        found.append((name, SkippedFile(shown_name(name), f"folder not read: {exc.strerror or exc}")))

    for root, dirs, files in os.walk(path, onerror=unreadable, followlinks=True):
        dirs.sort()  # which of two links to one folder reads it, and which is named, is always the same
        real = os.path.realpath(root)
        if real in seen:  # a folder link back into what was read already
            dirs[:] = []
            found.append((root, SkippedFile(shown_name(root), "folder link to a folder already read: not read again")))
            continue
        seen.add(real)
        for name in files:
            f = Path(root, name)
            relative = f.relative_to(path).as_posix()
            if not f.is_file():  # a link to nothing, or to itself
                if f.is_symlink() and not _unmeant(relative):
                    found.append((str(f), SkippedFile(shown_name(str(f)), "broken link or link loop: no file to read")))
            elif not text_name(str(f)):
                if is_image_file(f) or _is_zip(f):
                    found.append((str(f), SkippedFile(shown_name(str(f)), NOT_TEXT)))
            elif _is_zip(f):
                found.append((str(f), _expand_zip(f, passed)))
            elif is_image_file(f):
                found.append((str(f), ImageSource(str(f), f)))
            elif passed is not None and not _unmeant(relative):
                passed.append(str(f))
    if left_out is not None:
        left_out.extend(sorted(passed, key=Path))
    out: list[ImageSource | SkippedFile] = []
    for _, item in sorted(found, key=lambda pair: Path(pair[0])):
        out.extend(item if isinstance(item, list) else [item])
    return out or [SkippedFile(str(path), "no image files or zip files in this folder")]


def _expand_zip(path: Path, left_out: list[str] | None = None) -> list[ImageSource | SkippedFile]:
    try:
        zf = open_zip(path)
    except UnsafeArchiveError as exc:  # corrupt or not a zip: report it, go on with the others
        return [SkippedFile(str(path), str(exc))]
    with zf:
        try:
            members = safe_members(zf)
        except UnsafeArchiveError as exc:  # hostile: read none of it, classify everything else
            return [SkippedFile(str(path), f"unsafe zip, not read: {exc}")]
    members = sorted((m for m in members if not m.name.startswith(_ZIP_JUNK_PREFIXES)), key=lambda m: m.name)
    out: list[ImageSource | SkippedFile] = []
    for m in members:
        if is_image_file(m.name):
            out.append(ImageSource(f"{path}!{m.name}", path, m))
        elif _is_zip(m.name):
            out.append(SkippedFile(f"{path}!{m.name}", "zip inside a zip: not read (unpack the outer zip first)"))
        elif left_out is not None and not m.name.endswith("/") and not _unmeant(m.name):
            left_out.append(f"{path}!{m.name}")
    return out or [SkippedFile(str(path), "no image files in this zip")]


class ArchiveReader:
    """Reads zip members for several threads: each archive is opened once, and reads are
    serialised per archive (reading is cheap next to decoding, which stays parallel)."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple] = {}
        self._lock = threading.Lock()

    def read(self, source: ImageSource) -> bytes:
        """The bytes of the zip member ``source`` (its size is checked against the header).

        Raises:
            UnsafeArchiveError: the member's data does not match its declared size, or the
                archive can no longer be opened.
        """
        with self._lock:
            if source.path not in self._open:
                self._open[source.path] = (open_zip(source.path), threading.Lock())
            zf, lock = self._open[source.path]
        with lock:
            return read_member(zf, source.member)

    def close(self) -> None:
        with self._lock:
            for zf, _ in self._open.values():
                zf.close()
            self._open.clear()
