"""Self-supervised adaptation of a timm backbone to unlabelled cell images (SimCLR or DINO).

Both methods run on Lightning for a bounded wall-clock time, starting by default from the
offline ImageNet Lite0 weights (measured: most of the SimCLR gain for few labels comes in the
first ~7 CPU minutes at 112 px). The result is the backbone's state dict as safetensors, usable
as ``--backbone efficientnet_lite0 --weights BACKBONE.safetensors`` everywhere.

References:
    [0] Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
        (SimCLR), ICML 2020.
    [1] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hematoscope._extras import require

require("torch", "torchvision", "lightning", "timm", extra="research", purpose="self-supervised pretraining")

import lightning as L  # noqa: E402 - the imports below need the extra checked above
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hematoscope.models.backbones import DEFAULT_ARCH, OFFLINE_WEIGHTS  # noqa: E402

METHODS = ("simclr", "dino")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) of two views [0].

    Args:
        z1, z2: projections of the two views, shape (batch, dim); row i of each is one image.
        temperature: softmax temperature on cosine similarities.

    Returns:
        Scalar loss: each view must pick its partner among the 2*batch - 1 other views.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own partner
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def _out_dim(backbone: nn.Module) -> int:
    """Width of the pooled output of a timm model built with num_classes=0."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True),
                         nn.Linear(d_hidden, d_out))


class SimCLRModule(L.LightningModule):
    """SimCLR [0]: backbone → projector (num_features → 512 → 128), NT-Xent between two views."""

    def __init__(self, backbone: nn.Module, *, lr: float = 3e-4, temperature: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.projector = _mlp(_out_dim(backbone), 512, 128)
        self.lr, self.temperature = lr, temperature
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        v1, v2 = batch
        loss = nt_xent_loss(self.projector(self.backbone(v1)), self.projector(self.backbone(v2)), self.temperature)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([{"params": self.backbone.parameters(), "lr": self.lr},
                                  {"params": self.projector.parameters(), "lr": self.lr * 3}], weight_decay=1e-4)


class DINOModule(L.LightningModule):
    """A small DINO [1]: student and EMA teacher (backbone + MLP head with out_dim prototypes),
    cross-entropy between the centred, sharpened teacher and the student over the two views."""

    def __init__(self, backbone: nn.Module, *, lr: float = 3e-4, out_dim: int = 1024, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, momentum: float = 0.996, center_momentum: float = 0.9):
        super().__init__()
        self.student = nn.Sequential(backbone, _mlp(_out_dim(backbone), 512, 256),
                                     nn.utils.parametrizations.weight_norm(nn.Linear(256, out_dim, bias=False)))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.lr, self.student_temp, self.teacher_temp = lr, student_temp, teacher_temp
        self.momentum, self.center_momentum = momentum, center_momentum
        self.losses: list[float] = []

    @property
    def backbone(self) -> nn.Module:
        return self.teacher[0]  # the teacher is the better, smoother encoder (as in the paper)

    def training_step(self, batch, batch_idx):
        views = list(batch)
        with torch.no_grad():
            t_out = [self.teacher(v) for v in views]
            t_prob = [F.softmax((t - self.center) / self.teacher_temp, dim=1) for t in t_out]
        s_logp = [F.log_softmax(self.student(v) / self.student_temp, dim=1) for v in views]
        terms = [-(t_prob[i] * s_logp[j]).sum(1).mean() for i in range(len(views)) for j in range(len(views)) if i != j]
        loss = torch.stack(terms).mean()
        with torch.no_grad():
            self.center.mul_(self.center_momentum).add_(torch.cat(t_out).mean(0, keepdim=True),
                                                        alpha=1 - self.center_momentum)
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.mul_(self.momentum).add_(ps.detach(), alpha=1 - self.momentum)
            for bs, bt in zip(self.student.buffers(), self.teacher.buffers()):
                bt.copy_(bs)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=1e-4)


class _Rot90:
    """Random multiple of 90° rotation (cells have no preferred orientation)."""

    def __call__(self, img):
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


class TwoViewImages(torch.utils.data.Dataset):
    """Unlabelled image files → two random augmented views each (the SimCLR recipe measured on PBC:
    random resized crop with area 0.3-1, flips + rot90, colour jitter with hue, 20 % greyscale).
    Unreadable files are replaced by another random file."""

    def __init__(self, paths: Sequence[str | Path], size: int, mean: Sequence[float], std: Sequence[float]):
        from torchvision.transforms import v2

        self.paths = [str(p) for p in paths]
        self.size = size
        self.transform = v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(), _Rot90(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.3, 0.05)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from hematoscope.data.images import ImageError, load_image

        for _ in range(10):
            try:
                img = load_image(self.paths[i], draft_size=self.size)
                break
            except ImageError:
                i = int(torch.randint(0, len(self.paths), ()).item())
        else:
            raise ImageError("no readable image found after 10 tries", self.paths[i])
        img = np.array(img)  # writable copy: torchvision refuses read-only arrays
        return self.transform(img), self.transform(img)


