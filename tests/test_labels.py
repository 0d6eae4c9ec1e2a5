"""Label losses (atlasreg.losses.labels): the soft-Dice term of L_s weighs every structure equally."""

import pytest
import torch

from atlasreg.losses import cross_entropy_loss, label_mse, segmentation_loss, soft_dice_loss


def one_hot(idx, c):
    return torch.nn.functional.one_hot(idx, c).movedim(-1, 1).float()


def test_soft_dice_sees_a_small_structure_that_the_mse_barely_sees():
    """A 40-channel labelmap whose structure 39 covers 8 of 4096 voxels: predicting it as background
    changes the MSE by under 1e-4 but the soft Dice by about 1/39 (one of 39 foreground channels lost)."""
    idx = torch.zeros(1, 64, 64, dtype=torch.long)
    for k in range(1, 39):  # 38 large structures, 96 voxels each
        idx[0, (k - 1) // 2 * 3:(k - 1) // 2 * 3 + 3, (k % 2) * 32:(k % 2) * 32 + 32] = k
    idx[0, 60:62, 60:64] = 39
    target = one_hot(idx, 40)
    missed = one_hot(torch.where(idx == 39, 0, idx), 40)
    logits, logits_missed = target, missed  # logits equal to the MSE's target
    assert float(label_mse(missed, target)) < 1e-4
    assert soft_dice_loss(logits, target) < 5e-3
    assert soft_dice_loss(logits, target, temperature=1.0) > 0.8  # softmax of a 40-channel one-hot: flat
    assert float(soft_dice_loss(logits_missed, target) - soft_dice_loss(logits, target)) == pytest.approx(1 / 39, rel=0.02)


def test_mask_and_weighting():
    """Outside the mask nothing counts; dice_weight 0 is the paper's MSE alone; shapes are checked."""
    g = torch.Generator().manual_seed(0)
    target = one_hot(torch.randint(0, 3, (2, 8, 8), generator=g), 3)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    changed = logits.detach().clone()
    changed[..., 4:] = 5.0
    assert torch.allclose(soft_dice_loss(logits, target, mask), soft_dice_loss(changed, target, mask))
    assert torch.equal(segmentation_loss(logits, target, mask, 0.0), label_mse(logits, target, weight=mask))
    both = segmentation_loss(logits, target, mask, 0.5)
    assert torch.allclose(both, label_mse(logits, target, weight=mask) + 0.5 * soft_dice_loss(logits, target, mask))
    both.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        soft_dice_loss(logits, target[:, :2])


def test_cross_entropy_keeps_a_gradient_where_the_soft_dice_has_lost_it():
    """All-background logits (background 1, the 40 structures 0), the plateau the MSE leads to: the soft
    Dice's gradient on a structure's voxels is ~1e-4 of the CE's, which pushes the true label's logit up."""
    idx = torch.zeros(1, 16, 16, dtype=torch.long)
    idx[0, 4:8, 4:8] = 7
    target = one_hot(idx, 41)
    logits = one_hot(torch.zeros_like(idx), 41).requires_grad_(True)
    soft_dice_loss(logits, target).backward()
    dice_grad = logits.grad[0, 7, 4:8, 4:8].abs().max()
    logits.grad = None
    cross_entropy_loss(logits, target).backward()
    ce_grad = logits.grad[0, 7, 4:8, 4:8]
    assert (ce_grad < 0).all() and float(dice_grad) < 1e-3 * float(ce_grad.abs().min())


def test_cross_entropy_is_torchs_on_the_voxels_inside_the_mask():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4, (2, 6, 6), generator=g)
    target, logits = one_hot(idx, 4), torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :3] = 1
    inside = torch.nn.functional.cross_entropy(10 * logits[..., :3], idx[..., :3])
    assert torch.allclose(cross_entropy_loss(logits, target, mask), inside, atol=1e-6)
    assert torch.allclose(cross_entropy_loss(logits, target), torch.nn.functional.cross_entropy(10 * logits, idx))
    assert torch.allclose(segmentation_loss(logits, target, mask, 0.5, 2.0),
                          label_mse(logits, target, weight=mask) + 0.5 * soft_dice_loss(logits, target, mask)
                          + 2.0 * inside, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_loss(logits, target[:, :2])


def test_label_dice_is_one_minus_the_dice_per_structure_averaged_over_structures():
    """Hard maps: 1 - mean Dice per case, by hand; a channel empty in both scores 0; per_case gives (N,),
    mean their mean; outside the mask nothing counts; a thin structure missed costs 1 / C of the Dice
    term, 40 times what it costs the MSE (its 24 voxels of 2 x 1024)."""
    from atlasreg.losses import label_dice

    target = torch.zeros(2, 2, 32, 32)
    target[:, 0, 4:28, 4:20] = 1                    # a large structure: 384 voxels
    target[:, 1, 4:28, 21] = 1                      # a thin one: 24 voxels
    prediction = target.clone()
    prediction[1, 0, 4:28, 4:12] = 0                # case 1: the large one halved (Dice 2/3) ...
    prediction[1, 1] = 0                            # ... and the thin one missed (Dice 0)
    per = label_dice(prediction, target, "per_case")
    assert per.shape == (2,)
    assert float(per[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(per[1]) == pytest.approx(1 - (2 / 3 + 0) / 2, abs=1e-5)
    assert float(label_dice(prediction, target)) == pytest.approx(float(per.mean()), abs=1e-6)
    thin_missed = target.clone()
    thin_missed[:, 1] = 0
    assert float(label_mse(thin_missed, target)) == pytest.approx(24 / 2048, abs=1e-6)
    assert float(label_dice(thin_missed, target)) == pytest.approx(0.5, abs=1e-5)
    assert float(label_dice(torch.zeros_like(target), torch.zeros_like(target))) == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 12:] = 1                           # case 1's halving lies outside the mask
    prediction[1, 1] = target[1, 1]
    assert float(label_dice(prediction, target, "per_case", weight=mask)[1]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        label_dice(prediction, target[:, :1])
    with pytest.raises(ValueError, match="reduction"):
        label_dice(prediction, target, "sum")
