"""Optimizer and learning-rate policy of a training run.

- :func:`build_optimizer`: AdamW (decoupled weight decay) or Adam (L2 penalty), with two
  parameter groups: weights of convolutions and linear layers decay; norm scales and
  shifts and biases (every tensor with fewer than two dimensions) do not, since shrinking
  them only fights the normalization.
- :class:`LRSchedule`: ReduceLROnPlateau on the validation accuracy (stepped per epoch),
  or a linear warmup followed by cosine annealing (stepped per batch); once SWA starts,
  SWALR takes over.

The plateau patience defaults to :meth:`TrainConfig.resolved_plateau_patience`: a tenth
of the epoch budget and at least 2 epochs, so one noisy validation score never cuts the
learning rate, and early stopping (at least 2 patiences + 2) leaves room for two cuts.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.optim.swa_utils import SWALR

from audioclf.config import TrainConfig

__all__ = ["build_optimizer", "LRSchedule", "warmup_cosine"]

logger = logging.getLogger(__name__)

SWA_ANNEAL_EPOCHS = 2  # epochs SWALR takes to move from the current LR to swa_lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Adam over ``model``'s trainable parameters, without decay on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per step: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class LRSchedule:
    """The learning-rate policy: call :meth:`begin_epoch` before each epoch, :meth:`after_batch`
    after every optimizer step and :meth:`after_epoch` after every validation.

    Args:
        optimizer: the optimizer whose LR is driven.
        cfg: scheduler, plateau factor and patience, warmup, epochs, swa_lr.
        steps_per_epoch: optimizer steps in one epoch (for the cosine schedule).
        verbose: log LR reductions (rank 0 only under torchrun).
        epochs: the epochs the cosine schedule spans, when not ``cfg.epochs`` (a resumed
            run keeps the budget of its first start: :class:`audioclf.rundir.RunPlan`).
            A resumed plateau schedule needs nothing of the kind: :meth:`load_state_dict`
            restores its patience with the rest of its state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                 verbose: bool = True, *, epochs: int | None = None):
        self.optimizer = optimizer
        self.verbose = verbose
        self.kind = cfg.scheduler
        self.swa_lr_option = cfg.swa_lr
        self.swa: SWALR | None = None
        self.swa_lr: float | None = None
        if self.kind == "plateau":
            self.main = ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                          patience=cfg.resolved_plateau_patience())
        else:
            total = (cfg.epochs if epochs is None else epochs) * steps_per_epoch
            self.main = LambdaLR(optimizer, warmup_cosine(total, cfg.warmup_epochs * steps_per_epoch))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def begin_epoch(self, averaging: bool) -> None:
        """Call before training an epoch; hands the LR to SWALR when averaging starts."""
        if averaging and self.swa is None:
            self.start_swa()

    def after_batch(self) -> None:
        if self.kind == "cosine" and self.swa is None:
            self.main.step()

    def after_epoch(self, val_metric: float, averaging: bool) -> None:
        """Plateau step on ``val_metric``; or an SWALR step once weights are being averaged."""
        before = self.lr
        if averaging:
            self.swa.step()
        elif self.kind == "plateau":
            self.main.step(val_metric)
        if self.lr < before and not averaging and self.verbose:
            logger.info("validation accuracy stalled: learning rate %.3g -> %.3g", before, self.lr)

    def start_swa(self, swa_lr: float | None = None) -> None:
        """Hand the LR to SWALR: ``swa_lr`` from the config, else the LR reached so far (kept constant)."""
        self.swa_lr = swa_lr or self.swa_lr_option or self.lr
        self.swa = SWALR(self.optimizer, swa_lr=self.swa_lr, anneal_epochs=SWA_ANNEAL_EPOCHS,
                         anneal_strategy="cos")

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "swa_lr": self.swa_lr,
                "swa": self.swa.state_dict() if self.swa is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["main"])
        if state["swa"] is not None:
            self.start_swa(state["swa_lr"])
            self.swa.load_state_dict(state["swa"])
