import pytest
import torch

from atlasreg.spatial.grid import Grid
from atlasreg.models.atlas_istn import AtlasISTN
from atlasreg.models.refine import refine_transforms


def square(n, lo, hi, size=32):
    lab = torch.zeros(n, 2, size, size)
    lab[:, 1, lo[0]:hi[0], lo[1]:hi[1]] = 1
    lab[:, 0] = 1 - lab[:, 1]
    return lab


def test_refinement_lowers_its_loss_and_leaves_the_network_untouched():
    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    atlas = square(1, (10, 10), (22, 22))
    target = square(2, (12, 8), (26, 20))  # shifted and stretched square: the "ITN logits"
    tr, history = refine_transforms(net, target, atlas, iterations=30, lr=3e-3)
    assert history.shape == (31, 2)
    assert (history[-1] < 0.5 * history[0]).all()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("variant,use_affine", [("svf", True), ("affine", True), ("affine_svf", False)])
def test_refinement_of_every_stn_variant(variant, use_affine):
    """SVF only and affine only (paper Table 4 ablations) and the affine part not yet started."""
    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)), stn_variant=variant)
    atlas = square(1, (10, 10), (22, 22))
    target = square(2, (12, 8), (26, 20))
    tr, history = refine_transforms(net, target, atlas, iterations=30, lr=3e-3, use_affine=use_affine)
    assert history.shape == (31, 2) and (history[-1] < history[0]).all()
    assert (tr.svf is None) == (variant == "affine")
    assert (tr.affine is None) == (variant == "svf" or not use_affine)


def test_refinement_with_the_dice_label_loss_fits_a_thin_structure():
    """refinement.label_loss dice: the Dice term falls and the deformed atlas's thin structure (2 voxels
    wide) comes onto the target's, shifted by 2 voxels, which the MSE (its 32 voxels of 3 x 1024) leaves
    where it is; unknown label losses are refused."""
    torch.manual_seed(0)
    grid = Grid.centred((32, 32), (2.0, 2.0))
    net = AtlasISTN(2, 3, grid)
    atlas, target = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    atlas[0, 1, 8:24, 8:16], target[0, 1, 8:24, 8:16] = 1, 1   # a large structure, in place
    atlas[0, 2, 8:24, 18:20], target[0, 2, 8:24, 20:22] = 1, 1  # a thin one, shifted
    for lab in (atlas, target):
        lab[0, 0] = 1 - lab[0, 1:].sum(0)
    from atlasreg.spatial.transforms import warp

    def fit(label_loss):
        tr, history = refine_transforms(net, target, atlas, iterations=40, lr=3e-3, lam=0.01, label_loss=label_loss)
        thin = warp(atlas, tr.inverse_points(), grid)[0, 2] > 0.5
        return float(2 * (thin & (target[0, 2] > 0.5)).sum() / (thin.sum() + 32)), history

    dice_mse, _ = fit("mse")
    dice_dice, history = fit("dice")
    assert float(history[-1, 0]) < 0.5 * float(history[0, 0])
    assert dice_dice > 0.9 and dice_mse < 0.5, (dice_dice, dice_mse)  # the atlas as it is: 0 (measured 1.0, 0.0)
    with pytest.raises(ValueError, match="label_loss"):
        refine_transforms(net, target, atlas, iterations=1, label_loss="ncc")


def test_batched_refinement_equals_refining_each_case_alone():
    torch.manual_seed(1)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    atlas = square(1, (10, 10), (22, 22))
    targets = torch.cat([square(1, (12, 8), (26, 20)), square(1, (6, 6), (18, 24))])
    tr_both, h_both = refine_transforms(net, targets, atlas, iterations=10, lr=3e-3)
    tr_one, h_one = refine_transforms(net, targets[1:], atlas, iterations=10, lr=3e-3)
    # Each case is computed in its own batch-1 graph: its losses are those of refining it alone, bit
    # for bit (the vmap version agreed to rtol 1e-4 and 2 micrometres only).
    assert torch.equal(h_both[:, 1], h_one[:, 0])
    assert torch.allclose(tr_both.inverse_points()[1], tr_one.inverse_points()[0], rtol=0, atol=1e-5)


