"""Placement of the model grid on a case (atlasreg.data.placement): canonical orientations, the
orientation search's candidates, and a volume turned in-plane found back against a reference."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volumes import LABELS, ellipsoids, write_identity_header_scan

from atlasreg.data.cases import Preprocessing, load_case, placement_of, reference_labelmap
from atlasreg.data.placement import canonical_direction, orientation_candidates, overlap_score


def test_canonical_directions():
    """ITK's world is LPS: 'RAS' model axes point along -x, -y, +z; 'LPS' is the identity; 'native'
    keeps the file's own direction; 2D codes have two letters."""
    assert np.array_equal(canonical_direction("RAS", 3, np.eye(3)), np.diag([-1.0, -1.0, 1.0]))
    assert np.array_equal(canonical_direction("lps", 3, np.eye(3)), np.eye(3))
    assert np.array_equal(canonical_direction("PLS", 3, np.eye(3)), np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]]))
    native = np.array([[0, -1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    assert np.array_equal(canonical_direction("native", 3, native), native)
    assert np.array_equal(canonical_direction("RA", 2, np.eye(2)), -np.eye(2))
    for bad in ("RAX", "RRS", "RA", "RASL"):
        with pytest.raises(ValueError, match="orientation"):
            canonical_direction(bad, 3, np.eye(3))


@pytest.mark.parametrize("ndim", [2, 3])
def test_orientation_candidates(ndim):
    """none: the identity; in_plane: the 4 proper rotations about z; in_plane_flips: the 8 flips and
    swaps of x and y; axes: all 2^D D! signed permutations (48 in 3D). Identity first, no duplicates."""
    counts = {"none": 1, "in_plane": 4, "in_plane_flips": 8, "axes": 48 if ndim == 3 else 8}
    for mode, n in counts.items():
        cands = orientation_candidates(mode, ndim)
        assert len(cands) == n, mode
        assert np.array_equal(cands[0], np.eye(ndim)), mode
        assert len({c.tobytes() for c in cands}) == n, mode
        for P in cands:  # signed permutations
            assert np.array_equal(np.abs(P).sum(0), np.ones(ndim)) and np.array_equal(np.abs(P).sum(1), np.ones(ndim))
    for P in orientation_candidates("in_plane", ndim):
        assert np.linalg.det(P) == pytest.approx(1.0)
        if ndim == 3:
            assert P[2, 2] == 1.0  # about the slice axis
    with pytest.raises(ValueError, match="orientation search"):
        orientation_candidates("all", ndim)


def test_in_plane_search_finds_a_volume_turned_by_90_degrees(tmp_path):
    """A scan and its copy turned by 90 degrees in-plane (np.rot90 of image and labels, identity
    headers with a declared spacing, as ACDC): with orientation_search 'in_plane' against the unturned
    labelmap as reference, the turned case's labelmap on its placed model grid equals the reference's
    (measured: exactly; the placed grid turns with the anatomy about its labels' centroid); without the
    search it does not (measured: mean soft overlap 0.35 against the reference's own 0.62)."""
    img, lab = ellipsoids(size_xyz=(24, 20, 6), spacing=(1.5, 1.5, 6.0))
    ref_image, ref_label = write_identity_header_scan(tmp_path, "reference", img, lab)
    turned = [np.ascontiguousarray(np.rot90(a, 1, axes=(1, 2))) for a in (img, lab)]
    image, label = write_identity_header_scan(tmp_path, "turned", *turned)
    assert sitk.ReadImage(str(image)).GetSize() == (20, 24, 6)
    prep = Preprocessing(tuple(LABELS), (8, 16, 16), (2.0, 2.0, 6.0), 3, spacing_override=(1.5, 1.5, 6.0),
                         orientation_search="in_plane", reference=str(ref_label), centre="labels")
    reference = reference_labelmap(prep)
    case = load_case(image, label, prep)
    assert torch.allclose(case.labelmap, reference, atol=1e-5)
    P = case.physical.direction_matrix.T @ case.placed.direction_matrix  # the chosen candidate
    assert np.allclose(np.abs(P[:2, :2]), [[0, 1], [1, 0]]) and np.isclose(np.linalg.det(P), 1.0)

    no_search = Preprocessing(prep.labels, prep.size, prep.spacing, 3, prep.spacing_override, centre="labels")
    unturned = load_case(image, label, no_search)
    assert np.allclose(unturned.placed.direction_matrix, case.physical.direction_matrix)
    assert (unturned.labelmap - reference).abs().max() > 0.5
    assert overlap_score(unturned.labelmap, reference) < overlap_score(reference, reference) - 0.2
    # The reference itself is found unturned, and the search at test time (the ITN's probabilities
    # against a reference on the model grid) picks the same turn.
    again = load_case(ref_image, ref_label, prep)
    assert np.allclose(again.placed.direction_matrix, again.physical.direction_matrix)
    probabilities = unturned.labelmap  # a perfect first ITN pass on the unturned placement
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    test_time = placement_of(array, None, unturned.physical, prep, probabilities, unturned.placed, reference)
    assert np.allclose(test_time.direction_matrix, case.placed.direction_matrix)


def test_test_time_centre_from_soft_itn_probabilities(tmp_path):
    """At test time the grid is centred on the ITN's foreground. The ITN regresses logits onto one-hot
    labels (MSE), so their softmax is soft: background below 0.5 everywhere (softmax of a one-hot
    vector of 4 channels: 0.47). The centre is taken from the argmax, and lands on the labels' own
    centroid (measured: within 0.1 mm) although the first grid was centred on the image, 12 mm away;
    thresholding the soft probabilities would return the grid's own centre."""
    img, lab = ellipsoids(size_xyz=(40, 36, 8), spacing=(1.5, 1.5, 6.0), shift_mm=(12.0, -6.0, 0.0),
                          radii_mm=(8.0, 9.0, 12.0))
    image, label = write_identity_header_scan(tmp_path, "scan", img, lab)
    prep = Preprocessing(tuple(LABELS), (8, 32, 32), (2.0, 2.0, 6.0), 3, spacing_override=(1.5, 1.5, 6.0),
                         centre="labels")
    truth = load_case(image, label, prep).placed
    first = load_case(image, label, Preprocessing(**{**prep.__dict__, "centre": "image"}))
    assert np.linalg.norm(np.subtract(first.placed.centre, truth.centre)) > 10.0
    soft = torch.softmax(first.labelmap, 1)
    assert float(soft[:, 0].max()) < 0.5
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    found = placement_of(array, None, first.physical, prep, soft, first.placed)
    assert np.linalg.norm(np.subtract(found.centre, truth.centre)) < 0.5
