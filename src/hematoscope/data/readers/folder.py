"""``folder``: any class-per-folder tree (``root/<label>/**/<image>``)."""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.images import is_image_file
from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.samples import make_table


def class_folders(root: Path) -> list[Path]:
    """The visible sub-folders of ``root``, sorted (empty when ``root`` is not a folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def class_folder_rows(root: Path, label_of=lambda d: d.name, **extra) -> list[dict]:
    """One row ``{"path", "label", **extra}`` for every image under each sub-folder of ``root``.

    Hidden files are kept (the quality check reports them), hidden folders are skipped.
    """
    rows = []
    for d in class_folders(root):
        for f in sorted(d.rglob("*")):
            if f.is_file() and is_image_file(f) and not any(p.startswith(".") for p in f.relative_to(d).parts[:-1]):
                rows.append({"path": str(f.resolve()), "label": label_of(d), **extra})
    return rows


def scan_class_folders(root: Path, dataset: str, label_of=lambda d: d.name):
    """Samples table of a class-per-folder tree, labelled by folder name.

    Raises:
        DatasetError: ``root`` is not a folder or has no images in sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    rows = class_folder_rows(root, label_of)
    if not rows:
        raise DatasetError(
            f"{root} has no images in class sub-folders (expected root/<class>/<image>; "
            f"found sub-folders: {[d.name for d in class_folders(root)][:10]})"
        )
    return make_table(rows, dataset)


def require_rows(rows: list[dict], root: Path, layout: str) -> list[dict]:
    """``rows`` unless empty; an empty result means the layout did not match."""
    if not rows:
        raise DatasetError(f"no images found in {root}; expected the layout {layout}")
    return rows


@register_reader("folder")
def read_folder(root: Path):
    """Any class-per-folder tree: root/<class>/**/<image>."""
    return scan_class_folders(root, "folder")
