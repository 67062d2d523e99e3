"""``folder``: any class-per-folder tree (``root/<label>/**/<image>``), with an optional
``groups.csv`` (``path,group``; ``path`` relative to the root) whose group ids fill the
``patient`` column, so that crops of one cell or slides of one patient stay on one side of a split.
"""
from __future__ import annotations

import csv
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


GROUPS_FILE = "groups.csv"


def read_groups(path: Path) -> dict[str, str]:
    """A ``groups.csv`` (columns ``path`` and ``group``; more are ignored) → {relative posix path: group id}.

    Raises:
        DatasetError: the file cannot be read or lacks the ``path`` or ``group`` column.
    """
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "group"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{path}: missing column(s) {sorted(missing)} (expected path,group)")
            return {Path(r["path"].strip()).as_posix(): r["group"].strip()
                    for r in reader if (r.get("group") or "").strip() and (r.get("path") or "").strip()}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read it as a CSV file ({e})") from e


def attach_groups(rows: list[dict], root: Path, groups: dict[str, str]) -> list[dict]:
    """Set each row's ``patient`` to its group in ``groups`` (None when the file does not list it)."""
    base = Path(root).resolve()
    for row in rows:
        try:
            rel = Path(row["path"]).relative_to(base).as_posix()
        except ValueError:  # a symlinked file outside the root: match by class folder + name
            rel = f"{row['label']}/{Path(row['path']).name}"
        row["patient"] = groups.get(rel)
    return rows


def require_rows(rows: list[dict], root: Path, layout: str) -> list[dict]:
    """``rows`` unless empty; an empty result means the layout did not match."""
    if not rows:
        raise DatasetError(f"no images found in {root}; expected the layout {layout}")
    return rows


@register_reader("folder")
def read_folder(root: Path):
    """Any class-per-folder tree: root/<class>/**/<image> (+ an optional groups.csv: path,group)."""
    root = Path(root)
    if not (root / GROUPS_FILE).is_file():
        return scan_class_folders(root, "folder")
    groups = read_groups(root / GROUPS_FILE)
    rows = require_rows(class_folder_rows(root), root, "root/<class>/<image> + groups.csv")
    return make_table(attach_groups(rows, root, groups), "folder")
