"""Training data: the run's split, images decoded once into RAM, and the two kinds of transform.

- Training images are decoded once, resized to ``pre_size`` (shorter side, centre square) and
  kept as uint8 in memory (a memory guard falls back to decoding every epoch). Each item is a
  random ``size`` crop (optionally scale-jittered), rotated by a multiple of 90° and maybe
  flipped; optional RandAugment / AugMix act on the uint8 crop. Colour and stain jitter run
  batched on the device in :func:`batch_color_jitter`.
- Evaluation items are exactly the bundle's :class:`~hematoscope.models.preprocess.Preprocess`
  output (no randomness), the same function predict, ONNX and serve use.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hematoscope.data.images import ImageError, load_model_image
from hematoscope.data.samples import class_column, require_labels, resolve_group_by
from hematoscope.models.preprocess import Preprocess
from hematoscope.progress import track
from hematoscope.train.config import TrainConfig

log = logging.getLogger("hematoscope")
SPLIT_FILE = "split.csv"


class TrainDataError(ValueError):
    """The training data cannot be used (no images, a class without training images ...)."""


# --- the run's split ----------------------------------------------------------------------
#: The sha256 of the run's split.csv as the run wrote it: a resumed run refuses an edited split.
SPLIT_HASH_FILE = "split.csv.sha256"


def prepare_split(config: TrainConfig, run_dir: Path, *, resume: bool = False):
    """The table the run trains on, with ``split`` in {train, val}, saved as ``RUN_DIR/split.csv``.

    DATA with a ``split`` column (a split file) is used as it is (its test rows are left out);
    otherwise a stratified validation split (``val_fraction``, ``seed``) is made. A resumed run
    (``resume``) reads its own ``split.csv`` back.

    Returns:
        (table, labels): the train/val rows and the sorted class names.

    Raises:
        TrainDataError: no training or validation rows, or a validation class unseen in training.
    """
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import load_split, make_split, save_split, train_val_rows

    from hematoscope._io import file_sha256, write_text

    split_file = run_dir / SPLIT_FILE
    fingerprint = run_dir / SPLIT_HASH_FILE
    if resume:
        if fingerprint.is_file() and file_sha256(split_file) != fingerprint.read_text().strip():
            # its val rows pick the checkpoint and are the run's held-out images for trust fit
            raise TrainDataError(f"{split_file} changed since the run started: the rows trained and validated on "
                                 "so far would no longer be the file's. Restore it, or start a new run with the "
                                 "edited file as DATA")
        table = load_split(split_file)
    else:
        table = read_dataset(config.data, reader=config.reader)
        require_labels(table, "training")
        split = train_val_rows(table, fold=config.fold)
        if config.limit_per_class:  # of the rows the run may use: a split file's test rows never count
            table = _limited(table if split is None else split, config.limit_per_class, config.seed)
            split = None if split is None else table
        # crops of one cell or patient (a ``patient`` column with ids) never straddle train and val
        table = split if split is not None else make_split(table, val=config.val_fraction, test=0.0, seed=config.seed,
                                                           group_by=resolve_group_by(table))
        save_split(table, split_file)
        write_text(fingerprint, file_sha256(split_file) + "\n")
        table = load_split(split_file, verify=False)
    table = table.assign(cls=class_column(table)).reset_index(drop=True)
    train_classes = set(table.loc[table["split"] == "train", "cls"])
    val_classes = set(table.loc[table["split"] == "val", "cls"])
    if not train_classes or not val_classes:
        raise TrainDataError(f"{config.data}: need both training and validation images "
                             f"(got {len(train_classes)} train / {len(val_classes)} val classes)")
    if len(train_classes) < 2:
        raise TrainDataError(f"{config.data}: need at least 2 classes to train, found {sorted(train_classes)}")
    if val_classes - train_classes:
        raise TrainDataError(f"validation classes {sorted(val_classes - train_classes)} have no training images")
    if not resume:  # said once, before anything is decoded or trained
        warn_about_classes(table)
    return table, sorted(train_classes)


def _limited(table, per_class: int, seed: int):
    """At most ``per_class`` rows of each class, drawn at random; with a ``split`` column (train /
    val), each class keeps its train : val proportion (at least one val row where it had any).
    The draw has its own random stream: the split's seeded order (``make_split``) would hand the
    first rows of each class to one side."""
    rng = np.random.default_rng([seed, 0x11D17])  # not default_rng(seed): that is make_split's
    classes = class_column(table)
    keep = []
    for cls in sorted(set(classes)):
        rows = np.flatnonzero(classes == cls)
        n = min(per_class, len(rows))
        if "split" not in table:
            keep.extend(rng.permutation(rows)[:n])
            continue
        val = rows[(table["split"].to_numpy()[rows] == "val")]
        train = np.setdiff1d(rows, val)
        n_val = 0 if not len(val) else min(len(val), max(1, round(n * len(val) / len(rows))), n - (n > 1))
        keep.extend(rng.permutation(val)[:n_val])
        keep.extend(rng.permutation(train)[:n - n_val])
    return table.iloc[sorted(keep)]


#: Fewer validation images of a class than this and its validation scores (which pick the best
#: checkpoint) move in steps too large to mean much.
MIN_VAL_PER_CLASS = 5


def warn_about_classes(table) -> list[str]:
    """Log (and return) warnings about the classes of a run's train/val ``table`` (columns
    ``label``, ``canonical``, ``split``, ``cls``): labels the taxonomy does not know (each
    trains as a class of its own: a typo makes an extra class), and classes with no or fewer
    than :data:`MIN_VAL_PER_CLASS` validation images. Research data may have labels of its own,
    so nothing is refused (the taxonomy's rule: unknown labels are reported, never guessed)."""
    from hematoscope.taxonomy import unknown_labels_note

    counts = table.groupby(["cls", "split"]).size().unstack(fill_value=0).reindex(columns=["train", "val"],
                                                                                 fill_value=0)
    n_train, n_val = counts["train"], counts["val"]
    canon = table["canonical"] if "canonical" in table else None
    unknown = table[canon.isna() | (canon.astype(str).str.strip() == "")] if canon is not None else table
    note = unknown_labels_note({c: f"{n_train[c]} train, {n_val[c]} val" for c in set(unknown["cls"])},
                               set(counts.index) - set(unknown["cls"]), what="each trained as a class of its own")
    notes = [note] if note else []
    none = [c for c in counts.index if n_val[c] == 0]
    if none:
        notes.append(f"class(es) without validation images: {', '.join(f'{c} ({n_train[c]} train)' for c in none)}; "
                     "their accuracy is not measured and the best checkpoint is picked without them")
    few = [c for c in counts.index if 0 < n_val[c] < MIN_VAL_PER_CLASS]
    if few:
        notes.append(f"class(es) with fewer than {MIN_VAL_PER_CLASS} validation images: "
                     f"{', '.join(f'{c} ({n_val[c]})' for c in few)}; their validation scores are noisy")
    for note in notes:
        log.warning("warning: %s", note)
    return notes


# --- decoding -------------------------------------------------------------------------------
def decode_all(paths: Sequence[str], spec: Preprocess, *, description: str) -> tuple[np.ndarray, list[int], list]:
    """Decode (``load_model_image``: the decoding every other path uses) and resize images with
    ``spec.resize_image`` using two threads.

    Returns:
        (images uint8 (N_ok, S, S, 3), indices of the decoded paths, [(path, reason)] skipped).
    """
    def one(path: str):
        try:
            return spec.resize_image(load_model_image(path, spec))
        except ImageError as exc:
            return exc

    out = np.empty((len(paths), spec.size, spec.size, 3), dtype=np.uint8)
    kept, skipped = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:  # PIL releases the GIL while decoding
        for i, res in enumerate(track(pool.map(one, paths), total=len(paths), description=description)):
            if isinstance(res, ImageError):
                skipped.append((paths[i], res.reason))
            else:
                out[len(kept)] = res
                kept.append(i)
    return out[:len(kept)], kept, skipped


def fits_in_memory(n_images: int, side: int, max_gb: float) -> bool:
    """Memory guard: caching needs ``n * side² * 3`` bytes, at most ``max_gb`` and half the free RAM."""
    import psutil

    need = n_images * side * side * 3
    return need <= max_gb * 1e9 and need <= 0.5 * psutil.virtual_memory().available


# --- datasets -------------------------------------------------------------------------------
class TrainImages(Dataset):
    """Randomly augmented ``size`` crops (uint8 CHW tensors) and class indices.

    Args:
        images: cached uint8 (N, pre, pre, 3) images, or None to decode ``paths`` on access.
        paths: image paths (used when ``images`` is None).
        targets: class index per image.
        config: sizes and augmentation options.
        subtargets: subtype index per image (-1: none), returned as a third item when given.
    """

    def __init__(self, images: np.ndarray | None, paths: Sequence[str], targets: np.ndarray, config: TrainConfig,
                 subtargets: np.ndarray | None = None):
        self.images, self.paths, self.targets = images, list(paths), np.asarray(targets, dtype=np.int64)
        self.subtargets = subtargets
        self.size, self.pre_size, self.scale_jitter = config.size, config.pre_size, config.scale_jitter
        self.config = config
        self.cache_spec = Preprocess(size=config.pre_size, resize="shorter_crop", bars=config.bars)
        self.extra = _policy(config.augment)

    def __len__(self) -> int:
        return len(self.targets)

    def _image(self, i: int) -> np.ndarray:
        if self.images is not None:
            return self.images[i]
        return self.cache_spec.resize_image(load_model_image(self.paths[i], self.cache_spec))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # ShareSampler yields epoch * len + i: an item's random crop and degradations are drawn
        # from (seed, epoch, i) alone, in any process, so a resumed run repeats them exactly.
        epoch, i = divmod(int(index), len(self.targets))
        torch.manual_seed((self.config.seed * 1_000_003 + epoch) * 10_000_019 + i)
        img = self._image(i)
        side = self.size
        if self.config.scale_range is not None:
            low, high = np.log(self.config.scale_range)
            side = max(8, round(self.size * float(np.exp(low + (high - low) * float(torch.rand(()))))))
        elif self.scale_jitter:
            f = 1 + self.scale_jitter * (2 * float(torch.rand(())) - 1)
            side = max(8, round(self.size * f))
        if side > self.pre_size:  # zoom out: the cell smaller in the frame, surroundings mirrored
            pad = side - self.pre_size
            img = np.pad(img, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)), mode="reflect")
        y0, x0 = (int(v) for v in torch.randint(0, img.shape[0] - side + 1, (2,)))
        crop = img[y0:y0 + side, x0:x0 + side]
        if side != self.size:
            from PIL import Image

            crop = np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.Resampling.BILINEAR))
        crop = np.rot90(crop, int(torch.randint(0, 4, ())))
        if float(torch.rand(())) < 0.5:  # rot90 x horizontal flip = all 8 symmetries of the square
            crop = crop[:, ::-1]
        crop = degrade(np.ascontiguousarray(crop), self.config)
        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        if self.extra is not None:
            x = self.extra(x)
        if self.subtargets is not None:
            return x, int(self.targets[i]), int(self.subtargets[i])
        return x, int(self.targets[i])


