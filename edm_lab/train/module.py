"""The training LightningModule: a preconditioned network, its EMA and the paper's recipe.

Progress is counted in images (`cur_nimg`), as the reference does: the learning-rate warm-up
and the EMA half-life are functions of it. A checkpoint holds network, EMA, optimizer, image
count and every RNG state, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import copy
import random
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from edm_lab.design.losses import DenoisingLoss
from edm_lab.train.recipe import clean_gradients, ema_beta, lr_at, update_ema


class DiffusionModule(L.LightningModule):
    """Trains `denoiser` with `loss`; `ema` is the network sampling uses."""

    def __init__(self, denoiser: nn.Module, loss: DenoisingLoss, batch_size: int,
                 augment_pipe: nn.Module | None = None, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, lr_rampup_kimg: float = 10_000, ema_halflife_kimg: float = 500,
                 ema_rampup_ratio: float | None = 0.05, loss_scaling: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.net = denoiser
        self.ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
        self.loss, self.augment_pipe, self.batch_size = loss, augment_pipe, batch_size
        self.lr, self.betas, self.eps, self.lr_rampup_kimg = lr, tuple(betas), eps, lr_rampup_kimg
        self.ema_halflife_kimg, self.ema_rampup_ratio = ema_halflife_kimg, ema_rampup_ratio
        self.loss_scaling, self.seed = loss_scaling, seed
        self.cur_nimg = 0
        self._rng_to_restore: dict[str, Any] | None = None  # a checkpoint's RNG states, until training starts

    @property
    def kimg(self) -> float:
        return self.cur_nimg / 1000

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        labels = labels if labels.shape[-1] else None
        per_pixel = self.loss(self.net, images, labels, self.augment_pipe)
        # Sum over pixels, mean over images: the reference's loss.sum() / batch, whatever the batch split.
        # Loss scaling is never undone, as in the reference: Adam is invariant to it but for eps and
        # the non-finite gradient clean-up, which is what its ImageNet fp16 recipe (ls=100) relies on.
        loss = per_pixel.sum() * self.loss_scaling / images.shape[0]
        self.log("train/loss", per_pixel.mean().detach(), prog_bar=True, on_step=True, sync_dist=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # On CUDA the fused kernel: one launch for all parameters, the same update up to float rounding.
        fused = True if self.device.type == "cuda" else None
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=self.betas, eps=self.eps, fused=fused)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        clean_gradients(self.net)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure: Callable | None = None) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(self.cur_nimg, self.lr, self.lr_rampup_kimg)
        optimizer.step(closure=optimizer_closure)
        update_ema(self.ema, self.net, ema_beta(self.cur_nimg, self.batch_size, self.ema_halflife_kimg,
                                                self.ema_rampup_ratio))
        self.cur_nimg += self.batch_size
        self.log("train/kimg", self.kimg, on_step=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cur_nimg"] = self.cur_nimg
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # Tensors and plain numbers only: Lightning reloads checkpoints with weights_only=True.
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.cur_nimg = int(checkpoint["cur_nimg"])
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Set last, after Lightning's own setup, so the first step draws the same noise levels, noise and
        # dropout masks in every run of this seed (a resumed run: what it would have drawn).
        states = self._rng_to_restore
        if not states:
            # Each rank its own stream, as the reference: seed * world_size + rank.
            rank_seed = (self.seed * self.trainer.world_size + self.trainer.global_rank) % (1 << 31)
            random.seed(rank_seed)
            np.random.seed(rank_seed)
            torch.manual_seed(rank_seed)  # CUDA generators too
        else:
            torch.set_rng_state(states["torch"])
            numpy_state = states["numpy"]
            np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                                 numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
            random.setstate(states["python"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            self._rng_to_restore = None
