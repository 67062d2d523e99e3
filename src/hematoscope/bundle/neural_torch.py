"""The PyTorch side of the neural bundle kind, kept apart so that ONNX-only inference never
imports torch (it costs seconds of start-up). Re-exported by :mod:`hematoscope.bundle.neural`."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hematoscope._extras import require

require("torch", extra="train", purpose="a neural bundle's PyTorch network (used when the bundle has no model.onnx, "
        "with backend 'torch', and by adapt, export and Grad-CAM)")

import torch  # noqa: E402 - needs the extra checked above
from torch import nn  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ClassifierNet(nn.Module):
    """A timm classifier whose forward returns ``(logits, pooled features)``.

    The features are the globally pooled penultimate activations (1,280-d for Lite0): what the
    classifier layer sees, and what out-of-distribution scorers are fitted on.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features


class TorchRunner:
    """Runs a :class:`ClassifierNet` for inference (eval mode, no autograd, channels_last)."""

    def __init__(self, net: ClassifierNet):
        self.net = net

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            logits, features = self.net(t)
        return logits.float().numpy(), features.float().numpy()


def adapt_batchnorm(net: nn.Module, batches) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm layer of ``net`` from
    ``batches`` (preprocessed float tensors), as an equal-weight average over batches; nothing
    else changes. Returns the number of BatchNorm layers."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in layers]
    net.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                net(x.contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        net.eval()
    return len(layers)


def tune_unlabelled(net: ClassifierNet, images: torch.Tensor, classes: list[int], *, epochs: int,
                    lr: float = 1e-4, pseudo_label_weight: float = 0.3, batch_size: int = 64,
                    seed: int = 0, class_mix: Sequence[float] | None = None) -> list[float]:
    """Source-free adaptation of ``net`` to one lab's unlabelled ``images`` (preprocessed, N x 3 x
    H x W) by information maximisation with self-supervised pseudo-labels (SHOT, Liang et al.,
    ICML 2020), over the lab's ``classes`` (output indices) only.

    The classifier layer stays fixed; the rest of the network, BatchNorm statistics included
    (layers in training mode from the adapted statistics, momentum 0.1), learns to give each image
    a confident answer (low entropy) while the mean answer over all images stays close to the lab's
    ``class_mix`` (shares of ``classes``; None = equal shares, SHOT's high entropy of the mean: no
    collapse onto one class, the failure of entropy minimisation alone), plus a cross-entropy
    towards labels from class centroids of the current features, renewed every epoch. Batches are
    flipped and rotated by multiples of 90°. Returns the mean loss per epoch."""
    import torch.nn.functional as F

    head = set(map(id, net.model.get_classifier().parameters()))
    params = [p for p in net.parameters() if id(p) not in head]
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(p, p.requires_grad) for p in net.parameters()]
    idx = torch.as_tensor(classes)
    mix = torch.full((len(classes),), 1 / len(classes)) if class_mix is None else torch.as_tensor(class_mix).float()
    if mix.shape != (len(classes),) or not torch.isclose(mix.sum(), torch.tensor(1.0)) or (mix <= 0).any():
        raise ValueError(f"class_mix must hold {len(classes)} positive shares summing to 1; got {class_mix}")
    log_mix = mix.log()
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in net.parameters():
            p.requires_grad_(id(p) not in head)
        opt = torch.optim.Adam(params, lr=lr)
        try:
            for _ in range(epochs):
                net.eval()
                with torch.no_grad():
                    outs = [net(images[i:i + 128]) for i in range(0, len(images), 128)]
                    probs = torch.cat([o[0] for o in outs])[:, idx].softmax(1)
                    feats = F.normalize(torch.cat([o[1] for o in outs]), dim=1)
                    centroids = F.normalize(probs.T @ feats, dim=1)
                    for _ in range(2):  # k-means steps from the soft centroids
                        target = (feats @ centroids.T).argmax(1)
                        centroids = F.normalize(F.one_hot(target, len(classes)).float().T @ feats, dim=1)
                    target = (feats @ centroids.T).argmax(1)
                for m in norms:  # the statistics follow the tuned features (no dropout elsewhere)
                    m.train()
                total, order = 0.0, torch.randperm(len(images))
                for start in range(0, len(images), batch_size):
                    batch = order[start:start + batch_size]
                    if len(batch) < 2:  # BatchNorm needs two images
                        continue
                    x = images[batch]
                    x = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, x.flip(3), x)
                    x = torch.rot90(x, int(torch.randint(0, 4, ())), (2, 3))
                    logits = net(x.contiguous(memory_format=torch.channels_last))[0][:, idx]
                    p = logits.softmax(1)
                    confident = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
                    mean = p.mean(0)
                    diverse = (mean * (mean.clamp_min(1e-8).log() - log_mix)).sum()  # KL(mean answer ‖ mix)
                    loss = confident + diverse + pseudo_label_weight * F.cross_entropy(logits, target[batch])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(batch)
                losses.append(total / len(images))
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
            net.eval()
    return losses


def batchnorm_statistics(net: nn.Module) -> dict[str, torch.Tensor]:
    """The running mean and variance buffers of every BatchNorm layer (live tensors)."""
    return {f"{name}.{stat}": getattr(m, stat) for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for stat in ("running_mean", "running_var")}


def same_state(path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether the safetensors file at ``path`` holds exactly ``state`` (names, dtypes, values)
    and ``metadata``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != metadata or set(f.keys()) != set(state):
                return False
            return all(torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype for k, v in state.items())
    except (OSError, RuntimeError, ValueError):  # missing or unreadable: write it anew
        return False
