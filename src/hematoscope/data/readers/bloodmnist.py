"""``bloodmnist``: BloodMNIST from MedMNIST v2 (Yang et al. 2023), a resized copy of PBC.

Published as one NumPy archive ``bloodmnist.npz`` (28 px) or ``bloodmnist_{64,128,224}.npz`` with
``{train,val,test}_images`` (N, H, W[, 3]) uint8 and ``{train,val,test}_labels`` (N, 1) arrays;
labels in MedMNIST's order (basophil, eosinophil, erythroblast, ig, lymphocyte, monocyte,
neutrophil, platelet). The images are written once as PNG files into the cache
(``cache_dir("bloodmnist", <content hash>)``) so the table has real paths like every other
dataset; the archive's split is kept in a ``subset`` column.
"""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.samples import make_table

#: MedMNIST label index → label (PBC folder names, the source of BloodMNIST).
BLOODMNIST_LABELS = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
_SUBSETS = ("train", "val", "test")
_DONE = "complete.txt"


def _npz_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix.lower() == ".npz" and root.name.lower().startswith("bloodmnist") else []
    return sorted(p for p in root.glob("bloodmnist*.npz") if p.is_file())


def _detect(root: Path) -> bool:
    return bool(_npz_files(root))


@register_reader("bloodmnist", detect=_detect)
def read_bloodmnist(root: Path):
    """BloodMNIST (MedMNIST) .npz (28-224 px); images are materialised as PNGs in the cache."""
    import numpy as np

    from hematoscope._io import file_sha256
    from hematoscope.paths import cache_dir

    root = Path(root)
    files = _npz_files(root)
    if len(files) != 1:
        raise DatasetError(f"{root}: expected one bloodmnist*.npz file, found "
                           f"{[f.name for f in files] or 'none'}; pass the .npz file itself")
    npz = files[0]
    out = cache_dir("bloodmnist") / file_sha256(npz)[:16]
    if not (out / _DONE).is_file():
        try:
            with np.load(npz, allow_pickle=False) as arrays:
                _materialise(arrays, out)
        except (ValueError, OSError, KeyError) as exc:
            raise DatasetError(f"{npz}: not a readable MedMNIST archive ({exc})") from None
    rows = []
    for subset in _SUBSETS:
        for f in sorted((out / subset).glob("*/*.png")):
            rows.append({"path": str(f), "label": f.parent.name, "subset": subset})
    return make_table(rows, "bloodmnist")


def _materialise(arrays, out: Path) -> None:
    import numpy as np
    from PIL import Image

    from hematoscope._io import atomic_dir

    missing = [f"{s}_{k}" for s in _SUBSETS for k in ("images", "labels") if f"{s}_{k}" not in arrays.files]
    if missing:
        raise KeyError(f"missing arrays {missing}")
    with atomic_dir(out) as tmp:
        for subset in _SUBSETS:
            images, labels = arrays[f"{subset}_images"], np.asarray(arrays[f"{subset}_labels"]).reshape(-1)
            if len(images) != len(labels) or images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise ValueError(f"{subset}: need uint8 images (N,H,W[,C]) matching labels, got "
                                 f"{images.shape} {images.dtype} and {labels.shape}")
            for i, (img, idx) in enumerate(zip(images, labels)):
                # Out-of-range indices keep their number, so they show up as unmapped labels.
                label = BLOODMNIST_LABELS[idx] if 0 <= idx < len(BLOODMNIST_LABELS) else f"label_{idx}"
                folder = tmp / subset / label
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img).save(
                    folder / f"{subset}_{i:05d}.png", compress_level=1)
        (tmp / _DONE).write_text("ok\n")
