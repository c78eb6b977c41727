"""Specification matrices and the robust cross-entropy loss of certified training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["margin_spec", "robust_ce", "verified"]


def margin_spec(y: Tensor, num_classes: int) -> Tensor:
    """C of shape (B, K-1, K) whose rows are e_y - e_j for every j != y (margins z_y - z_j)."""
    if y.dim() != 1:
        raise ValueError(f"y must be a 1-D tensor of labels, got shape {tuple(y.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    eye = torch.eye(num_classes, device=y.device)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j = e_y - e_j
    keep = torch.arange(num_classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)  # (B, K)
    return C[keep].view(y.shape[0], num_classes - 1, num_classes)


def robust_ce(lb_margins: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits [0, -lb] with target 0 (Wong & Kolter 2018; equals CE when lb are margins)."""
    zeros = lb_margins.new_zeros(lb_margins.shape[0], 1)
    logits = torch.cat([zeros, -lb_margins], dim=1)
    target = torch.zeros(lb_margins.shape[0], dtype=torch.long, device=lb_margins.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def verified(lb_margins: Tensor) -> Tensor:
    """Boolean (B,): every margin lower bound is positive, i.e. the prediction is certified."""
    return (lb_margins > 0).all(dim=1)
