"""Optimizer with its own parameter group for learned loss parameters, and the LR schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(embedder: torch.nn.Module, loss: torch.nn.Module, optim_config, loss_lr: float):
    """The configured optimizer; loss parameters (proxies, centers) get `loss_lr`, no decay."""
    groups = [{"params": list(embedder.parameters()), "lr": optim_config.lr, "name": "embedder"}]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": loss_lr, "weight_decay": 0.0, "name": "loss"})
    if optim_config.name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=optim_config.weight_decay)
    if optim_config.name == "adam":
        return torch.optim.Adam(groups, weight_decay=optim_config.weight_decay)
    return torch.optim.SGD(
        groups, momentum=optim_config.momentum, weight_decay=optim_config.weight_decay
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of every group's base LR at `step`: linear warm-up, then cosine or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, optim_config, total_steps: int):
    """A LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, optim_config.warmup_steps, optim_config.schedule),
    )