def ellipsoids(centres, radii, grid):
    """One-hot labelmaps (N, 1 + K, *size) of K ellipsoids per case; centres, radii (N, K, 3) mm (x, y, z)."""
    pts = grid.points()[0]
    inside = ((((pts[None, None] - centres[:, :, None, None, None]) / radii[:, :, None, None, None]) ** 2)
              .sum(-1) <= 1).float()                       # (N, K, *size)
    inside = inside * (torch.cumsum(inside, 1) <= 1)        # the first ellipsoid wins where they overlap
    return torch.cat([1 - inside.sum(1, keepdim=True), inside], 1)


def test_a_case_refined_in_3d_does_not_depend_on_its_batch_neighbours():
    """Issue 11: a case refined with neighbours agrees with the case refined alone to well below 0.1
    voxel (max over the grid) after K = 50, in 3D with anisotropic voxels and an STN that predicts
    non-trivial transforms. With the former vmap refinement, float32 round-off of the batched
    convolutions, amplified by Adam, made them differ by up to 0.11 voxel (0.29 mm) on an ACDC model
    (benchmarks/refine_batch_dependence.py)."""
    torch.manual_seed(0)
    grid = Grid.centred((8, 16, 16), (2.0, 2.0, 6.0))   # 32 x 32 x 48 mm, 2 x 2 x 6 mm voxels
    net = AtlasISTN(3, 3, grid, stn_channels=(8, 8, 16))
    with torch.no_grad():                                # a perturbed STN: a non-trivial 1-pass transform
        for w in net.stn.parameters():
            w.add_(0.1 * torch.randn_like(w))
    atlas = ellipsoids(torch.tensor([[[0.0, 0.0, 0.0], [5.0, 4.0, 6.0]]]),
                       torch.tensor([[[10.0, 8.0, 15.0], [4.0, 4.0, 8.0]]]), grid)
    shifts = torch.tensor([[2.0, -1.0, 3.0], [-3.0, 2.0, -4.0], [1.0, 3.0, 5.0]])[:, None]
    targets = ellipsoids(torch.tensor([[0.0, 0.0, 0.0], [5.0, 4.0, 6.0]]) + shifts,
                         torch.tensor([[[11.0, 7.0, 14.0], [4.0, 5.0, 8.0]]]).expand(3, -1, -1), grid)
    mask = torch.ones(3, 1, *grid.size)
    mask[:, :, :1] = 0                                   # the first slice outside the scans
    onepass = net.transform(net.label_stn_input(targets, atlas))
    assert (onepass.forward_points() - grid.points()).norm(dim=-1).max() > 5.0   # mm

    tr_all, h_all = refine_transforms(net, targets, atlas, iterations=50, lr=3e-3, mask=mask)
    tr_one, h_one = refine_transforms(net, targets[1:2], atlas, iterations=50, lr=3e-3, mask=mask[1:2])
    assert (h_one[-1] < h_one[0]).all()
    assert torch.equal(h_all[:, 1], h_one[:, 0])
    voxel = torch.tensor(grid.spacing)
    for points in ("forward_points", "inverse_points"):
        diff = (getattr(tr_all, points)()[1] - getattr(tr_one, points)()[0]).abs() / voxel
        assert diff.max() < 1e-4, (points, float(diff.max()))
    assert torch.allclose(tr_all.affine.translation[1], tr_one.affine.translation[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["logits", "atlas", "mask"])
def test_refinement_refuses_non_finite_inputs(where):
    # NaN logits (from NaN intensities after normalisation) reached grid_sample through the STN and
    # crashed `segment` with SIGSEGV (issue 14); the refinement now refuses them first.
    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    inputs = {"logits": square(2, (12, 8), (26, 20)), "atlas": square(1, (10, 10), (22, 22)),
              "mask": torch.ones(2, 1, 32, 32)}
    inputs[where][-1, 0, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=f"{where}.*not finite"):
        refine_transforms(net, inputs["logits"], inputs["atlas"], iterations=2, mask=inputs["mask"])


def test_a_diverging_refinement_is_an_error_not_a_crash():
    # lr 1e10 is a valid setting (a number > 0) whose Adam steps give an infinite STN output after 2
    # iterations; grid_sample on NaN coordinates crashed the process (SIGSEGV).
    from atlasreg.errors import AtlasregError

    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    with pytest.raises(AtlasregError, match=r"diverged .* after 2 of 5 iterations\); lower refinement.lr \(now 1e\+10\)"):
        refine_transforms(net, square(2, (12, 8), (26, 20)), square(1, (10, 10), (22, 22)), iterations=5, lr=1e10)


def test_image_based_refinement_adds_the_image_term_and_moves_the_atlas_image_towards_the_image():
    """Issue 12 item 7: with an image similarity the refinement loss holds the image term (its first
    value equals the label-only loss plus the weighted LNCC of the undeformed case), and the refined
    deformed atlas image is closer to the image (LNCC) than with the label term alone."""
    import torch

    from atlasreg.losses.similarity import build_similarity
    from atlasreg.models.atlas_istn import AtlasISTN
    from atlasreg.models.refine import refine_transforms
    from atlasreg.spatial.grid import Grid
    from atlasreg.spatial.transforms import warp

    torch.manual_seed(0)
    grid = Grid.centred((32, 32), (2.0, 2.0))
    net = AtlasISTN(2, 2, grid)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = lambda cy, cx: (((yy - cy) ** 2 + (xx - cx) ** 2) < 49).float()[None, None]
    atlas_fg = disc(16, 16)
    atlas = torch.cat([1 - atlas_fg, atlas_fg], 1)
    atlas_image = atlas_fg * 2 - 1
    image = disc(18, 19) * 2 - 1  # the image's disc lies 2 and 3 voxels off the ITN's
    logits = torch.cat([1 - atlas_fg, atlas_fg], 1) * 4  # the ITN sees the atlas position
    plain, h0 = refine_transforms(net, logits, atlas, iterations=30, lr=1e-2)
    both, h1 = refine_transforms(net, logits, atlas, iterations=30, lr=1e-2, images=image,
                                 atlas_image=atlas_image, image_similarity="lncc", image_weight=1.0)
    sim = build_similarity("lncc", grid.spacing)
    start, _ = refine_transforms(net, logits, atlas, iterations=0)  # the unrefined (1-pass) transform
    first_image_term = float(sim(image, warp(atlas_image, start.inverse_points(), grid)))
    assert h1.shape == h0.shape
    assert abs(float(h1[0, 0]) - (float(h0[0, 0]) + first_image_term)) < 1e-5
    d_plain = float(sim(image, warp(atlas_image, plain.inverse_points(), grid)))
    d_both = float(sim(image, warp(atlas_image, both.inverse_points(), grid)))
    assert d_both < d_plain, (d_both, d_plain, first_image_term)
    with __import__("pytest").raises(ValueError, match="images and the atlas image"):
        refine_transforms(net, logits, atlas, iterations=1, image_similarity="lncc", image_weight=1.0)


def test_refinement_target_is_the_logits_or_the_one_hot_of_their_argmax():
    from atlasreg.models.refine import refinement_target

    logits = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.45, 0.2], [0.2, 0.35, 0.7]])[None, :, :, None]  # (1, 3, 3, 1)
    assert refinement_target(logits, "logits") is logits
    one_hot = refinement_target(logits, "labelmap")
    assert torch.equal(one_hot.argmax(1), logits.argmax(1))
    assert torch.equal(one_hot.sum(1), torch.ones(1, 3, 1)) and set(one_hot.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="'logits' or 'labelmap'"):
        refinement_target(logits, "probabilities")