class EvalImages(Dataset):
    """Model inputs exactly as the bundle's ``preprocess`` makes them (float32 CHW), no randomness.

    Args:
        resized: uint8 (N, size, size, 3) images already passed through ``preprocess.resize_image``,
            or None to decode ``paths`` on access.
        paths: image paths (used when ``resized`` is None).
        targets: class index per image.
        preprocess: the bundle's preprocessing.
    """

    def __init__(self, resized: np.ndarray | None, paths: Sequence[str], targets: np.ndarray, preprocess: Preprocess):
        self.resized, self.paths, self.targets = resized, list(paths), np.asarray(targets, dtype=np.int64)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.resized is not None:
            x = self.preprocess.normalize(self.resized[i][None])[0]
        else:
            x = self.preprocess([load_model_image(self.paths[i], self.preprocess)])[0]
        return torch.from_numpy(x), int(self.targets[i])


def _policy(augment: str):
    if augment == "basic":
        return None
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=2, magnitude=7) if augment == "randaugment" else v2.AugMix(severity=2)


def degrade(crop: np.ndarray, config: TrainConfig) -> np.ndarray:
    """Optics and camera of another lab on one uint8 (H, W, 3) crop, each with its own
    probability from ``config``: defocus blur, a lower-resolution camera (down and up again),
    JPEG compression, a black bar on one edge. Draws from torch's RNG (seeded per epoch)."""
    from PIL import Image, ImageFilter

    def chance(p: float) -> bool:
        return p > 0 and float(torch.rand(())) < p

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand(()))

    h, w = crop.shape[:2]
    im = None
    if chance(config.blur_prob):
        im = Image.fromarray(crop).filter(ImageFilter.GaussianBlur(uniform(0.3, 1.5)))
    if chance(config.resample_prob):
        im = im or Image.fromarray(crop)
        f = uniform(0.35, 0.85)
        im = im.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BILINEAR).resize(
            (w, h), Image.Resampling.BILINEAR)
    if chance(config.jpeg_prob):
        import io

        im = im or Image.fromarray(crop)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(uniform(30, 90)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if im is not None:
        crop = np.asarray(im, dtype=np.uint8)
    if chance(config.bars_prob):
        crop = crop.copy()
        depth = max(1, round(uniform(0.05, 0.35) * h))
        edge = int(torch.randint(0, 4, ()))
        if edge == 0:
            crop[:depth] = 0
        elif edge == 1:
            crop[-depth:] = 0
        elif edge == 2:
            crop[:, :depth] = 0
        else:
            crop[:, -depth:] = 0
    return crop


def batch_stain_jitter(x: torch.Tensor, *, hue: float = 0.0, gamma: float = 0.0, hed: float = 0.0,
                       noise: float = 0.0, grey: float = 0.0) -> torch.Tensor:
    """Another lab's stain and camera on a float batch in [0, 1] (N, 3, H, W), one draw per
    image: hue rotation (± ``hue`` of the circle, in YIQ), gamma (exp(± ``gamma``)),
    haematoxylin / eosin / DAB optical densities scaled (± ``hed``) and shifted (± ``hed``/10),
    Gaussian noise (sd up to ``noise``, on half of the images), and a ``grey`` share of the
    images turned grey (the model must also read shape, not colour alone)."""
    n, dev = x.shape[0], x.device

    def u(*shape):
        return 2 * torch.rand(n, *shape, device=dev) - 1

    if hed:
        from skimage.color import hed_from_rgb, rgb_from_hed

        to_hed = torch.as_tensor(hed_from_rgb, dtype=x.dtype, device=dev)
        to_rgb = torch.as_tensor(rgb_from_hed, dtype=x.dtype, device=dev)
        od = -torch.log(x.clamp_min(1 / 255)).permute(0, 2, 3, 1)  # (N, H, W, 3) optical density
        stains = od @ to_hed
        stains = stains * (1 + hed * u(1, 1, 3)) + 0.1 * hed * u(1, 1, 3)
        x = torch.exp(-(stains @ to_rgb)).permute(0, 3, 1, 2)
    if hue:
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=x.dtype, device=dev)
        theta = torch.pi * 2 * hue * u()
        c, s = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(n, 3, 3, dtype=x.dtype, device=dev)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
        m = torch.linalg.inv(yiq) @ rot @ yiq  # (N, 3, 3)
        x = torch.einsum("nij,njhw->nihw", m, x)
    x = x.clamp(0, 1)
    if gamma:
        x = x.pow(torch.exp(gamma * u(1, 1, 1)))
    if noise:  # half of the images, as on a camera that is noisy at some settings
        some = torch.rand(n, device=dev) < 0.5
        x[some] += noise * torch.rand(int(some.sum()), 1, 1, 1, device=dev) * torch.randn_like(x[some])
    if grey:
        some = torch.rand(n, device=dev) < grey
        x[some] = (0.299 * x[some, :1] + 0.587 * x[some, 1:2] + 0.114 * x[some, 2:3]).expand(-1, 3, -1, -1)
    return x.clamp_(0, 1)


