"""Atomic file writing: outputs are written to a temporary name and renamed into place."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError: a file stands where one of its folders should be.
    """
    path = Path(path)
    if path.is_dir():  # said before any work is done for the file, not when it is renamed into place
        raise IsADirectoryError(f"{path} is a folder: name a file to write to")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is a file, so {path} cannot be written inside it")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and writers that recreate the file (safetensors) keep it so: a bundle
        # copied to a lab's server must be readable by the user the server runs as
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Path | str, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_bytes(path: Path | str, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Build a directory under a temporary name; swap it into place when the block succeeds.

    An existing directory at ``path`` is replaced only after the new one is complete, so an
    interrupted save never leaves a half-written bundle behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def updated_dir(path: Path | str, *, remove: Iterable[str] = (), last: Iterable[str] = ()) -> Iterator[Path]:
    """Build a directory's new content under a temporary name, then bring ``path`` up to date.

    A new directory is swapped into place whole (as :func:`atomic_dir`). Into an existing one,
    only the files whose bytes changed are moved, each atomically (the names in ``last`` after
    the others), so unchanged files keep their bytes, inode and mtime; the top-level names in
    ``remove`` that the new content lacks are deleted; every other file is left alone.
    """
    import filecmp

    path = Path(path)
    if not path.is_dir():
        with atomic_dir(path) as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        last, new_names = set(last), {f.name for f in tmp.iterdir()}
        for f in sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: (f.name in last, str(f))):
            target = path / f.relative_to(tmp)
            if target.is_file() and filecmp.cmp(f, target, shallow=False):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(f, 0o666 & ~_umask())
            os.replace(f, target)
        for name in set(remove) - new_names:
            stale = path / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_figure(fig, path: Path | str) -> Path:
    """Lay out a matplotlib figure, write it atomically as PNG and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def read_safetensors(path: Path | str, framework: str = "numpy") -> dict:
    """The tensors of the safetensors file at ``path`` (``framework``: "numpy" or "pt").

    Raises:
        ValueError: naming the file, when it is damaged, cut short or of another format (a
            pickle named .safetensors is refused, never unpickled)."""
    from safetensors import SafetensorError

    if framework == "pt":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): damaged, cut short or of "
                         "another format") from None
