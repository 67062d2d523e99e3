"""Training configuration: one pydantic model, loadable from YAML, overridable from the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hematoscope.models.preprocess import MAX_INPUT_SIZE


class TrainConfig(BaseModel):
    """Everything that defines a training run (saved as ``RUN_DIR/train_config.json``).

    The defaults are the best recipe measured (the shipped default model's, written out in
    ``recipes/default-model.yaml``; docs/crosslab.md measures each part): EfficientNet-Lite0 from
    the shipped SimCLR blood-cell weights, 128 px random crops of 144 px images, 24 epochs, AdamW
    (backbone 3e-4, head 1e-3), batch 64, label smoothing 0.1, cosine schedule, per-image colour
    canonicalisation, and domain randomisation of stain, hue, gamma, optics, camera and framing.
    """

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="dataset folder (any reader) or split CSV")
    out: str = Field(description="run directory")
    reader: str | None = Field(None, description="dataset reader name; None = auto-detect")
    name: str | None = Field(None, description="bundle name; default: the run directory's name")

    # model
    arch: str = "efficientnet_lite0"
    weights: str | None = Field("hematoscope-simclr-pbc", description="backbone weights: hematoscope-simclr-pbc "
                                "(Lite0, self-supervised on blood cells), imagenet-offline (Lite0), a file, a URL, "
                                "hf-hub:..., or None for random")
    size: int = Field(128, ge=8, le=MAX_INPUT_SIZE, description="model input side (px)")
    crop_pct: float = Field(128 / 144, gt=0.1, le=1.0, description="eval centre crop fraction; training crops "
                            "`size` px at random from images resized to size / crop_pct")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")
    weights_dtype: Literal["float32", "float16"] = "float16"

    # optimisation
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="head learning rate")
    backbone_lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    freeze_epochs: int = Field(0, ge=0, description="train only the head for this many epochs first")
    norm: Literal["batch", "group", "group_early"] = Field(
        "batch", description="normalisation layers: batch (as the architecture defines them), group (GroupNorm, 8 groups, in place of every BatchNorm: for training from scratch) or group_early (GroupNorm in the stem and first three stages, BatchNorm deeper; see models.backbones.NORMS)")
    frozen_bn: bool = Field(False, description="keep the backbone's BatchNorm statistics at their pretrained "
                            "values (layers in eval mode; their scale and shift still learn), a known guard "
                            "against shift between labs")
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = Field(0.03, ge=0, lt=1, description="linear warm-up share of steps (cosine)")
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    sampler: Literal["none", "weighted"] = "none"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema: float = Field(0.0, ge=0, lt=1, description="decay of an exponential moving average of the weights and "
                       "BatchNorm statistics, updated every step (Lightning's EMAWeightAveraging): validation, the "
                       "best checkpoint and the bundle use the average; 0 = off")

    # input canonicalisation (stored in the bundle's Preprocess: training, predict, ONNX and serve
    # all apply it)
    colour_norm: Literal["none", "percentile"] = Field(
        "percentile", description="per-image colour canonicalisation: map each channel's 1st/99th percentiles "
        "onto the training set's median (removes most stain / white-balance / contrast differences between labs)")
    bars: Literal["keep", "fill"] = Field(
        "fill", description="near-black bars along an image's edges (padding where a lab's crop ran past its slide "
        "image) painted with the image's white point before anything else (Preprocess.bars)")

    # augmentation (training only; evaluation always uses the bundle's Preprocess). The colour
    # ops run batched before the canonicalisation, the others per image on the uint8 crop.
    augment: Literal["basic", "randaugment", "augmix"] = "basic"
    color_jitter: float = Field(0.2, ge=0, lt=1, description="brightness/contrast/saturation ± fraction")
    saturation_jitter: float | None = Field(None, ge=0, le=3, description="per-pixel saturation scaled by a "
                                            "factor log-uniform in [1/(1+value), 1+value] (another lab's paler or "
                                            "stronger stain); default: the ± color_jitter fraction")
    stain_jitter: float = Field(0.1, ge=0, lt=1, description="per-channel (stain) scale/shift ± fraction")
    hue_jitter: float = Field(0.05, ge=0, le=0.5, description="hue rotation ± fraction of the colour circle")
    gamma_jitter: float = Field(0.25, ge=0, lt=1, description="gamma in exp(± value)")
    hed_jitter: float = Field(0.05, ge=0, lt=1, description="haematoxylin/eosin/DAB optical-density scale ± "
                              "value and shift ± value/10 (stain strength and balance)")
    noise: float = Field(0.03, ge=0, lt=0.5, description="Gaussian pixel noise, standard deviation up to this")
    grey_prob: float = Field(0.1, ge=0, le=1, description="share of crops turned grey (shape over colour)")
    blur_prob: float = Field(0.3, ge=0, le=1, description="share of crops defocused (Gaussian, sigma 0.3-1.5 px)")
    resample_prob: float = Field(0.3, ge=0, le=1, description="share of crops downsampled (35-85 %%) and "
                                 "upsampled back (a lower-resolution camera)")
    jpeg_prob: float = Field(0.3, ge=0, le=1, description="share of crops re-encoded as JPEG quality 30-90")
    bars_prob: float = Field(0.15, ge=0, le=1, description="share of crops with a black bar on one edge "
                             "(crops cut at the edge of a field)")
    scale_jitter: float = Field(0.3, ge=0, lt=1, description="random crop side ± fraction before resizing; "
                                "sides beyond the cached image are reflect-padded (the cell smaller in the frame)")
    scale_range: tuple[float, float] | None = Field(None, description="random crop side as a factor of the input "
                                                   "size, log-uniform in [low, high] (overrides scale_jitter; "
                                                   "above 1 the cell is smaller in the frame): a range leaning to "
                                                   "zooming out trains on labs whose cells look smaller than PBC's")
    random_conv: float = Field(0.0, ge=0, le=1, description="share of crops filtered by a random 1-7 px "
                               "convolution (RandConv: random colour mixing and texture)")
    mixstyle: float = Field(0.0, ge=0, le=1, description="chance per batch of mixing feature statistics "
                            "between images after the backbone's first three stages (MixStyle: synthesises "
                            "new image styles inside the network; training only)")
    consistency: float = Field(0.0, ge=0, description="weight of a colour-invariance term: each batch is seen "
                               "under two independent colour/stain draws (both trained on) and the cosine distance "
                               "between the two views' pooled features is added to the loss, so another lab's "
                               "colours move a cell less in the feature space the OOD flag reads; doubles the "
                               "cost of a step; measured in docs/crosslab.md: it did not lower another lab's "
                               "flagged share; 0 = off")
    mix: float = Field(0.0, ge=0, le=1, description="share of batches mixed by MixUp or CutMix (torchvision, "
                       "one of the two at random, alpha 1): pairs of crops blended or patched together, trained "
                       "towards their mixed labels; cross-entropy only; 0 = off")
    subtypes: float = Field(0.0, ge=0, description="weight of an auxiliary cross-entropy over the data's "
                            "`subtype` column (PBC: band and segmented neutrophils, promyelocytes, myelocytes, "
                            "metamyelocytes ...), from a second linear layer on the pooled features that only "
                            "training uses: the bundle keeps its classes; rows without a subtype add nothing; "
                            "0 = off")

    # run control
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation share when DATA has no split (split by patient / cell group "
                                "when DATA has group ids)")
    fold: int | None = Field(None, ge=0, description="of a k-fold split file: the fold that validates (the "
                             "others train)")
    limit_per_class: int | None = Field(None, ge=1, description="use at most N images per class (quick runs)")
    early_stop: int | None = Field(None, ge=1, description="patience in epochs on val macro-F1; None = off")
    seed: int = 0
    devices: str = Field("auto", description="Lightning devices per node: auto, N processes / GPUs, or a list (0,1)")
    num_nodes: int = Field(1, ge=1, description="machines of a multi-node run (each runs `devices` processes)")
    strategy: str = Field("auto", description="Lightning strategy: auto (ddp when there is more than one process), "
                          "ddp, ... With several processes batch_size is the global batch, split between them")
    accelerator: str = "auto"
    precision: str = "32-true"
    workers: int = Field(0, ge=0, description="data loader worker processes")
    max_cache_gb: float = Field(4.0, ge=0, description="decode images into RAM up to this size; beyond it, "
                                "or beyond half the free memory, images are decoded every epoch")
    fit_trust: bool = Field(True, description="fit temperature, OOD scorer and abstain threshold at the end")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.frozen_bn and self.norm == "group":
            raise ValueError("frozen_bn keeps BatchNorm statistics; group-normalised layers have none")
        if self.freeze_epochs >= self.epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) must be below epochs ({self.epochs})")
        if self.mix and (self.loss != "ce" or self.consistency):
            raise ValueError("mix trains towards mixed labels with cross-entropy: it needs loss 'ce' and no consistency")
        if self.subtypes and (self.mix or self.consistency):
            raise ValueError("subtypes trains on each crop's own subtype: it cannot be combined with mix or consistency")
        if self.scale_range is not None and not 0.3 <= self.scale_range[0] < self.scale_range[1] <= 3:
            raise ValueError(f"scale_range must be [low, high] with 0.3 <= low < high <= 3; got {self.scale_range}")
        return self

    @property
    def pre_size(self) -> int:
        """Side of the cached training images (random ``size`` crops are taken from them)."""
        return round(self.size / self.crop_pct)

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides) -> "TrainConfig":
        """Load a YAML file; ``overrides`` win over the file.

        Raises:
            ValueError: unreadable YAML, unknown keys or invalid values.
        """
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of option: value")
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        raw.update(overrides)
        return cls.model_validate(raw)