@dataclass
class SSLResult:
    """Outcome of :func:`train_ssl`.

    Attributes:
        backbone: the adapted timm backbone (``num_classes=0``), in eval mode.
        losses: training loss per step.
        steps: optimisation steps done.
        seconds: wall-clock training time.
        meta: method, arch, size, batch size, start weights (JSON-able).
    """

    backbone: nn.Module
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    rank: int = 0  # global rank of this process in a multi-process run (only rank 0 saves)


def train_ssl(paths: Sequence[str | Path], *, method: str = "simclr", arch: str = DEFAULT_ARCH,
              weights: str | Path | None = OFFLINE_WEIGHTS, size: int = 112, batch_size: int = 64,
              minutes: float = 10.0, max_steps: int = -1, lr: float = 3e-4, seed: int = 0, num_workers: int = 1,
              progress: bool = True, devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto",
              accelerator: str = "auto") -> SSLResult:
    """Adapt a backbone to unlabelled images with SimCLR or DINO for at most ``minutes``.

    Args:
        paths: image files (labels are not used).
        method: ``"simclr"`` or ``"dino"``.
        arch: timm architecture.
        weights: start weights (see :func:`hematoscope.models.backbones.create_backbone`).
        size: training crop side (small on CPU: 96-128).
        batch_size: images per step (two views each).
        minutes: wall-clock budget; training stops when it is spent.
        max_steps: stop after this many steps (-1 = only the time limit).
        lr: backbone learning rate (AdamW).
        seed: seed of initialisation, shuffling and augmentation.
        num_workers: DataLoader worker processes decoding and augmenting images.
        progress: show Lightning's progress bar.
        devices, num_nodes, strategy, accelerator: Lightning's; several processes (DDP; gloo on
            CPU) each take their share of the images (Lightning's distributed sampler) and
            ``batch_size / processes`` per step, so ``batch_size`` stays the global batch. The
            SimCLR negatives of a view are the other views of its own process's batch. Every
            process returns; only the one with ``rank`` 0 should save.

    Raises:
        ValueError: unknown method, or fewer images than one batch.
    """
    from hematoscope.models.backbones import create_backbone
    from hematoscope.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if len(paths) < 2:
        raise ValueError(f"self-supervised training needs at least 2 images; got {len(paths)}")
    L.seed_everything(seed, workers=True, verbose=False)
    trainer = L.Trainer(max_time={"minutes": minutes}, max_epochs=-1, max_steps=max_steps, accelerator=accelerator,
                        devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, log_every_n_steps=10)
    world = trainer.world_size
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} (the global batch) must be a multiple of the {world} processes")
    backbone = create_backbone(arch, num_classes=0, weights=weights)
    module = SimCLRModule(backbone, lr=lr) if method == "simclr" else DINOModule(backbone, lr=lr)
    data = TwoViewImages(paths, size, IMAGENET_MEAN, IMAGENET_STD)
    loader = torch.utils.data.DataLoader(data, batch_size=max(1, min(batch_size, len(paths)) // world), shuffle=True,
                                         drop_last=True, num_workers=num_workers, persistent_workers=num_workers > 0)
    threads = torch.get_num_threads()
    if world > 1 and trainer.num_devices > 1 and isinstance(trainer.accelerator, L.pytorch.accelerators.CPUAccelerator):
        # the processes of one machine share its cores
        torch.set_num_threads(max(1, threads // trainer.num_devices))
    start = time.perf_counter()
    trainer.fit(module, loader)
    torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    encoder = module.backbone.cpu().eval()
    meta = {"method": method, "arch": arch, "start_weights": str(weights), "size": size, "batch_size": batch_size,
            "steps": len(module.losses), "seconds": round(seconds, 1), "images": len(paths), "world_size": world}
    return SSLResult(encoder, list(module.losses), len(module.losses), seconds, meta, rank=trainer.global_rank)



def save_backbone(backbone: nn.Module, path: Path | str, meta: dict | None = None) -> Path:
    """Write the backbone state dict (timm key names) as safetensors, with ``meta`` as text metadata."""
    from safetensors.torch import save_file

    from hematoscope import _io

    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    with _io.atomic_path(path, ".safetensors") as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (meta or {}).items()})
    return Path(path)


def loss_trend(losses: Sequence[float], window: int = 5) -> tuple[float, float]:
    """Mean loss of the first and of the last ``window`` steps."""
    arr = np.asarray(losses, dtype=np.float64)
    w = max(1, min(window, len(arr) // 2))
    return float(arr[:w].mean()), float(arr[-w:].mean())
