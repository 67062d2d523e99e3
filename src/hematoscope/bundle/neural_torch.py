"""The PyTorch side of the neural bundle kind, kept apart so that ONNX-only inference never
imports torch (it costs seconds of start-up). Re-exported by :mod:`hematoscope.bundle.neural`."""
from __future__ import annotations

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
