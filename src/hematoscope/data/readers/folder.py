"""``folder``: any class-per-folder tree (``root/<label>/**/<image>``)."""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.images import is_image_file
from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.samples import make_table


def scan_class_folders(root: Path, dataset: str, label_of=lambda d: d.name):
    """Rows for every image file under each immediate sub-folder of ``root`` (recursively).

    Hidden files are kept (the quality check reports them), hidden folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = []
    for d in class_dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file() and is_image_file(f) and not any(p.startswith(".") for p in f.relative_to(d).parts[:-1]):
                rows.append({"path": str(f.resolve()), "label": label_of(d)})
    if not rows:
        raise DatasetError(
            f"{root} has no images in class sub-folders (expected root/<class>/<image>; "
            f"found sub-folders: {[d.name for d in class_dirs][:10]})"
        )
    return make_table(rows, dataset)


@register_reader("folder")
def read_folder(root: Path):
    return scan_class_folders(root, "folder")
