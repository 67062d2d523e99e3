"""The LightningModule: loss, optimiser groups, schedules, on-device colour jitter, validation metrics."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from hematoscope.bundle.neural import ClassifierNet
from hematoscope.models.preprocess import Preprocess
from hematoscope.train.config import TrainConfig
from hematoscope.train.data import batch_color_jitter, batch_random_conv, batch_stain_jitter


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary name and renamed into place (a kill -9 mid-save leaves
    the previous checkpoint intact), and read back with ``weights_only=True`` (no unpickling)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from hematoscope._io import atomic_path

        with atomic_path(path, ".ckpt") as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float, weight: torch.Tensor | None,
               label_smoothing: float) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma."""
    ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction="none")
    p_true = logits.softmax(1).gather(1, target[:, None])[:, 0]
    return ((1 - p_true).pow(gamma) * ce).mean()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (torchvision, one of the two at random, alpha 1) of a batch: the mixed
    images and their mixed class probabilities (which cross-entropy takes as targets)."""
    from torchvision.transforms import v2

    mixers = [v2.MixUp(alpha=1.0, num_classes=num_classes), v2.CutMix(alpha=1.0, num_classes=num_classes)]
    return v2.RandomChoice(mixers)(x, y)


class CellClassifier(L.LightningModule):
    """Fine-tunes a :class:`ClassifierNet` (shared with the bundle being trained).

    Args:
        net: the network; its classifier layer is the "head", everything else the "backbone".
        config: the run configuration (optimiser, schedule, loss, augmentation).
        preprocess: the bundle's preprocessing (its mean/std normalise training batches).
        class_counts: training images per class (for class weights).
        n_subtypes: subtypes of the auxiliary loss (``config.subtypes``); its layer is trained
            here and not kept by the bundle.
    """

    def __init__(self, net: ClassifierNet, config: TrainConfig, preprocess: Preprocess, class_counts: np.ndarray,
                 n_subtypes: int = 0):
        super().__init__()
        self.net, self.config, self.preprocess = net, config, preprocess
        self.subtype_head = (torch.nn.Linear(net.model.get_classifier().in_features, n_subtypes)
                             if config.subtypes and n_subtypes else None)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)
        weight = None
        if config.class_weights:
            counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1)
            weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._mixstyle_hooks = []

    # --- data on the device ----------------------------------------------------------------
    def augment(self, x: torch.Tensor, view: int = 0) -> torch.Tensor:
        """A uint8 training batch → colour-augmented, canonicalised and normalised like Preprocess.
        Its draws are seeded by (seed, rank, global step, view), so a resumed run repeats them."""
        seed = (self.config.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank
        # the CPU generator keeps 32 bits of a seed: a second view gets another 32-bit seed
        torch.manual_seed(seed if not view else (seed * 2_654_435_761 + view) % 2**32)
        c = self.config
        x = batch_color_jitter(x.float() / 255.0, c.color_jitter, c.stain_jitter, c.saturation_jitter)
        x = batch_stain_jitter(x, hue=c.hue_jitter, gamma=c.gamma_jitter, hed=c.hed_jitter, noise=c.noise,
                               grey=c.grey_prob)
        x = batch_random_conv(x, c.random_conv)
        if self.preprocess.colour != "none":
            canon = self.preprocess.canonicalise(x.permute(0, 2, 3, 1).cpu().numpy())
            x = torch.from_numpy(canon).to(x.device).permute(0, 3, 1, 2)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    # --- training ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.config.mixstyle:
            blocks = getattr(self.net.model, "blocks", None)
            if blocks is None:
                raise ValueError(f"mixstyle needs a backbone with stages (.blocks); {self.config.arch} has none")
            self._mixstyle_hooks = [b.register_forward_hook(self._mixstyle) for b in list(blocks)[:3]]

    def on_fit_end(self) -> None:
        for hook in self._mixstyle_hooks:
            hook.remove()
        self._mixstyle_hooks = []

    def _mixstyle(self, module, inputs, x: torch.Tensor) -> torch.Tensor:
        """MixStyle (Zhou et al., ICLR 2021): each image's channel means and spreads are mixed
        with another image's, a Beta(0.1, 0.1) share, in a ``config.mixstyle`` share of batches."""
        if not module.training or float(torch.rand(())) >= self.config.mixstyle or x.shape[0] < 2:
            return x
        mu = x.mean((2, 3), keepdim=True).detach()
        sig = (x.var((2, 3), keepdim=True) + 1e-6).sqrt().detach()
        lam = torch.distributions.Beta(0.1, 0.1).sample((x.shape[0], 1, 1, 1)).to(x)
        perm = torch.randperm(x.shape[0], device=x.device)
        mu_mix, sig_mix = lam * mu + (1 - lam) * mu[perm], lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * sig_mix + mu_mix

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "focal":
            return focal_loss(logits, y, gamma=self.config.focal_gamma, weight=self.class_weight,
                              label_smoothing=self.config.label_smoothing)
        return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.config.label_smoothing)

    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.config.freeze_epochs
        head = set(map(id, self.net.model.get_classifier().parameters()))
        for p in self.net.parameters():
            if id(p) not in head:
                p.requires_grad_(not frozen)
        if frozen or self.config.frozen_bn:  # keep the pretrained BatchNorm statistics
            for m in self.net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, *sub = batch
        if not self.config.consistency:
            x = self.augment(x)
            if self.config.mix and float(torch.rand(())) < self.config.mix:  # drawn after augment's seed
                x, y = mix_batch(x, y, self.net.model.get_classifier().out_features)
            logits, features = self.net(x)
            loss = self._loss(logits, y)
            if self.subtype_head is not None and bool((sub[0] >= 0).any()):
                sub_loss = F.cross_entropy(self.subtype_head(features.flatten(1)), sub[0], ignore_index=-1)
                loss = loss + self.config.subtypes * sub_loss
                self.log("train_subtype_loss", sub_loss, on_step=False, on_epoch=True, batch_size=len(y),
                         sync_dist=True)
        else:  # one pass over both colour views, so BatchNorm sees them together
            logits, features = self.net(torch.cat([self.augment(x), self.augment(x, view=1)]))
            a, b = F.normalize(features.flatten(1), dim=1).chunk(2)
            distance = (1 - (a * b).sum(1)).mean()
            loss = self._loss(logits, y.repeat(2)) + self.config.consistency * distance
            self.log("train_view_distance", distance, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=len(y), sync_dist=True)
        # sync_dist: the epoch mean over all processes (a no-op in a single process)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    # --- validation --------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits, _ = self.net(x.contiguous(memory_format=torch.channels_last))
        self._val_logits.append(logits.detach().float().cpu())
        self._val_targets.append(y.cpu())

    def on_validation_epoch_end(self) -> None:
        from sklearn.metrics import f1_score

        if not self._val_logits:
            return
        logits, y = torch.cat(self._val_logits), torch.cat(self._val_targets)
        self._val_logits, self._val_targets = [], []
        if self.trainer.world_size > 1:  # each process saw its share: score the whole set everywhere
            logits, y = self._gather(logits, y)
        pred = logits.argmax(1)
        self.log("val_loss", F.cross_entropy(logits, y).item(), prog_bar=False)
        self.log("val_acc", (pred == y).float().mean().item(), prog_bar=True)
        self.log("val_macro_f1", float(f1_score(y.numpy(), pred.numpy(), average="macro", zero_division=0)),
                 prog_bar=True)

    def _gather(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's validation logits and targets (shares may differ in length by one:
        padded for the collective, the padding dropped after)."""
        sizes = self.all_gather(torch.tensor(len(y), device=self.device)).reshape(-1).tolist()
        pad = max(sizes) - len(y)
        logits = F.pad(logits.to(self.device), (0, 0, 0, pad))
        y = F.pad(y.to(self.device), (0, pad), value=-1)
        all_logits, all_y = self.all_gather(logits).cpu(), self.all_gather(y).cpu()  # (world, max, ...)
        return (torch.cat([all_logits[r, :n] for r, n in enumerate(sizes)]),
                torch.cat([all_y[r, :n] for r, n in enumerate(sizes)]))

    # --- optimiser -------------------------------------------------------------------------------
    def configure_optimizers(self):
        head = list(self.net.model.get_classifier().parameters())
        head_ids = set(map(id, head))
        backbone = [p for p in self.net.parameters() if id(p) not in head_ids]
        if self.subtype_head is not None:
            head += list(self.subtype_head.parameters())
        c = self.config
        opt = torch.optim.AdamW([{"params": backbone, "lr": c.backbone_lr}, {"params": head, "lr": c.lr}],
                                weight_decay=c.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if c.schedule == "constant":
            return opt
        if c.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[c.backbone_lr, c.lr], total_steps=total)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _WarmupCosine(round(c.warmup_fraction * total), total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _WarmupCosine:
    """Linear warm-up then cosine decay to zero, as a multiplier of each group's base lr."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
