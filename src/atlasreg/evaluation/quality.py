"""Automatic quality control of test-time segmentations without a reference: agreement between the
ITN prediction and the refined, atlas-derived labelmap.

Atlas-ISTN (Sinclair et al. 2022, Sec. 2.4 'Test Time Refinement') produces two segmentations of a
new image: the voxel-wise ITN output ``y_hat`` and the atlas warped onto the image after refinement of
the transform, ``y^a o Phi*^-1`` (Eqs. 17-21). The refinement fits the warped
atlas to the ITN output, so where the two still disagree after it, either the ITN output is implausible
(it is not reachable by a smooth deformation of the atlas: spurious blobs, missing parts) or the
registration failed (the paper's Figs. 10-11 show such cases). Their disagreement is therefore a
reference-free score of how much a case needs a human look. The paper does not define such a score;
it is an addition of atlasreg. This module computes that score (:func:`qc_scores`), flags the worst cases
(:func:`flag_top`) and measures, on a test set with references, how well the score ranks the cases by
their true error (:func:`ranking_quality`).

All functions are pure (numpy in, Python floats / numpy arrays out).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

__all__ = ["dice", "qc_scores", "flag_count", "flag_top", "ranking_quality"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2 |a & b| / (|a| + |b|)`` of two boolean masks of the same shape; 1.0 when
    both are empty (they agree), as :func:`atlasreg.evaluation.metrics.segmentation_metrics`.
    Raises ValueError for different shapes."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def qc_scores(itn: np.ndarray, refine: np.ndarray, labels: Sequence[int], background: int = 0) -> dict:
    """Reference-free quality-control figures of one case from its ITN and refined labelmaps.

    Parameters
    ----------
    itn, refine:
        Integer labelmaps of the same shape (any dimension, numpy order), voxel values being label
        values: the ITN prediction and the atlas warped by the refined transform (Sec. 2.4, Eq. 20).
    labels:
        Foreground label values to compare (the background is not evaluated).
    background:
        Background value (default 0); every other value counts as foreground for
        ``itn_outside_refine``.

    Returns
    -------
    Dict of Python floats (dimensionless):

    - ``dice_itn_refine``: mean over ``labels`` of the Dice between ``itn == k`` and ``refine == k``
      (a label empty in both counts as 1, full agreement), in [0, 1];
    - ``itn_outside_refine``: fraction of the ITN foreground voxels (all structures) that lie on the
      refined labelmap's background, in [0, 1]; NaN when the ITN has no foreground voxel;
    - ``qc_score``: ``1 - dice_itn_refine``; higher means a case more worth looking at;
    - ``dice_per_label``: dict label -> Dice.

    Raises
    ------
    ValueError
        If the shapes differ or ``labels`` is empty.
    """
    itn, refine = np.asarray(itn), np.asarray(refine)
    if itn.shape != refine.shape:
        raise ValueError(f"ITN labelmap shape {itn.shape} differs from the refined labelmap shape "
                         f"{refine.shape}")
    labels = [int(k) for k in labels]
    if not labels:
        raise ValueError("no foreground labels to compare")
    per_label = {k: dice(itn == k, refine == k) for k in labels}
    mean_dice = float(np.mean(list(per_label.values())))
    itn_fg = itn != background
    n_fg = int(itn_fg.sum())
    outside = float(np.logical_and(itn_fg, refine == background).sum() / n_fg) if n_fg else math.nan
    return {"dice_itn_refine": mean_dice, "itn_outside_refine": outside, "qc_score": 1.0 - mean_dice,
            "dice_per_label": per_label}


def flag_count(n: int, fraction: float = 0.1) -> int:
    """Number of cases flagged among ``n``: ``ceil(fraction * n)``, at least 1 (0 when ``n == 0``).
    Raises ValueError for a fraction outside (0, 1] or a negative n."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return 0
    return max(1, math.ceil(round(fraction * n, 9)))


def flag_top(scores: Sequence[float], fraction: float = 0.1) -> np.ndarray:
    """Boolean array ``(N,)``: True for the :func:`flag_count` ``(n, fraction)`` cases with the highest
    score, n being the number of finite scores. NaN scores are never flagged; ties are broken by
    position (earlier first). Raises ValueError for a fraction outside (0, 1]."""
    scores = np.asarray(scores, dtype=float).reshape(-1)
    finite = np.flatnonzero(np.isfinite(scores))
    k = flag_count(finite.size, fraction)
    flagged = np.zeros(scores.size, dtype=bool)
    order = finite[np.argsort(-scores[finite], kind="stable")]
    flagged[order[:k]] = True
    return flagged


def ranking_quality(qc_score: Sequence[float], true_error: Sequence[float], fraction: float = 0.1) -> dict:
    """How well a quality-control score ranks cases by their true error.

    Parameters
    ----------
    qc_score:
        ``(N,)`` reference-free scores, higher = worse (e.g. ``qc_scores(...)["qc_score"]``).
    true_error:
        ``(N,)`` true errors of the same cases, higher = worse (e.g. ``1 - refine Dice`` against the
        reference).
    fraction:
        Fraction of cases flagged and of truly worst cases compared (default 10 %).

    Returns
    -------
    Dict of Python numbers, computed over the cases where both values are finite:

    - ``spearman``: Spearman rank correlation between ``qc_score`` and ``true_error``
      (``scipy.stats.spearmanr``), in [-1, 1]; NaN for fewer than 2 cases or a constant input;
    - ``spearman_p``: its two-sided p-value (NaN likewise);
    - ``recall``: fraction of the truly worst :func:`flag_count` ``(n, fraction)`` cases that are
      flagged by :func:`flag_top` ``(qc_score, fraction)`` (ties broken by position); NaN for n = 0;
    - ``n``: number of cases used; ``k``: number of flagged / truly worst cases.

    Raises
    ------
    ValueError
        If the two inputs differ in length or ``fraction`` is outside (0, 1].
    """
    from scipy.stats import spearmanr

    score = np.asarray(qc_score, dtype=float).reshape(-1)
    error = np.asarray(true_error, dtype=float).reshape(-1)
    if score.shape != error.shape:
        raise ValueError(f"qc_score has {score.size} values, true_error {error.size}")
    keep = np.isfinite(score) & np.isfinite(error)
    score, error = score[keep], error[keep]
    n = int(score.size)
    k = flag_count(n, fraction)
    rho = p = math.nan
    if n >= 2 and np.ptp(score) > 0 and np.ptp(error) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = spearmanr(score, error)
        rho, p = float(result.statistic), float(result.pvalue)
    recall = math.nan
    if n:
        flagged = flag_top(score, fraction)
        worst = flag_top(error, fraction)
        recall = float(np.sum(flagged & worst) / k)
    return {"spearman": rho, "spearman_p": p, "recall": recall, "n": n, "k": k}