def test_unsure_logits_pull_the_atlas_away_and_their_labelmap_does_not():
    """Under-confident ITN logits (0.4 inside the structure, its argmax nonetheless) make an MSE on
    the foreground channels cheaper for background than for the structure ((1 - 0.4)^2 > 0.4^2), so
    refining towards them shrinks the deformed atlas structure; towards their one-hot argmax
    (refinement.target: labelmap) its overlap with the ITN's segmentation grows."""
    torch.manual_seed(0)
    grid = Grid.centred((32, 32), (2.0, 2.0))
    net = AtlasISTN(2, 2, grid)
    atlas = square(1, (10, 10), (22, 22))
    segmentation = square(1, (9, 11), (23, 23))
    inside = segmentation[:, 1:]
    logits = torch.cat([1 - 0.7 * inside, 0.4 * inside], 1)  # inside: bg 0.3, fg 0.4 (the argmax); outside: 1, 0

    def fit(target):
        tr, _ = refine_transforms(net, logits, atlas, iterations=40, lr=3e-3, target=target)
        from atlasreg.spatial.transforms import warp
        fg = warp(atlas, tr.inverse_points(), grid)[0, 1] > 0.5
        ref = segmentation[0, 1] > 0.5
        return float(2 * (fg & ref).sum() / (fg.sum() + ref.sum())), int(fg.sum())

    dice_logits, size_logits = fit("logits")
    dice_labelmap, size_labelmap = fit("labelmap")
    assert dice_labelmap > dice_logits + 0.1, (dice_labelmap, dice_logits)
    assert size_logits < 0.8 * size_labelmap, (size_logits, size_labelmap)
    assert dice_labelmap > 0.97  # the undeformed atlas: 0.92


