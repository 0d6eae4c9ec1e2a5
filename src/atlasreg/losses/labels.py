"""Label losses of Atlas-ISTN (Eqs. 10-12, 17-18): mean squared error between (soft) one-hot maps; and
the optional soft-Dice term of the segmentation loss for labelmaps with many small structures."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_mse(prediction: torch.Tensor, target: torch.Tensor, foreground_only: bool = False,
              reduction: str = "mean", weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between one-hot maps / logits (Atlas-ISTN Eq. 10; Eqs. 11-12 with foreground_only=True).

    prediction, target: (N, C, *spatial); channel 0 is background. reduction 'mean' averages over all
    elements (as the reference implementation), 'per_case' returns (N,) means per case (used by
    batched refinement, where every case has its own weights). weight: (N or 1, 1, *spatial) voxel
    weights in [0, 1], e.g. the scan's field-of-view mask: the mean becomes a weighted mean, so voxels
    outside the scan (padding) do not count. Raises ValueError on shape mismatch.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    if foreground_only:
        prediction, target = prediction[:, 1:], target[:, 1:]
    if reduction not in ("mean", "per_case"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if weight is None:
        if reduction == "mean":
            return F.mse_loss(prediction, target)
        return (prediction - target).pow(2).flatten(1).mean(1)
    if weight.dim() != prediction.dim() or weight.shape[1] != 1:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not (N, 1, *spatial)")
    err = (prediction - target).pow(2) * weight
    w = weight.expand(prediction.shape[0], 1, *prediction.shape[2:])
    if reduction == "mean":
        return err.sum() / (w.sum() * prediction.shape[1]).clamp_min(1e-12)
    return err.flatten(1).sum(1) / (w.flatten(1).sum(1) * prediction.shape[1]).clamp_min(1e-12)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   temperature: float = 10.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground channels (Milletari et al. 2016, as nnU-Net's Dice term),
    on softmax(temperature * logits): :func:`label_dice` (MONAI's DiceLoss, batch=False) of the foreground
    channels. The ITN's logits are regressed onto one-hot labels (Eq. 10), so logits
    equal to their target differ by 1 between channels: with 41 channels softmax(logits) gives the
    right channel only 0.064 and the Dice term would fight the MSE, while softmax(10 logits) gives it
    0.998. logits, target: (N, C, *spatial), target one-hot; weight: (N or 1, 1,
    *spatial) field-of-view mask multiplied into both. Every structure counts equally, however small,
    where the MSE of Eq. 10 averages over voxels and channels (with 40 structures the all-background
    prediction is nearly optimal). A channel absent from both a case and its prediction scores 0.
    Raises ValueError on shape mismatch."""
    if logits.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(logits.shape)} vs {tuple(target.shape)}")
    probs = torch.softmax(temperature * logits, 1)
    return label_dice(probs[:, 1:], target[:, 1:], "mean", weight)


def label_dice(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft Dice between (soft) one-hot maps, averaged over the channels given (Milletari et al.
    2016; MONAI's DiceLoss with include_background=True, batch=False): the label term of the refinement
    with ``refinement.label_loss: dice``. prediction, target: (N, C, *spatial) values in [0, 1] (e.g.
    the warped atlas labelmap's foreground channels and the ITN's one-hot); weight: (N or 1, 1,
    *spatial) field-of-view mask multiplied into both, or None. reduction 'mean': a scalar;
    'per_case': (N,). A channel empty in both scores 0. Dimensionless.

    Why beside :func:`label_mse`: the MSE is a mean over every voxel and channel, so a thin structure
    (the LV myocardium, a ring 3-4 model voxels thick) weighs by its volume; the Dice weighs every
    structure equally. Raises ValueError on shape mismatch or an unknown reduction."""
    from monai.losses import DiceLoss

    if prediction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    if reduction not in ("mean", "per_case"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if weight is not None:
        prediction, target = prediction * weight, target * weight
    per = DiceLoss(include_background=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)(prediction, target)
    per = per.flatten(1).mean(1)  # (N,)
    return per.mean() if reduction == "mean" else per


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                       temperature: float = 10.0) -> torch.Tensor:
    """Cross-entropy of softmax(temperature * logits) against the argmax of the one-hot `target` (the CE
    of nnU-Net's Dice + CE; torch's cross_entropy), the mean over the voxels, weighted by `weight`.
    The temperature is that of :func:`soft_dice_loss`: logits regressed onto one-hot labels (Eq. 10)
    differ by 1 between channels. Where the MSE has made every voxel background, softmax(10 logits) of
    a foreground channel is about 1e-4 and the soft Dice's gradient vanishes with it; the CE's gradient
    for the logit of the voxel's true label stays about -temperature, so a network cannot sit at
    all-background. logits, target: (N, C, *spatial), target one-hot; weight: (N or 1, 1, *spatial)
    field-of-view mask or None. Returns a scalar (nats). Raises ValueError on shape mismatch."""
    if logits.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(logits.shape)} vs {tuple(target.shape)}")
    ce = F.cross_entropy(temperature * logits, target.argmax(1), reduction="none")  # (N, *spatial)
    if weight is None:
        return ce.mean()
    w = weight[:, 0].expand_as(ce)
    return (ce * w).sum() / w.sum().clamp_min(1e-12)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                      dice_weight: float = 0.0, ce_weight: float = 0.0) -> torch.Tensor:
    """L_s of Eq. 14: the label MSE of Eq. 10 (the paper) plus `dice_weight` times :func:`soft_dice_loss`
    and `ce_weight` times :func:`cross_entropy_loss` (``training.dice_weight`` / ``ce_weight``; 0: the
    paper's loss alone). Shapes as :func:`label_mse`."""
    loss = label_mse(logits, target, weight=weight)
    if dice_weight > 0.0:
        loss = loss + dice_weight * soft_dice_loss(logits, target, weight)
    if ce_weight > 0.0:
        loss = loss + ce_weight * cross_entropy_loss(logits, target, weight)
    return loss
