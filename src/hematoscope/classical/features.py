"""Named, documented hand-crafted features of a single-cell crop.

Every feature has a name, a unit and a description in :data:`FEATURES` (the table in
docs/classical.md is generated from it). Features are computed on the working image of
:mod:`hematoscope.classical.segment` (shorter side 128 px), so lengths are in *working pixels*
(``wpx`` = 1/128 of the crop's shorter side) whatever the input resolution.

Groups:
- ``seg_*``: segmentation outcome (always present).
- ``img_*`` / ``centre_*``: colour of the whole crop and of its central half (always present,
  independent of segmentation; they keep a prediction possible when segmentation fails).
- ``nuc_*`` / ``cell_*`` / ``cyto_*``: shape, colour, texture and granularity of the nucleus,
  the whole cell and the cytoplasm. NaN when segmentation failed (XGBoost handles missing
  values natively); ``cyto_*`` colour/texture is also NaN when the cell has no cytoplasm
  (platelets, bare nuclei).

Bump :data:`FEATURE_VERSION` whenever a value or the order changes: it keys the disk cache and
is recorded in classical bundles, which refuse features of another version.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

FEATURE_VERSION = "3"  # 3: files decoded by load_model_image (as at prediction time)


@dataclass(frozen=True)
class FeatureSpec:
    """One named feature: ``name`` (column name), ``unit`` and a one-line ``description``."""

    name: str
    unit: str
    description: str


#: Colour channels: (short name, unit, description), all computed from the RGB working image.
CHANNELS = [
    ("red", "0-1", "red intensity"),
    ("green", "0-1", "green intensity"),
    ("blue", "0-1", "blue intensity"),
    ("sat", "0-1", "HSV saturation"),
    ("val", "0-1", "HSV value (brightness)"),
    ("lab_l", "0-100", "CIE Lab lightness"),
    ("lab_a", "Lab a", "CIE Lab a (green-red axis)"),
    ("lab_b", "Lab b", "CIE Lab b (blue-yellow axis)"),
    ("hema", "OD", "haematoxylin optical density (rgb2hed colour deconvolution)"),
    ("eosin", "OD", "eosin optical density (rgb2hed)"),
    ("dab", "OD", "third deconvolution channel (rgb2hed DAB; residual stain)"),
    ("stain", "-1..1", "nucleus stain score (B-G)/(B+G)"),
]
_REGION_STATS = [("mean", "mean"), ("std", "standard deviation"), ("p10", "10th percentile"),
                 ("p90", "90th percentile")]
_SHAPE = [
    ("area", "wpx²", "area"),
    ("perimeter", "wpx", "perimeter"),
    ("circularity", "ratio", "4π·area/perimeter² (1 = disc)"),
    ("solidity", "ratio", "area / convex hull area"),
    ("eccentricity", "ratio", "eccentricity of the fitted ellipse (0 = circle)"),
    ("major_axis", "wpx", "major axis length of the fitted ellipse"),
    ("minor_axis", "wpx", "minor axis length of the fitted ellipse"),
    ("extent", "ratio", "area / bounding box area"),
    ("feret_max", "wpx", "maximum Feret (caliper) diameter"),
    ("thickness_max", "wpx", "2 x maximum of the distance transform (widest part)"),
    ("thickness_mean", "wpx", "2 x mean of the distance transform (thin = lobed or band-shaped)"),
]
_GLCM_PROPS = ["contrast", "dissimilarity", "homogeneity", "energy", "correlation"]
GLCM_DISTANCES = (1, 3)
GLCM_LEVELS = 32
LBP_POINTS, LBP_RADIUS = 8, 1
GRANULE_RADII = (1, 2, 3, 4)


def _build_table() -> list[FeatureSpec]:
    t = [
        FeatureSpec("seg_ok", "flag", "1 when the centre cell was segmented, 0 when it failed"),
        FeatureSpec("seg_stained_objects", "count", "stained (nucleus-like) objects in the crop"),
    ]
    for ch, unit, desc in CHANNELS:
        t.append(FeatureSpec(f"img_{ch}_mean", unit, f"whole crop: mean {desc}"))
    for ch, unit, desc in CHANNELS:
        t.append(FeatureSpec(f"centre_{ch}_mean", unit, f"central half of the crop: mean {desc}"))
        t.append(FeatureSpec(f"centre_{ch}_std", unit, f"central half of the crop: std of {desc}"))
    for region, rdesc in (("nuc", "nucleus"), ("cell", "whole cell")):
        for key, unit, desc in _SHAPE:
            t.append(FeatureSpec(f"{region}_{key}", unit, f"{rdesc}: {desc}"))
    t += [
        FeatureSpec("cyto_area", "wpx²", "cytoplasm area (cell minus nucleus)"),
        FeatureSpec("nc_ratio", "ratio", "nucleus area / cell area"),
        FeatureSpec("nuc_offset", "ratio", "distance nucleus centroid - cell centroid / cell equivalent radius"),
        FeatureSpec("nuc_parts", "count", "connected pieces of the nucleus (separate lobes)"),
        FeatureSpec("nuc_lobes", "count", "lobe estimate: nucleus pieces after eroding 2 wpx (cuts thin bridges)"),
        FeatureSpec("nuc_dt_peaks", "count", "distance-transform maxima in the nucleus (lobe centres)"),
        FeatureSpec("nuc_concavities", "count", "convexity defects: hull-minus-nucleus pieces larger than 4 wpx²"),
        FeatureSpec("cell_on_border", "flag", "1 when the cell mask touches the crop border"),
    ]
    for region, rdesc in (("nuc", "nucleus"), ("cyto", "cytoplasm")):
        for ch, unit, desc in CHANNELS:
            for stat, sdesc in _REGION_STATS:
                t.append(FeatureSpec(f"{region}_{ch}_{stat}", unit, f"{rdesc}: {sdesc} of {desc}"))
    t += [FeatureSpec("contrast_stain", "-1..1", "mean stain score nucleus minus cytoplasm"),
          FeatureSpec("contrast_lab_l", "0-100", "mean lightness cytoplasm minus nucleus")]
    for region, rdesc in (("nuc", "nucleus"), ("cyto", "cytoplasm")):
        for d in GLCM_DISTANCES:
            for prop in _GLCM_PROPS:
                t.append(FeatureSpec(f"{region}_glcm_{prop}_d{d}", "GLCM",
                                     f"{rdesc}: Haralick {prop} of the green-channel grey-level "
                                     f"co-occurrence matrix ({GLCM_LEVELS} levels, distance {d} wpx, "
                                     "mean over 4 angles)"))
        for b in range(LBP_POINTS + 2):
            what = f"uniform pattern {b}" if b < LBP_POINTS + 1 else "non-uniform patterns"
            t.append(FeatureSpec(f"{region}_lbp_{b}", "fraction",
                                 f"{rdesc}: share of pixels with local binary pattern {what} "
                                 f"(P={LBP_POINTS}, R={LBP_RADIUS}, green channel)"))
    for ch, cdesc in (("dark", "darkness (1 - green)"), ("lab_a", "redness (Lab a)")):
        for r in GRANULE_RADII:
            t.append(FeatureSpec(f"cell_granules_{ch}_r{r}", "granulometry",
                                 f"whole cell: mean {cdesc} removed by a grey opening with a disc of radius "
                                 f"{r} wpx minus radius {r - 1} (granules of that size)"))
    return t


#: The feature table, in column order.
FEATURES: list[FeatureSpec] = _build_table()
FEATURE_NAMES: list[str] = [f.name for f in FEATURES]
_INDEX = {n: i for i, n in enumerate(FEATURE_NAMES)}
assert len(_INDEX) == len(FEATURES), "duplicate feature names"


def feature_spec(name: str) -> FeatureSpec:
    """The :class:`FeatureSpec` of a feature name (KeyError when unknown)."""
    return FEATURES[_INDEX[name]]


def _channels(work: np.ndarray, stain: np.ndarray) -> np.ndarray:
    """(H, W, 12) float32 stack of :data:`CHANNELS`."""
    from skimage.color import rgb2hed, rgb2hsv, rgb2lab

    rgb = work.astype(np.float32) / 255.0
    hsv = rgb2hsv(rgb)
    lab = rgb2lab(rgb)
    hed = rgb2hed(rgb)
    return np.concatenate([rgb, hsv[..., 1:3], lab, hed, stain[..., None]], axis=2).astype(np.float32)


def cell_features(image: np.ndarray) -> np.ndarray:
    """The feature vector (float32, order of :data:`FEATURE_NAMES`) of one RGB uint8 crop.

    Args:
        image: (H, W, 3) uint8 RGB single-cell crop of any size.

    Returns:
        1-D float32 array; segmentation-dependent entries are NaN when segmentation failed.
    """
    from hematoscope.classical.segment import segment_cell

    return features_of(segment_cell(image))


def features_of(seg) -> np.ndarray:
    """Features of an existing :class:`~hematoscope.classical.segment.Segmentation`."""
    from skimage import measure

    out = np.full(len(FEATURES), np.nan, np.float32)

    def put(name: str, value) -> None:
        out[_INDEX[name]] = value

    chans = _channels(seg.image, seg.stain)
    h, w = seg.image.shape[:2]
    put("seg_ok", float(seg.ok))
    stained = seg.stain > max(0.05, float(np.percentile(seg.stain, 99)) * 0.5)
    put("seg_stained_objects", float(measure.label(stained).max()))
    names = [c[0] for c in CHANNELS]
    img_mean = chans.reshape(-1, len(CHANNELS)).mean(0)
    centre = chans[h // 4: h - h // 4, w // 4: w - w // 4].reshape(-1, len(CHANNELS))
    for i, ch in enumerate(names):
        put(f"img_{ch}_mean", img_mean[i])
        put(f"centre_{ch}_mean", centre[:, i].mean())
        put(f"centre_{ch}_std", centre[:, i].std())
    if not seg.ok:
        return out

    nucleus, cell, cyto = seg.nucleus, seg.cell, seg.cytoplasm
    for region, mask in (("nuc", nucleus), ("cell", cell)):
        for key, value in _shape(mask).items():
            put(f"{region}_{key}", value)
    nuc_area, cell_area = float(nucleus.sum()), float(cell.sum())
    put("cyto_area", cell_area - nuc_area)
    put("nc_ratio", nuc_area / cell_area)
    ny, nx = np.argwhere(nucleus).mean(0)
    cy, cx = np.argwhere(cell).mean(0)
    put("nuc_offset", np.hypot(ny - cy, nx - cx) / np.sqrt(cell_area / np.pi))
    for key, value in _lobes(nucleus).items():
        put(key, value)
    put("cell_on_border", float(cell[0].any() or cell[-1].any() or cell[:, 0].any() or cell[:, -1].any()))

    for region, mask in (("nuc", nucleus), ("cyto", cyto)):
        if mask.sum() < 3:
            continue
        px = chans[mask]
        stats = {"mean": px.mean(0), "std": px.std(0)}
        stats["p10"], stats["p90"] = np.percentile(px, [10, 90], axis=0)
        for i, ch in enumerate(names):
            for stat in stats:
                put(f"{region}_{ch}_{stat}", stats[stat][i])
    if cyto.sum() >= 3:
        put("contrast_stain", out[_INDEX["nuc_stain_mean"]] - out[_INDEX["cyto_stain_mean"]])
        put("contrast_lab_l", out[_INDEX["cyto_lab_l_mean"]] - out[_INDEX["nuc_lab_l_mean"]])

    from skimage.feature import local_binary_pattern

    green = seg.image[..., 1]
    lbp = local_binary_pattern(green, LBP_POINTS, LBP_RADIUS, method="uniform").astype(np.int64)
    for region, mask in (("nuc", nucleus), ("cyto", cyto)):
        for key, value in _texture(green, lbp, mask, region).items():
            put(key, value)
    for key, value in _granulometry(seg.image, chans[..., names.index("lab_a")], cell).items():
        put(key, value)
    return out


def _shape(mask: np.ndarray) -> dict[str, float]:
    from scipy import ndimage as ndi
    from skimage import measure

    props = measure.regionprops(mask.astype(np.uint8))[0]
    area, perim = float(props.area), float(props.perimeter)
    dist = ndi.distance_transform_edt(mask)[mask]
    return {
        "area": area,
        "perimeter": perim,
        "circularity": min(1.0, 4 * np.pi * area / perim**2) if perim > 0 else np.nan,
        "solidity": float(props.solidity),
        "eccentricity": float(props.eccentricity),
        "major_axis": float(props.axis_major_length),
        "minor_axis": float(props.axis_minor_length),
        "extent": float(props.extent),
        "feret_max": float(props.feret_diameter_max),
        "thickness_max": 2.0 * float(dist.max()),
        "thickness_mean": 2.0 * float(dist.mean()),
    }


def _lobes(nucleus: np.ndarray) -> dict[str, float]:
    from scipy import ndimage as ndi
    from skimage import measure, morphology
    from skimage.feature import peak_local_max

    eroded = ndi.binary_erosion(nucleus, morphology.disk(2))
    dist = ndi.distance_transform_edt(nucleus)
    peaks = peak_local_max(dist, min_distance=4, threshold_abs=1.5, labels=nucleus.astype(np.int32))
    hull = morphology.convex_hull_image(nucleus)
    defects = measure.label(hull & ~nucleus)
    sizes = np.bincount(defects.ravel())[1:]
    return {
        "nuc_parts": float(measure.label(nucleus).max()),
        "nuc_lobes": float(max(1, measure.label(eroded).max())),
        "nuc_dt_peaks": float(max(1, len(peaks))),
        "nuc_concavities": float((sizes > 4).sum()),
    }


def _texture(grey: np.ndarray, lbp: np.ndarray, mask: np.ndarray, region: str) -> dict[str, float]:
    """Masked GLCM (level 0 reserved for outside pixels, then dropped) and LBP histogram."""
    from skimage.feature import graycomatrix, graycoprops

    out: dict[str, float] = {}
    if mask.sum() < 9:
        return out
    q = (1 + grey.astype(np.int32) * (GLCM_LEVELS - 1) // 256).astype(np.uint8)
    q[~mask] = 0
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = graycomatrix(q, distances=list(GLCM_DISTANCES), angles=angles, levels=GLCM_LEVELS, symmetric=True)
    glcm = glcm[1:, 1:].astype(np.float64)
    totals = glcm.sum(axis=(0, 1))
    if (totals > 0).all():
        for prop in _GLCM_PROPS:
            values = graycoprops(glcm, prop)  # (distances, angles); normalises each matrix itself
            for k, d in enumerate(GLCM_DISTANCES):
                out[f"{region}_glcm_{prop}_d{d}"] = float(np.nan_to_num(values[k].mean(), nan=1.0))
    hist = np.bincount(lbp[mask], minlength=LBP_POINTS + 2)[: LBP_POINTS + 2]
    hist = hist / hist.sum()
    for b, v in enumerate(hist):
        out[f"{region}_lbp_{b}"] = float(v)
    return out


def _granulometry(image: np.ndarray, lab_a: np.ndarray, cell: np.ndarray) -> dict[str, float]:
    """Granule size spectrum: what grey openings of growing radius remove inside the cell."""
    from skimage.morphology import disk, opening

    dark = 255 - image[..., 1]
    red = np.clip((lab_a + 20.0) * 3.0, 0, 255).astype(np.uint8)  # lab a ∈ ~[-20, 65] → uint8
    out = {}
    ys, xs = np.nonzero(cell)
    pad = max(GRANULE_RADII) + 1
    box = (slice(max(0, ys.min() - pad), ys.max() + pad + 1), slice(max(0, xs.min() - pad), xs.max() + pad + 1))
    inside = cell[box]
    for ch, img in (("dark", dark), ("lab_a", red)):
        prev = img[box].astype(np.float32)
        for r in GRANULE_RADII:
            opened = opening(img[box], disk(r)).astype(np.float32)
            out[f"cell_granules_{ch}_r{r}"] = float((prev - opened)[inside].mean() / 255.0)
            prev = opened
    return out


# --- batch extraction with a disk cache ---------------------------------------------------------

def _cache_file(sha: str) -> Path:
    from hematoscope.paths import cache_dir

    from hematoscope.classical.bundle import classical_preprocess

    # keyed by the decoding too: a crop with edge bars has other features once they are filled
    pre = classical_preprocess()
    decoding = f"bars-{pre.bars}" + ("" if pre.jpeg_draft else "-full")
    return cache_dir("classical", f"features-v{FEATURE_VERSION}-{decoding}", sha[:2]) / f"{sha}.npy"


def _features_of_item(item, use_cache: bool, on_error: str) -> np.ndarray:
    from hematoscope.classical.bundle import classical_preprocess
    from hematoscope.data.images import ImageError, load_model_image

    if isinstance(item, np.ndarray):
        return cell_features(item)
    data = Path(item).read_bytes() if isinstance(item, (str, Path)) else bytes(item)
    cache = _cache_file(hashlib.sha256(data).hexdigest()) if use_cache else None
    if cache is not None and cache.exists():
        try:
            cached = np.load(cache, allow_pickle=False)
            if cached.shape == (len(FEATURES),):
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    try:
        # the one decoding of every path: training features = prediction features
        vec = cell_features(load_model_image(data, classical_preprocess()))
    except ImageError as exc:
        if on_error == "raise":
            raise ImageError(exc.reason, str(item) if isinstance(item, (str, Path)) else None) from None
        return np.full(len(FEATURES), np.nan, np.float32)
    if cache is not None:
        from hematoscope._io import atomic_path

        with atomic_path(cache, ".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, vec, allow_pickle=False)
    return vec


def _features_of_chunk(items, use_cache: bool, on_error: str) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty-slice stats become NaN on purpose
        return np.stack([_features_of_item(x, use_cache, on_error) for x in items])


class ClassicalFeatures(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: single-cell images → the named feature matrix of :data:`FEATURES`.

    Stateless (``fit`` learns nothing), so it can sit first in a ``Pipeline``.

    Args:
        n_jobs: worker processes (joblib); 1 computes in-process.
        cache: cache features of files/bytes on disk, keyed by the file's sha256 and
            :data:`FEATURE_VERSION`, under ``hematoscope.paths.cache_dir("classical")``.
        on_error: ``"raise"`` an ``ImageError`` for an unreadable image, or ``"nan"`` to return an
            all-NaN row for it.
        chunk_size: images per joblib task.
        progress: show a progress bar for large inputs.
    """

    def __init__(self, n_jobs: int = 2, cache: bool = True, on_error: str = "raise", chunk_size: int = 64,
                 progress: bool = False):
        self.n_jobs = n_jobs
        self.cache = cache
        self.on_error = on_error
        self.chunk_size = chunk_size
        self.progress = progress

    def fit(self, X=None, y=None):
        """No-op (the features are fixed); returns self."""
        if self.on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan'; got {self.on_error!r}")
        self.n_features_out_ = len(FEATURES)
        return self

    def transform(self, X: Iterable) -> np.ndarray:
        """Feature matrix (N, len(FEATURES)) float32 of images given as arrays, paths or bytes.

        Raises:
            ImageError: an input cannot be decoded (with ``on_error="raise"``).
        """
        if self.on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan'; got {self.on_error!r}")
        items = list(X)
        if not items:
            return np.zeros((0, len(FEATURES)), np.float32)
        chunks = [items[i:i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]
        if self.n_jobs == 1 or len(chunks) == 1:
            results = (_features_of_chunk(c, self.cache, self.on_error) for c in chunks)
        else:
            from joblib import Parallel, delayed

            results = Parallel(n_jobs=self.n_jobs, return_as="generator")(
                delayed(_features_of_chunk)(c, self.cache, self.on_error) for c in chunks)
        if self.progress:
            from hematoscope.progress import track

            results = track(results, total=len(chunks), description="classical features")
        return np.concatenate(list(results)).astype(np.float32, copy=False)

    def get_feature_names_out(self, input_features: Sequence[str] | None = None) -> np.ndarray:
        """Names of the output columns, in order (see :data:`FEATURES` for units)."""
        return np.asarray(FEATURE_NAMES, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.no_validation = True  # inputs are images (arrays, paths or bytes), not a 2-D matrix
        tags.input_tags.two_d_array = False
        tags.transformer_tags.preserves_dtype = []  # always float32 features
        return tags


def features_markdown() -> str:
    """The feature table as Markdown (name | unit | description), as printed in docs/classical.md."""
    lines = ["| # | feature | unit | description |", "|---|---|---|---|"]
    lines += [f"| {i} | `{f.name}` | {f.unit} | {f.description} |" for i, f in enumerate(FEATURES)]
    return "\n".join(lines) + "\n"
