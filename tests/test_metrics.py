"""Known-answer tests of atlasreg.evaluation.metrics (MONAI-backed Dice / HD / HD95 / ASD)."""

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from atlasreg.evaluation.metrics import labelmap_connected_components, segmentation_metrics, symmetric_hd95


def square(shape=(32, 32), y=(10, 20), x=(10, 20), value=1):
    out = np.zeros(shape, dtype=np.int64)
    out[y[0]:y[1], x[0]:x[1]] = value
    return out


def cube(shape=(24, 24, 24), z=(6, 14), y=(6, 14), x=(6, 14), value=1):
    out = np.zeros(shape, dtype=np.int64)
    out[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return out


def disc(shape=(40, 40), centre=(20, 20), radius=8, value=1):
    yy, xx = np.indices(shape)
    return np.where((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2, value, 0)


def test_identical_masks():
    m = disc(value=255)
    r = segmentation_metrics(m, m, labels=[0, 255])
    assert set(r) == {255}
    assert r[255]["dice"] == pytest.approx(1.0)
    assert r[255]["hd"] == pytest.approx(0.0)
    assert r[255]["hd95"] == pytest.approx(0.0)
    assert r[255]["asd"] == pytest.approx(0.0)


def test_dice_of_overlapping_squares():
    a = square(y=(10, 20), x=(10, 20))
    b = square(y=(15, 25), x=(15, 25))
    # overlap 5 x 5 = 25 pixels, each square 100: 2 * 25 / 200
    assert segmentation_metrics(a, b, [0, 1])[1]["dice"] == pytest.approx(0.25)


def test_hausdorff_of_shifted_square_2d():
    a = square(x=(10, 20))
    b = square(x=(13, 23))  # shifted by 3 along x (last array axis)
    r = segmentation_metrics(a, b, [0, 1])[1]
    assert r["hd"] == pytest.approx(3.0)
    assert r["hd95"] <= r["hd"] + 1e-6
    assert 0 < r["asd"] <= r["hd"]
    assert r["dice"] == pytest.approx(2 * 70 / 200)
    # spacing in ITK order (x, y): x spacing 2 doubles a shift along x
    rs = segmentation_metrics(a, b, [0, 1], spacing=(2.0, 1.0))[1]
    assert rs["hd"] == pytest.approx(6.0)
    assert r["asd"] < rs["asd"] <= 2 * r["asd"] + 1e-6
    assert rs["dice"] == pytest.approx(r["dice"])  # Dice does not depend on spacing


def test_anisotropic_spacing_axis_order_2d():
    a = square(y=(10, 20))
    b = square(y=(13, 23))  # shifted by 3 along y (first array axis)
    assert segmentation_metrics(a, b, [0, 1], spacing=(2.0, 1.0))[1]["hd"] == pytest.approx(3.0)
    assert segmentation_metrics(a, b, [0, 1], spacing=(1.0, 2.0))[1]["hd"] == pytest.approx(6.0)


def test_anisotropic_spacing_axis_order_3d():
    a = cube()
    shifted_x = cube(x=(9, 17))
    shifted_z = cube(z=(9, 17))
    assert segmentation_metrics(a, shifted_x, [0, 1])[1]["hd"] == pytest.approx(3.0)
    assert segmentation_metrics(a, shifted_x, [0, 1], spacing=(2.0, 1.0, 1.0))[1]["hd"] == pytest.approx(6.0)
    assert segmentation_metrics(a, shifted_x, [0, 1], spacing=(1.0, 1.0, 2.5))[1]["hd"] == pytest.approx(3.0)
    assert segmentation_metrics(a, shifted_z, [0, 1], spacing=(1.0, 1.0, 2.5))[1]["hd"] == pytest.approx(7.5)
    r = segmentation_metrics(a, shifted_z, [0, 1], spacing=(1.0, 1.0, 2.5))[1]
    assert r["hd95"] <= r["hd"] + 1e-6
    assert r["dice"] == pytest.approx(2 * 5 * 64 / (2 * 512))


def test_asd_of_identical_disc_3d_and_2d():
    d = disc()
    assert segmentation_metrics(d, d, [0, 1])[1]["asd"] == pytest.approx(0.0)
    zz, yy, xx = np.indices((20, 20, 20))
    ball = ((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 36).astype(np.int64)
    r = segmentation_metrics(ball, ball, [0, 1], spacing=(0.5, 0.7, 2.0))[1]
    assert r["asd"] == pytest.approx(0.0)
    assert r["hd"] == pytest.approx(0.0)


def test_surface_distances_match_brute_force():
    """Symmetric ASD = mean over the surface points of both masks; HD95 = max of the directed 95th
    percentiles (MONAI semantics); checked against pairwise distances between edge pixels."""
    a = disc(centre=(20, 20), radius=8)
    b = disc(centre=(22, 19), radius=6)
    spacing_xy = (1.5, 0.8)
    r = segmentation_metrics(a, b, [0, 1], spacing=spacing_xy)[1]

    def edge_points(m):
        m = m.astype(bool)
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.array(spacing_xy[::-1])

    pa, pb = edge_points(a), edge_points(b)
    d = cdist(pa, pb)
    ab, ba = d.min(axis=1), d.min(axis=0)
    assert r["hd"] == pytest.approx(max(ab.max(), ba.max()), rel=1e-5)
    assert r["asd"] == pytest.approx(np.concatenate([ab, ba]).mean(), rel=1e-5)
    assert r["hd95"] == pytest.approx(max(np.percentile(ab, 95), np.percentile(ba, 95)), rel=1e-5)
    assert r["hd95"] <= r["hd"]


def test_multiple_labels_and_background():
    ref = square(y=(2, 10), x=(2, 10), value=1) + square(y=(20, 28), x=(20, 28), value=2)
    pred = ref.copy()
    r = segmentation_metrics(pred, ref, [0, 1, 2])
    assert set(r) == {1, 2}
    r = segmentation_metrics(pred, ref, [0, 1, 2], include_background=True)
    assert set(r) == {0, 1, 2}
    assert all(v["dice"] == pytest.approx(1.0) for v in r.values())


def test_empty_prediction_gives_nan_and_warning():
    ref = square()
    pred = np.zeros_like(ref)
    with pytest.warns(UserWarning, match="label 1"):
        r = segmentation_metrics(pred, ref, [0, 1])[1]
    assert r["dice"] == 0.0
    assert all(math.isnan(r[k]) for k in ("hd", "hd95", "asd"))


def test_both_empty_dice_one_and_no_monai_warnings():
    z = np.zeros((16, 16), dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = segmentation_metrics(z, z, [0, 1])[1]
    assert r["dice"] == 1.0
    assert math.isnan(r["hd"]) and math.isnan(r["asd"])
    assert len(caught) == 1 and "label 1" in str(caught[0].message)
    # a normal case emits no warnings at all (MONAI's deprecation warnings are caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segmentation_metrics(square(), square(x=(12, 22)), [0, 1])
    assert caught == []


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)), [0, 1])
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(square(), square(), [0, 1], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(square(), square(), [0, 1], spacing=(1.0, 0.0))


def test_connected_components():
    m = square(y=(2, 8), x=(2, 8), value=3) + square(y=(15, 20), x=(15, 20), value=3)
    assert labelmap_connected_components(m, 3) == 2
    assert labelmap_connected_components(m, 1) == 0
    assert labelmap_connected_components(square(), 1) == 1
    diagonal = np.zeros((4, 4), dtype=np.int64)
    diagonal[0, 0] = diagonal[1, 1] = 1  # touching diagonally: one component with full connectivity
    assert labelmap_connected_components(diagonal, 1) == 1
    assert labelmap_connected_components(cube() + cube(z=(16, 20), value=1), 1) == 2


def test_batch_dice_hd95_equals_segmentation_metrics_per_case_and_label():
    """The batched monitoring metrics are those of segmentation_metrics on each case: class indices
    map to the declared label values, anisotropic spacing in ITK order, and the empty-structure
    conventions (absent from both: Dice 1; from one: Dice 0; HD95 NaN) without warnings."""
    import torch

    from atlasreg.evaluation.metrics import batch_dice_hd95

    rng = np.random.default_rng(0)
    labels = [0, 10, 20]
    pred = np.zeros((4, 12, 14, 16), int)
    ref = np.zeros_like(pred)
    for i in range(3):
        for c in (1, 2):
            z, y, x = rng.integers(1, 6, 3)
            pred[i, z:z + 5, y:y + 6, x + 6 * (c - 1):x + 6 * c] = c
            ref[i, z + 1:z + 6, y:y + 5, x + 6 * (c - 1) + 1:x + 6 * c + 1] = c
    pred[1][pred[1] == 2] = 0          # label 20 absent from the prediction of case 1
    pred[3], ref[3] = 0, 0             # case 3: nothing anywhere
    spacing = (0.7, 1.1, 2.5)          # ITK order x, y, z
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dice, hd95 = batch_dice_hd95(torch.from_numpy(pred), torch.from_numpy(ref), 3, spacing)
    assert dice.shape == hd95.shape == (4, 2) and dice.dtype == torch.float64
    for i in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = segmentation_metrics(np.take(labels, pred[i]), np.take(labels, ref[i]), labels, spacing)
        for c, value in ((1, 10), (2, 20)):
            assert dice[i, c - 1].item() == pytest.approx(expected[value]["dice"], abs=1e-6)
            want = expected[value]["hd95"]
            got = hd95[i, c - 1].item()
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-6)
    assert dice[1, 1].item() == 0.0 and math.isnan(hd95[1, 1].item())
    assert dice[3].tolist() == [1.0, 1.0] and all(math.isnan(v) for v in hd95[3].tolist())
    assert 0 < dice[0, 0].item() < 1 and hd95[0, 0].item() > 0
    with pytest.raises(ValueError, match="outside"):
        batch_dice_hd95(torch.full((1, 4, 4), 3), torch.zeros(1, 4, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        batch_dice_hd95(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), 3)


# ------------------------------------------------------------------ DeepATLAS's symmetric HD95 (Eq. 16)


@pytest.mark.parametrize("shape, spacing", [((20, 30), (0.5, 2.0)), ((6, 20, 30), (0.5, 2.0, 3.0))])
def test_symmetric_hd95_is_the_mean_of_the_directed_percentiles_of_a_known_shape(shape, spacing):
    """Reference: one voxel; prediction: that voxel and one 20 voxels (10 mm) away along x. The
    prediction's surface is at distances {0, 10} mm from the reference's, whose 95th percentile (linear
    between ranks) is 9.5 mm; the reference's is at 0 from the prediction's. Eq. 16 gives the mean,
    4.75 mm; atlasreg's HD95 the maximum, 9.5 mm. 2D and 3D, anisotropic spacing (ITK order)."""
    reference = np.zeros(shape, np.int64)
    reference[(2,) * len(shape)] = 1
    prediction = reference.copy()
    prediction[(2,) * (len(shape) - 1) + (22,)] = 1
    assert symmetric_hd95(prediction, reference, [0, 1], spacing) == {1: pytest.approx(4.75, rel=1e-6)}
    assert symmetric_hd95(reference, prediction, [0, 1], spacing) == {1: pytest.approx(4.75, rel=1e-6)}
    standard = segmentation_metrics(prediction, reference, [0, 1], spacing)[1]
    assert standard["hd95"] == pytest.approx(9.5, rel=1e-6)
    assert standard["hd95_avg"] == pytest.approx(4.75, rel=1e-6)  # evaluate's column of Eq. 16


def test_symmetric_hd95_matches_brute_force_and_never_exceeds_the_standard_hd95():
    a = disc(centre=(20, 20), radius=8, value=2) + square((40, 40), (30, 36), (5, 12), value=1)
    b = disc(centre=(22, 19), radius=6, value=2) + square((40, 40), (28, 35), (6, 14), value=1)
    spacing_xy = (1.5, 0.8)
    sym = symmetric_hd95(a, b, [0, 1, 2], spacing=spacing_xy)
    standard = segmentation_metrics(a, b, [0, 1, 2], spacing=spacing_xy)

    def edge_points(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.array(spacing_xy[::-1])

    for label in (1, 2):
        d = cdist(edge_points(a == label), edge_points(b == label))
        ab, ba = np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)
        assert ab != pytest.approx(ba)  # the two directions differ here
        assert sym[label] == pytest.approx(0.5 * (ab + ba), rel=1e-5)
        assert standard[label]["hd95"] == pytest.approx(max(ab, ba), rel=1e-5) and sym[label] < standard[label]["hd95"]
        assert standard[label]["hd95_avg"] == pytest.approx(sym[label], rel=1e-12)


def test_symmetric_hd95_of_an_empty_structure_is_nan_with_a_warning():
    with pytest.warns(UserWarning, match="label 1 is empty in the prediction"):
        out = symmetric_hd95(np.zeros((8, 8), np.int64), square((8, 8), (2, 4), (2, 4)), [0, 1])
    assert math.isnan(out[1])
    assert symmetric_hd95(square(), square(), [0, 1], include_background=True) == {0: 0.0, 1: 0.0}
    with pytest.raises(ValueError, match="shape mismatch"):
        symmetric_hd95(square((8, 8)), square(), [0, 1])
