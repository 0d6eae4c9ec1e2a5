"""Label losses of Atlas-ISTN (Eqs. 10-12, 17-18): mean squared error between (soft) one-hot maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_mse(prediction: torch.Tensor, target: torch.Tensor, foreground_only: bool = False,
              reduction: str = "mean") -> torch.Tensor:
    """MSE between one-hot maps / logits (Atlas-ISTN Eq. 10; Eqs. 11-12 with foreground_only=True).

    prediction, target: (N, C, *spatial); channel 0 is background. reduction 'mean' averages over all
    elements (as the reference implementation), 'per_case' returns (N,) means per case (used by
    batched refinement, where every case has its own weights). Raises ValueError on shape mismatch.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    if foreground_only:
        prediction, target = prediction[:, 1:], target[:, 1:]
    if reduction == "mean":
        return F.mse_loss(prediction, target)
    if reduction == "per_case":
        return (prediction - target).pow(2).flatten(1).mean(1)
    raise ValueError(f"unknown reduction {reduction!r}")
