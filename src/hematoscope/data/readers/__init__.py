"""Dataset readers, registered by name (like timm's model registry).

A reader turns a dataset in its published layout into a samples table
(:mod:`hematoscope.data.samples`). Adding a dataset = one small module here + its fixture test.

    >>> from hematoscope.data.readers import read_dataset
    >>> table = read_dataset("path/to/PBC_dataset_normal_DIB", reader="pbc")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hematoscope._registry import Registry
from hematoscope.data.samples import DatasetError

if TYPE_CHECKING:
    import pandas as pd

#: Modules holding the built-in readers (each registers the reader of its own name), imported
#: when first needed, in this order for auto-detection.
_BUILTIN_MODULES = ["folder", "csv", "pbc", "matek", "raabin", "cnmc", "lisc", "bccd", "bloodmnist", "hida"]
READERS: Registry[Callable] = Registry("reader", error=DatasetError,
                                       lazy={m: f"hematoscope.data.readers.{m}" for m in _BUILTIN_MODULES})


def register_reader(name: str, *, detect: Callable[[Path], bool] | None = None):
    """Decorator registering ``fn(root: Path) -> DataFrame`` under ``name``.

    ``detect(root)`` (optional) says whether a folder looks like this dataset's layout; used by
    :func:`detect_reader`. Duplicate names are an error, never a silent overwrite.
    """
    return READERS.register(name, reader_name=name, detect=detect)


def list_readers() -> list[str]:
    return READERS.names()


def get_reader(name: str) -> Callable:
    """The reader registered under ``name``.

    Raises:
        DatasetError: no reader has that name.
    """
    return READERS.get(name)


def detect_reader(root: Path) -> str:
    """The most specific registered reader whose ``detect`` accepts ``root`` (a folder or a file).

    Falls back to ``folder`` for folders and ``csv`` for other files.
    """
    READERS.load_all()
    root = Path(root)
    for name in _BUILTIN_MODULES + sorted(set(READERS.names()) - set(_BUILTIN_MODULES)):
        fn = READERS.get(name)
        if name not in ("folder", "csv") and fn.detect is not None and fn.detect(root):
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


def as_table(source: "pd.DataFrame | Path | str", reader: str | None = None) -> "pd.DataFrame":
    """``source`` itself when it is already a samples table, else the dataset or split file at
    that path, read by :func:`read_dataset` (with ``reader``). It lives with the readers so
    that the samples module, which the readers build on, does not import them back.

    Raises:
        DatasetError: the path cannot be read as a dataset.
    """
    if hasattr(source, "columns"):
        return source
    return read_dataset(source, reader=reader)
