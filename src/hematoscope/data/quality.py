"""Dataset quality check: what a folder really contains before anything is trained on it.

:func:`check_dataset` reports readable images per class, unreadable files (with the reason from
:func:`~hematoscope.data.images.load_image`), exact duplicates (SHA-256 of the bytes) and near
duplicates (perceptual hash, ``imagehash.phash``, within a small Hamming distance), flagging
duplicates whose copies carry different labels, plus the size / mode / format distribution, the
class imbalance ratio and the crops with near-black bars along an edge (cut past their slide
image: models whose preprocessing fills bars see slide background there). Files are decoded at
reduced scale (JPEG draft mode) in a small process pool; near duplicates are found by
multi-index hashing, never by comparing all pairs.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Decode JPEGs at a reduced scale with both sides at least this large: phash looks at 32x32.
_HASH_DECODE_SIZE = 64
#: Default Hamming distance (of 64 bits) up to which two images count as near duplicates.
NEAR_DUPLICATE_DISTANCE = 4


@dataclass
class QualityReport:
    """Result of :func:`check_dataset`. Paths are as in the samples table (absolute)."""

    source: str  # the checked path, absolute ("<table>" for a samples table)
    reader: str | None
    n_files: int
    class_counts: dict[str, int]  # readable images per class (a class with none at 0)
    unmapped_labels: dict[str, dict[str, int]]
    unreadable: list[dict]  # {path, label, reason}
    exact_duplicates: list[dict]  # {sha256, paths, labels, cross_class}
    near_duplicates: list[dict]  # {a, b, label_a, label_b, distance, cross_class}
    near_threshold: int
    formats: dict[str, int]
    modes: dict[str, int]
    sizes: dict[str, int]  # "WxH" → count, most common first
    imbalance_ratio: float | None  # largest / smallest class, in readable images (classes with none left out)
    seconds: float = field(default=0.0)
    #: The outlier screen (:meth:`hematoscope.trust.outliers.OutlierReport.to_dict`), when asked for.
    outliers: dict | None = field(default=None)
    #: Crops with near-black bars along an edge (:func:`~hematoscope.models.preprocess.fill_bars`).
    edge_bars: list[str] = field(default_factory=list)
    #: Nearly uniform images (a blank frame, a slide region without a cell): no cell to learn from.
    blank: list[str] = field(default_factory=list)

    @property
    def cross_class_duplicates(self) -> list[dict]:
        """Exact and near duplicates whose copies have different labels."""
        return [d for d in self.exact_duplicates + self.near_duplicates if d["cross_class"]]

    @property
    def n_duplicate_pairs(self) -> int:
        """Number of byte-identical pairs (a group of k copies counts k*(k-1)/2)."""
        return sum(len(d["paths"]) * (len(d["paths"]) - 1) // 2 for d in self.exact_duplicates)

    def to_dict(self) -> dict:
        """JSON-ready dict, with a ``summary`` block of the headline numbers first."""
        summary = {
            "files": self.n_files,
            "classes": len(self.class_counts),
            "unreadable": len(self.unreadable),
            "exact_duplicate_groups": len(self.exact_duplicates),
            "exact_duplicate_pairs": self.n_duplicate_pairs,
            "near_duplicate_pairs": len(self.near_duplicates),
            "cross_class_duplicates": len(self.cross_class_duplicates),
            "imbalance_ratio": self.imbalance_ratio,
            "edge_bars": len(self.edge_bars),
            "blank": len(self.blank),
            "seconds": round(self.seconds, 2),
        }
        if self.outliers is not None:
            summary["outliers_flagged"] = self.outliers["n_flagged"]
            summary["outlier_cut"] = self.outliers["cut"]
        return {"summary": summary, **asdict(self)}


def check_dataset(
    root_or_table,
    reader: str | None = None,
    *,
    workers: int = 2,
    near_threshold: int = NEAR_DUPLICATE_DISTANCE,
    progress: bool = True,
) -> QualityReport:
    """Check a dataset folder/file (read with ``reader`` or auto-detected) or a samples table.

    Args:
        root_or_table: dataset path, split file, or samples DataFrame.
        reader: dataset reader name (for paths only).
        workers: processes used for decoding and hashing (1 = in this process).
        near_threshold: largest Hamming distance between 64-bit perceptual hashes that counts as
            a near duplicate (0 disables the near-duplicate search).
        progress: show a progress bar / log lines.

    Returns:
        The :class:`QualityReport`.

    Raises:
        DatasetError: the path cannot be read as a dataset.
    """
    from hematoscope.data.readers import as_table
    from hematoscope.progress import track
    from hematoscope.taxonomy import unmapped_labels

    start = time.perf_counter()
    # Absolute, so that `data split --check` can tell a report of other data wherever it was made.
    source = "<table>" if hasattr(root_or_table, "columns") else os.path.abspath(root_or_table)
    table = as_table(root_or_table, reader=reader)
    paths, labels = list(table["path"]), [str(x) for x in table["label"]]
    infos = list(track(_inspect_all(paths, workers), total=len(paths), description="checking images", enabled=progress))

    unreadable = [{"path": p, "label": lab, "reason": info["error"]}
                  for p, lab, info in zip(paths, labels, infos) if info["error"]]
    ok = [i for i, info in enumerate(infos) if not info["error"]]
    # Images per class and the imbalance count what can be trained on: the readable files (the
    # unreadable ones are listed on their own). A class with no readable file is kept, at 0.
    counts = Counter({lab: 0 for lab in labels})
    counts.update(labels[i] for i in ok)
    present = [n for n in counts.values() if n]
    report = QualityReport(
        source=source,
        reader=reader or (str(table["dataset"].iloc[0]) if len(table) else None),
        n_files=len(paths),
        class_counts=dict(sorted(counts.items())),
        unmapped_labels=unmapped_labels(table),
        unreadable=unreadable,
        exact_duplicates=_exact_duplicates(paths, labels, [info["sha256"] for info in infos]),
        near_duplicates=_near_duplicates(paths, labels, infos, ok, near_threshold),
        near_threshold=near_threshold,
        formats=_counter([infos[i]["format"] for i in ok]),
        modes=_counter([infos[i]["mode"] for i in ok]),
        sizes=_counter([f"{infos[i]['width']}x{infos[i]['height']}" for i in ok]),
        imbalance_ratio=round(max(present) / min(present), 3) if present else None,
        edge_bars=[paths[i] for i in ok if infos[i]["bars"]],
        blank=[paths[i] for i in ok if infos[i]["blank"]],
    )
    report.seconds = time.perf_counter() - start
    return report


def _counter(values) -> dict[str, int]:
    return dict(Counter(str(v) for v in values).most_common())


def _inspect_all(paths: list[str], workers: int):
    if workers <= 1 or len(paths) < 200:  # a pool costs more than it saves on small sets
        yield from map(_inspect, paths)
        return
    from concurrent.futures import ProcessPoolExecutor

    # The platform's default start method: fork on Linux needs no `if __name__ == "__main__"`
    # guard in user scripts, and the workers only use PIL, numpy and imagehash.
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_inspect, paths, chunksize=64)


#: Below this spread of its pixel values (0-255, all channels) an image counts as blank: a stained
#: cell on its background spreads over tens of levels; a blank frame, a few (sensor noise).
BLANK_STD = 4.0


def _inspect(path: str) -> dict:
    """Hash, header facts and perceptual hash of one file; ``error`` set when it cannot be used."""
    from PIL import Image

    from hematoscope.data.images import MIN_MODEL_SIDE, ImageError, load_image, too_small

    info = {"sha256": None, "format": None, "mode": None, "width": None, "height": None, "phash": None, "bars": False,
            "blank": False, "error": None}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        info["error"] = f"cannot read ({exc.strerror})"
        return info
    info["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        pixels = load_image(data, draft_size=_HASH_DECODE_SIZE)
    except ImageError as exc:
        info["error"] = exc.reason
        return info
    import io

    import imagehash

    with Image.open(io.BytesIO(data)) as im:  # header only: the size and mode of the file itself
        info.update(format=im.format, mode=im.mode, width=im.size[0], height=im.size[1])
    if min(info["width"], info["height"]) < MIN_MODEL_SIDE:  # as every model path refuses it
        info["error"] = too_small((info["height"], info["width"]))
        return info
    info["phash"] = int(str(imagehash.phash(Image.fromarray(pixels))), 16)
    from hematoscope.models.preprocess import fill_bars

    info["bars"] = fill_bars(pixels) is not pixels
    info["blank"] = bool(pixels.std() < BLANK_STD)
    return info


def _exact_duplicates(paths, labels, hashes) -> list[dict]:
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            groups.setdefault(h, []).append(i)
    out = []
    for h, idx in groups.items():
        if len(idx) > 1:
            labs = [labels[i] for i in idx]
            out.append({"sha256": h, "paths": [paths[i] for i in idx], "labels": labs, "cross_class": len(set(labs)) > 1})
    return sorted(out, key=lambda d: (not d["cross_class"], d["paths"][0]))


def _near_duplicates(paths, labels, infos, ok: list[int], threshold: int) -> list[dict]:
    """Pairs of readable, not byte-identical files whose phashes differ in <= threshold bits.

    Multi-index hashing: split the 64 bits into threshold + 1 blocks; by the pigeonhole
    principle two hashes within the threshold agree exactly on at least one block, so only
    files sharing a block value are compared (vectorised, bucket by bucket).
    """
    import numpy as np

    ok = [i for i in ok if not infos[i].get("blank")]  # blank frames: listed as blank, not as copies
    if threshold <= 0 or len(ok) < 2:
        return []
    idx = np.array(ok)
    hashes = np.array([infos[i]["phash"] for i in ok], dtype=np.uint64)
    bounds = np.linspace(0, 64, threshold + 2).round().astype(int)
    found = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keys = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            found.append(_close_pairs(np.sort(order[s:e]), hashes, threshold))
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.empty((0, 3), np.int64)
    out = []
    for i, j, d in pairs.tolist():
        a, b = int(idx[i]), int(idx[j])
        if infos[a]["sha256"] == infos[b]["sha256"]:
            continue  # reported as an exact duplicate
        out.append({"a": paths[a], "b": paths[b], "label_a": labels[a], "label_b": labels[b],
                    "distance": d, "cross_class": labels[a] != labels[b]})
    return sorted(out, key=lambda d: (not d["cross_class"], d["distance"], d["a"]))


def _close_pairs(members, hashes, threshold: int, rows: int = 512):
    """(i, j, distance) rows, i < j, for members within ``threshold`` bits; in row blocks so a
    huge bucket (many blank images) needs bounded memory."""
    import numpy as np

    h = hashes[members]
    out = []
    for r in range(0, len(members), rows):
        block = h[r:r + rows, None] ^ h[None, :]
        dist = np.bitwise_count(block)
        ii, jj = np.nonzero(dist <= threshold)
        keep = ii + r < jj
        ii, jj = ii[keep] + r, jj[keep]
        out.append(np.stack([members[ii], members[jj], dist[ii - r, jj]], axis=1))
    return np.concatenate(out).astype(np.int64)