def test_segmented_structures_are_those_winning_the_argmax_somewhere_in_the_field_of_view():
    logits = torch.zeros(2, 4, 8, 8)
    logits[:, 0] = 1.0
    logits[0, 1, :2] = 2.0          # case 0: structure 1 wins in rows 0-1
    logits[1, 2, 6:] = 2.0          # case 1: structure 2 wins in rows 6-7 only ...
    logits[:, 3] = 0.9              # structure 3 never wins
    mask = torch.ones(2, 1, 8, 8)
    mask[1, :, 5:] = 0              # ... which lie outside case 1's scan
    from atlasreg.models.refine import segmented_structures

    assert segmented_structures(logits).tolist() == [[1, 1, 0, 0], [1, 0, 1, 0]]
    assert segmented_structures(logits, mask).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_a_structure_the_itn_missed_follows_its_neighbours_only_with_segmented_structures():
    """Atlas: structures 1 and 2 side by side. The ITN segments 1 (shifted by 2 voxels) and misses 2
    (background there). Refining all structures squeezes the atlas's 2 away; with
    refinement.structures 'segmented' it keeps its size while 1 is still fitted."""
    torch.manual_seed(0)
    grid = Grid.centred((32, 32), (2.0, 2.0))
    net = AtlasISTN(2, 3, grid)
    atlas = torch.zeros(1, 3, 32, 32)
    atlas[0, 1, 8:24, 6:15] = 1
    atlas[0, 2, 8:24, 15:24] = 1
    atlas[0, 0] = 1 - atlas[0, 1:].sum(0)
    itn = torch.zeros(1, 3, 32, 32)
    itn[0, 1, 10:26, 6:15] = 1
    itn[0, 0] = 1 - itn[0, 1]
    from atlasreg.spatial.transforms import warp

    def fit(structures):
        tr, _ = refine_transforms(net, itn, atlas, iterations=40, lr=3e-3, lam=0.01, target="labelmap",
                                  structures=structures)
        deformed = warp(atlas, tr.inverse_points(), grid)[0]
        one = deformed[1] > 0.5
        ref = itn[0, 1] > 0.5
        return float(2 * (one & ref).sum() / (one.sum() + ref.sum())), int((deformed[2] > 0.5).sum())

    dice_all, size_all = fit("all")
    dice_segmented, size_segmented = fit("segmented")
    assert size_segmented > 0.9 * 16 * 9, size_segmented        # structure 2: 144 voxels in the atlas
    assert size_all < 0.8 * size_segmented, (size_all, size_segmented)
    assert dice_segmented > 0.95, dice_segmented                 # the undeformed atlas: 0.875
    with pytest.raises(ValueError, match="structures"):
        refine_transforms(net, itn, atlas, iterations=1, structures="some")


def test_the_stn_sees_the_atlas_it_was_trained_on_while_the_connected_atlas_is_fitted():
    """refinement.atlas_topology connected: the label terms fit the connected atlas, the STN input keeps
    the probabilistic atlas it was trained on, so K = 0 gives back the 1-pass transform exactly."""
    from atlasreg.atlas_topology import connected_atlas

    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    with torch.no_grad():  # a trained STN: its output layers are zero at initialisation
        for w in net.stn.parameters():
            w.add_(0.05 * torch.randn_like(w))
    atlas = 0.7 * square(1, (10, 10), (22, 22)) + 0.3 * square(1, (12, 12), (24, 24))
    fitted = connected_atlas(atlas, (2.0, 2.0))
    logits = square(1, (12, 8), (26, 20))
    with torch.no_grad():
        onepass = net.transform(net.stn_input(None, logits, atlas, None)).inverse_points()
    kept, _ = refine_transforms(net, logits, fitted, iterations=0, stn_atlas=atlas)
    assert torch.equal(kept.inverse_points(), onepass)
    other, _ = refine_transforms(net, logits, fitted, iterations=0)
    assert not torch.equal(other.inverse_points(), onepass)
    _, history = refine_transforms(net, logits, fitted, iterations=20, lr=3e-3, stn_atlas=atlas)
    assert history[-1, 0] < 0.7 * history[0, 0]
