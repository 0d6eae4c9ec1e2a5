"""Known-answer tests of atlasreg.evaluation.quality (reference-free quality control)."""

import math

import numpy as np
import pytest

from atlasreg.evaluation.quality import dice, flag_count, flag_top, qc_scores, ranking_quality


def two_squares():
    out = np.zeros((32, 32), dtype=np.int64)
    out[4:12, 4:12] = 1
    out[16:24, 18:26] = 2
    return out


def test_dice_known_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0  # both empty: agreement
    a[0, :] = True
    assert dice(a, b) == 0.0
    b[0, :2] = True
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    with pytest.raises(ValueError, match="shapes"):
        dice(a, np.zeros((3, 3), bool))


def test_identical_labelmaps_score_zero():
    lab = two_squares()
    out = qc_scores(lab, lab.copy(), [1, 2])
    assert out["dice_itn_refine"] == 1.0 and out["qc_score"] == 0.0
    assert out["itn_outside_refine"] == 0.0
    assert out["dice_per_label"] == {1: 1.0, 2: 1.0}


def test_itn_blob_outside_refined_mask():
    refine = two_squares()
    itn = two_squares()
    itn[28:32, 0:4] = 1  # a spurious 16-voxel blob of label 1 on the refined background
    out = qc_scores(itn, refine, [1, 2])
    assert out["itn_outside_refine"] == pytest.approx(16 / (64 + 64 + 16))
    dice_1 = 2 * 64 / (80 + 64)
    assert out["dice_per_label"][1] == pytest.approx(dice_1)
    assert out["dice_itn_refine"] == pytest.approx((dice_1 + 1.0) / 2)
    assert out["qc_score"] == pytest.approx(1 - (dice_1 + 1.0) / 2)


def test_label_swap_counts_in_dice_not_outside():
    refine = two_squares()
    itn = two_squares()
    itn[itn == 2] = 1  # right place, wrong label: foreground still inside the refined foreground
    out = qc_scores(itn, refine, [1, 2])
    assert out["itn_outside_refine"] == 0.0
    assert out["dice_per_label"] == {1: pytest.approx(2 * 64 / (128 + 64)), 2: 0.0}


def test_empty_itn_and_bad_input():
    refine = two_squares()
    out = qc_scores(np.zeros_like(refine), refine, [1, 2])
    assert math.isnan(out["itn_outside_refine"]) and out["dice_itn_refine"] == 0.0 and out["qc_score"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        qc_scores(refine[:10], refine, [1, 2])
    with pytest.raises(ValueError, match="no foreground"):
        qc_scores(refine, refine, [])


@pytest.mark.parametrize("n, k", [(0, 0), (1, 1), (3, 1), (10, 1), (11, 2), (20, 2), (30, 3), (31, 4)])
def test_flag_count(n, k):
    assert flag_count(n, 0.1) == k


def test_flag_count_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        flag_count(10, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        flag_top([1.0, 2.0], 1.5)


def test_flag_top_ignores_nan_and_breaks_ties_by_position():
    scores = [0.1, np.nan, 0.9, 0.9, 0.2, 0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.05]
    # 11 finite scores -> 2 flagged: the two 0.9 (positions 2 and 3)
    np.testing.assert_array_equal(np.flatnonzero(flag_top(scores, 0.1)), [2, 3])
    # 10 finite scores -> 1 flagged: the first of the tie
    np.testing.assert_array_equal(np.flatnonzero(flag_top(scores[:-1], 0.1)), [2])
    assert not flag_top([np.nan, np.nan]).any()


def test_ranking_quality_perfect_and_reversed():
    error = np.linspace(0.0, 0.5, 20)
    perfect = ranking_quality(error * 2 + 0.01, error)  # monotone, not equal
    assert perfect["spearman"] == pytest.approx(1.0)
    assert perfect["recall"] == 1.0
    assert perfect["n"] == 20 and perfect["k"] == 2
    assert perfect["spearman_p"] < 1e-6
    reversed_ = ranking_quality(-error, error)
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["recall"] == 0.0


def test_ranking_quality_half_recall_and_nan_pairs():
    error = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, np.nan])
    score = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.5, 0.95, 1.0, 9.9])
    # 12 finite pairs -> k = 2; worst by error: 10 and 11; flagged by score: 9 and 11 -> recall 1/2
    out = ranking_quality(score, error)
    assert out["n"] == 12 and out["k"] == 2
    assert out["recall"] == pytest.approx(0.5)
    assert 0.8 < out["spearman"] < 1.0


def test_ranking_quality_degenerate_inputs():
    out = ranking_quality([0.2, 0.2, 0.2], [0.1, 0.2, 0.3])
    assert math.isnan(out["spearman"]) and math.isnan(out["spearman_p"])
    assert out["recall"] == 0.0  # k = 1; tie broken by position flags case 0, the worst is case 2
    empty = ranking_quality([], [])
    assert empty["n"] == 0 and math.isnan(empty["recall"])
    with pytest.raises(ValueError, match="3 values"):
        ranking_quality([0.1, 0.2, 0.3], [0.1, 0.2])
