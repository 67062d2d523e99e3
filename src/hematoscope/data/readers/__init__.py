"""Dataset readers, registered by name (like timm's model registry).

A reader turns a dataset in its published layout into a samples table
(:mod:`hematoscope.data.samples`). Adding a dataset = one small module here + its fixture test.

    >>> from hematoscope.data.readers import read_dataset
    >>> table = read_dataset("path/to/PBC_dataset_normal_DIB", reader="pbc")  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Protocol


class Reader(Protocol):
    name: str

    def __call__(self, root: Path):  # -> pandas.DataFrame
        ...


_READERS: dict[str, Callable] = {}
#: Modules holding the built-in readers, imported lazily and in this order for auto-detection.
_BUILTIN_MODULES = ["folder", "csv", "pbc", "matek", "raabin", "cnmc", "lisc", "bccd", "bloodmnist", "hida"]
_loaded = False


class DatasetError(ValueError):
    """A dataset path is missing, has the wrong layout, or no reader fits it."""


def register_reader(name: str, *, detect: Callable[[Path], bool] | None = None):
    """Decorator registering ``fn(root: Path) -> DataFrame`` under ``name``.

    ``detect(root)`` (optional) says whether a folder looks like this dataset's layout; used by
    :func:`detect_reader`. Duplicate names are an error, never a silent overwrite.
    """

    def deco(fn: Callable) -> Callable:
        if name in _READERS:
            raise ValueError(f"reader {name!r} is already registered")
        fn.reader_name = name
        fn.detect = detect
        _READERS[name] = fn
        return fn

    return deco


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"hematoscope.data.readers.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"hematoscope.data.readers.{mod}":
                raise


def list_readers() -> list[str]:
    _load_builtins()
    return sorted(_READERS)


def get_reader(name: str) -> Callable:
    _load_builtins()
    try:
        return _READERS[name]
    except KeyError:
        raise DatasetError(f"unknown reader {name!r}; known: {', '.join(sorted(_READERS))}") from None


def detect_reader(root: Path) -> str:
    """The most specific registered reader whose ``detect`` accepts ``root`` (a folder or a file).

    Falls back to ``folder`` for folders and ``csv`` for other files.
    """
    _load_builtins()
    root = Path(root)
    for name in _BUILTIN_MODULES + sorted(set(_READERS) - set(_BUILTIN_MODULES)):
        fn = _READERS.get(name)
        if fn is not None and name not in ("folder", "csv") and fn.detect is not None and fn.detect(root):
            return name
    return "folder" if root.is_dir() else "csv"


def read_dataset(source: Path | str, reader: str | None = None):
    """Read a dataset (folder or file, with ``reader`` or auto-detected) or a saved split file.

    Returns a samples DataFrame. A split CSV written by ``hematoscope data split`` is recognised
    by its ``split`` column and returned with it (its files verified against their sha256).

    Raises:
        DatasetError: missing path, unknown reader, or a layout the reader does not recognise.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source} does not exist")
    if source.is_file() and source.suffix.lower() == ".csv" and reader in (None, "split"):
        from hematoscope.data.splits import is_split_file, load_split

        if is_split_file(source):
            return load_split(source)
        reader = "csv"
    name = reader or detect_reader(source)
    return get_reader(name)(source)