def batch_random_conv(x: torch.Tensor, prob: float) -> torch.Tensor:
    """Random convolutions (Xu et al., ICLR 2021), a single-source domain-generalisation
    augmentation: a ``prob`` share of a float batch in [0, 1] (N, 3, H, W) is filtered by a random
    1-7 px kernel (random colour mixing and local texture), blended with the image by a random
    weight and stretched back to [0, 1]. The model then cannot lean on one lab's texture and
    colour rendering."""
    if not prob:
        return x
    x = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0], device=x.device) < prob)[:, 0].tolist():
        k = int(torch.randint(0, 4, ())) * 2 + 1
        weight = torch.randn(3, 3, k, k, device=x.device, dtype=x.dtype) / math.sqrt(3 * k * k)
        out = F.conv2d(F.pad(x[i:i + 1], [k // 2] * 4, mode="reflect"), weight)
        a = float(torch.rand(()))
        out = a * x[i:i + 1] + (1 - a) * out
        lo, hi = out.amin(dim=(2, 3), keepdim=True), out.amax(dim=(2, 3), keepdim=True)
        x[i:i + 1] = (out - lo) / (hi - lo).clamp_min(1e-6)
    return x


def batch_color_jitter(x: torch.Tensor, color: float, stain: float, saturation: float | None = None) -> torch.Tensor:
    """Random brightness, contrast, saturation (± ``color``, or with ``saturation`` a factor
    log-uniform in [1/(1+saturation), 1+saturation]) and per-channel stain scale/shift (± ``stain``),
    one draw per image, on a float batch in [0, 1] (N, 3, H, W)."""
    n = x.shape[0]

    def u(*shape):
        return 2 * torch.rand(n, *shape, 1, 1, device=x.device) - 1

    if color:
        x = x * (1 + color * u(1))
        gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = gray.mean((2, 3), keepdim=True) + (x - gray.mean((2, 3), keepdim=True)) * (1 + color * u(1))
    if color or saturation:
        gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = gray + (x - gray) * (1 + color * u(1) if saturation is None else torch.exp(math.log1p(saturation) * u(1)))
    if stain:
        x = x * (1 + stain * u(3)) + stain * u(3)
    return x.clamp_(0, 1)


# --- the Lightning data module -----------------------------------------------------------------
@dataclass
class SplitData:
    """Decoded images of one split: ``images`` uint8 (cache) or None, kept ``paths`` and ``targets``."""

    images: np.ndarray | None
    paths: list[str]
    targets: np.ndarray
    subtargets: np.ndarray | None = None  # subtype index per image (-1: none), when config.subtypes


class CellDataModule(L.LightningDataModule):
    """Decodes the run's train/val images once and serves augmented training batches (uint8)
    and preprocessed validation batches (float32).

    Args:
        table: the run's table (``split`` in train/val, ``cls`` = class name).
        labels: class names in output order.
        config: the run's configuration.
        preprocess: the bundle's evaluation preprocessing.
    """

    def __init__(self, table, labels: list[str], config: TrainConfig, preprocess: Preprocess, *,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.table, self.labels, self.config, self.preprocess = table, labels, config, preprocess
        # A multi-process run: this process decodes, caches and serves only its share of each
        # split (every world_size-th row, from ``rank``); batch_size is the global batch.
        self.rank, self.world_size = rank, world_size
        self.batch_size = config.batch_size // world_size
        self.train: SplitData | None = None
        self.val: SplitData | None = None
        self.skipped: list[tuple[str, str]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        index = {lab: i for i, lab in enumerate(self.labels)}
        parts = {}
        for split, spec in (("train", Preprocess(size=self.config.pre_size, resize="shorter_crop",
                                                  bars=self.config.bars, interpolation=self.preprocess.interpolation)),
                            ("val", self.preprocess)):
            rows = self.table[self.table["split"] == split]
            if self.world_size > 1:
                rows = rows.iloc[self.rank::self.world_size]
            paths = list(rows["path"])
            targets = np.array([index[c] for c in rows["cls"]], dtype=np.int64)
            sub = self._subtargets(rows) if split == "train" else None
            if fits_in_memory(len(paths), spec.size, self.config.max_cache_gb):
                images, kept, skipped = decode_all(paths, spec, description=f"decoding {split} images")
                self.skipped += skipped
                parts[split] = SplitData(images, [paths[i] for i in kept], targets[kept],
                                         None if sub is None else sub[kept])
            else:
                log.warning("%d %s images do not fit the memory guard; decoding them every epoch", len(paths), split)
                parts[split] = SplitData(None, paths, targets, sub)
        for path, reason in self.skipped:
            log.warning("skipped unreadable image %s (%s)", path, reason)
        self.train, self.val = parts["train"], parts["val"]
        if len(self.train.targets) == 0 or len(self.val.targets) == 0:
            raise TrainDataError("no readable training or validation images")
        if self.config.colour_norm != "none" and self.preprocess.colour == "none":  # (not yet known)
            self.preprocess = replace(self.preprocess, colour=self.config.colour_norm,
                                      colour_ref=self.colour_reference())

    @cached_property
    def subtype_names(self) -> list[str]:
        """The training rows' subtypes, sorted (empty unless ``config.subtypes``); read once per run."""
        if not self.config.subtypes:
            return []
        if "subtype" not in self.table.columns:
            raise TrainDataError(f"{self.config.data}: subtypes needs a 'subtype' column (the PBC reader fills it "
                                 f"from the file names)")
        names = sorted(set(_subtypes(self.table[self.table["split"] == "train"]).dropna()) - {""})
        if len(names) < 2:
            raise TrainDataError(f"{self.config.data}: subtypes needs at least 2 subtypes among the training rows, "
                                 f"found {names}")
        return names

    def _subtargets(self, rows) -> np.ndarray | None:
        if not self.config.subtypes:
            return None
        index = {name: i for i, name in enumerate(self.subtype_names)}
        return _subtypes(rows).map(index).fillna(-1).to_numpy(dtype=np.int64)

    def colour_reference(self, max_images: int = 2000) -> list[float]:
        """The canonical colour: median percentiles of (at most ``max_images``, a seeded draw of)
        the training images' centre crops, as the bundle's preprocessing will see them."""
        from hematoscope.models.preprocess import colour_reference

        if self.world_size > 1:
            return self._shared_colour_reference(max_images)
        n = len(self.train.targets)
        pick = np.sort(np.random.default_rng(self.config.seed).permutation(n)[:max_images])
        if self.train.images is not None:
            crops = self.eval_dataset("train").resized[pick]
        else:
            crops = np.stack([self.preprocess.resize_image(load_model_image(self.train.paths[i], self.preprocess))
                              for i in pick])
        return colour_reference(crops)

    def _shared_colour_reference(self, max_images: int) -> list[float]:
        """The same reference in every process of a multi-process run, equal to a single
        process's: the same seeded draw from all training rows, decoded and centre-cropped as the
        cache would hold them (unreadable drawn files are left out)."""
        from hematoscope.models.preprocess import colour_reference

        paths = list(self.table.loc[self.table["split"] == "train", "path"])
        pick = np.sort(np.random.default_rng(self.config.seed).permutation(len(paths))[:max_images])
        spec = Preprocess(size=self.config.pre_size, resize="shorter_crop", bars=self.config.bars,
                          interpolation=self.preprocess.interpolation)
        images, _, _ = decode_all([paths[i] for i in pick], spec, description="colour reference")
        off = (self.config.pre_size - self.config.size) // 2
        return colour_reference(images[:, off:off + self.config.size, off:off + self.config.size])

    def whole(self) -> "CellDataModule":
        """All train and val images in this process (rank 0 of a multi-process run, after
        training: final metrics and trust fitting see the whole sets), with this module's
        preprocessing (its colour reference is kept, not recomputed)."""
        if self.world_size == 1:
            return self
        full = CellDataModule(self.table, self.labels, self.config, self.preprocess)
        full.setup("fit")
        return full

    def class_counts(self) -> np.ndarray:
        if self.world_size > 1:  # the whole training split's counts, the same in every process
            index = {lab: i for i, lab in enumerate(self.labels)}
            rows = self.table.loc[self.table["split"] == "train", "cls"]
            return np.bincount([index[c] for c in rows], minlength=len(self.labels))
        return np.bincount(self.train.targets, minlength=len(self.labels))

    def _loader(self, dataset, *, batch_size: int, shuffle: bool = False, sampler=None, drop_last=False):
        workers = self.config.workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        ds = TrainImages(self.train.images, self.train.paths, self.train.targets, self.config, self.train.subtargets)
        weights = None
        if self.config.sampler == "weighted":
            weights = (1.0 / np.maximum(self.class_counts(), 1))[self.train.targets]
        n = self.samples_per_process() if self.world_size > 1 else len(ds)
        sampler = ShareSampler(len(ds), n, seed=self.config.seed, rank=self.rank, weights=weights,
                               current_epoch=lambda: self.trainer.current_epoch if self.trainer else 0)
        return self._loader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=n > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("val"), batch_size=2 * self.batch_size)

    def eval_dataset(self, split: str) -> EvalImages:
        """Deterministic, preprocessed images of ``split``. Train images are centre crops of the
        cache, which equal ``preprocess`` of the original because the cache side is
        size / crop_pct (to within one pixel of position when that side minus size is odd)."""
        part = self.train if split == "train" else self.val
        if split == "train" and part.images is not None:
            off = (self.config.pre_size - self.config.size) // 2
            resized = part.images[:, off:off + self.config.size, off:off + self.config.size]
            return EvalImages(resized, part.paths, part.targets, self.preprocess)
        return EvalImages(part.images, part.paths, part.targets, self.preprocess)

    def steps_per_epoch(self) -> int:
        if self.world_size > 1:
            n, b = self.samples_per_process(), self.batch_size
        else:
            n, b = len(self.train.targets), self.config.batch_size
        return max(1, n // b if n > b else 1)

    def samples_per_process(self) -> int:
        """Training images each process sees per epoch in a multi-process run: the same number
        in every process (else the processes would wait for each other's missing steps)."""
        return max(1, int((self.table["split"] == "train").sum()) // self.world_size)


def _subtypes(rows):
    """The rows' ``subtype`` column as text, missing values kept missing: the one reading of it
    behind both the subtype names and the per-row targets."""
    return rows["subtype"].astype("string")


class ShareSampler(torch.utils.data.Sampler):
    """One process's share of a multi-process epoch: ``num_samples`` indices into its own
    ``n`` training images, a fresh order every epoch from (seed, rank, epoch), so a resumed run
    draws what an unbroken one would. A share shorter than ``num_samples`` repeats images; with
    ``weights``, indices are drawn with replacement in proportion to them (class balancing)."""

    def __init__(self, n: int, num_samples: int, *, seed: int, rank: int, weights: np.ndarray | None = None,
                 current_epoch: Callable[[], int] = lambda: 0):
        self.n, self.num_samples, self.seed, self.rank = n, num_samples, seed, rank
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = None
        self._current_epoch = current_epoch

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch ...
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        # ... but a process's first iterator is made before that call: then the trainer's
        # (restored) epoch counts
        epoch = self.epoch if self.epoch is not None else self._current_epoch()
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        else:
            order = torch.cat([torch.randperm(self.n, generator=g)
                               for _ in range(-(-self.num_samples // self.n))])[:self.num_samples]
        return iter((order + epoch * self.n).tolist())  # the epoch travels with the index


def eval_preprocess(config: TrainConfig) -> Preprocess:
    """The bundle's preprocessing for a run: shorter side to size / crop_pct, centre crop ``size``."""
    return Preprocess(size=config.size, resize="shorter_crop", crop_pct=config.crop_pct, bars=config.bars)
