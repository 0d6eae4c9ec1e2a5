"""Tests for atlasreg.correspondence: subject-to-subject mapping through atlas space (Eqs. 22-23) with
known answers on hand-built case folders (transforms and displacement fields written with SimpleITK in
the layout of `atlasreg segment`: one atlas world frame, the centred model grid, for every case)."""

from __future__ import annotations

import argparse
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fields import smooth_svf

from atlasreg.correspondence import (add_correspond_parser, map_labelmap, map_points, map_points_csv,
                                     read_case_transform, read_displacement_field, read_points_csv,
                                     subject_to_subject_transform)
from atlasreg.errors import AtlasregError
from atlasreg.spatial.grid import Grid


# ------------------------------------------------------------------------------------------ helpers


def _rotation2(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _rotation3(axis, theta):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * k @ k


def _centre(size, spacing, origin, direction):
    d = len(size)
    return np.asarray(origin) + np.asarray(direction).reshape(d, d) @ (
        np.asarray(spacing) * (np.asarray(size) - 1) / 2)


def _zero(p):
    return np.zeros_like(p)


def _constant(v):
    return lambda p: np.broadcast_to(np.asarray(v, float), p.shape).copy()


def _dense(grid: Grid, disp_fn) -> sitk.DisplacementFieldTransform:
    """A displacement-field transform on `grid` whose value at each voxel centre q is disp_fn(q)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij")[::-1], -1)  # ITK order
    pts = grid.index_to_world(idx)
    disp = disp_fn(pts.reshape(-1, grid.ndim)).reshape(pts.shape)
    img = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    grid.copy_information_to(img)
    return sitk.DisplacementFieldTransform(img)


def _affine(matrix, translation) -> sitk.AffineTransform:
    t = sitk.AffineTransform(len(translation))
    t.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    t.SetTranslation(np.asarray(translation, float).tolist())
    return t


def _composite(*parts):
    """Parts applied in the order given (ITK applies the last-added first)."""
    c = sitk.CompositeTransform(parts[0].GetDimension())
    for p in reversed(parts):
        c.AddTransform(p)
    return c


def make_case(folder: Path, size=(20, 16), spacing=(1.0, 1.0), origin=None, direction=None, model_size=None,
              model_spacing=None, affine=None, inv=_zero, fwd=_zero,
              files=("forward", "inverse", "forward_field", "inverse_field")) -> Path:
    """A case folder as `atlasreg segment` writes it. size/spacing/origin/direction: the input grid (ITK
    order). The atlas grid is Grid.centred(model size, model spacing) (default: the input's size and
    spacing; model_size in ITK order). Phi (atlas world -> subject world) = affine o (id + fwd) and
    Phi^-1 = (id + inv) o affine^-1, with affine (M, t): q -> M q + t (default: the input grid's frame
    q -> c + R q, as segment) and inv / fwd: atlas world points (n, D) -> displacements (n, D), the dense
    parts on the atlas grid. Writes forward/inverse_transform.h5 (the composites) and
    forward/inverse_displacement.nii.gz (the composites sampled on the atlas / the input grid)."""
    d = len(size)
    origin = tuple(float(o) for o in (origin if origin is not None else (0.0,) * d))
    direction = np.eye(d) if direction is None else np.asarray(direction, float)
    native = Grid(tuple(reversed(size)), tuple(spacing), origin, tuple(direction.ravel()))
    atlas = Grid.centred(tuple(reversed(model_size or size)), tuple(model_spacing or spacing))
    m, t = affine if affine is not None else native.frame()
    to_subject = _composite(_dense(atlas, fwd), _affine(m, t))
    mi = np.linalg.inv(m)
    to_atlas = _composite(_affine(mi, -mi @ np.asarray(t, float)), _dense(atlas, inv))
    folder.mkdir(parents=True, exist_ok=True)
    if "inverse" in files:
        sitk.WriteTransform(to_atlas, str(folder / "inverse_transform.h5"))
    if "forward" in files:
        sitk.WriteTransform(to_subject, str(folder / "forward_transform.h5"))
    for name, tx, grid in (("inverse", to_atlas, native), ("forward", to_subject, atlas)):
        if f"{name}_field" in files:
            field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, grid.size_xyz, grid.origin,
                                                      grid.spacing, grid.direction)
            sitk.WriteImage(field, str(folder / f"{name}_displacement.nii.gz"))
    return folder


def _labelmap_like(case: Path, array, path: Path) -> Path:
    ref = sitk.ReadImage(str(case / "inverse_displacement.nii.gz"))
    img = sitk.GetImageFromArray(np.asarray(array))
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path))
    return path


def _blob(shape=(16, 20)):
    a = np.zeros(shape, np.uint8)
    a[4:9, 5:11] = 1
    a[6:8, 7:9] = 2
    a[10:12, 12:14] = 7
    return a


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----------------------------------------------------------------------------------- known answers


def test_identity_fields_map_points_and_labelmaps_to_themselves(tmp_path):
    geo = dict(size=(20, 16), spacing=(0.8, 1.2), origin=(-3.0, 5.0))
    a, b = make_case(tmp_path / "A", **geo), make_case(tmp_path / "B", **geo)
    pts = np.array([[0.0, 10.0], [5.5, 12.25], [10.0, 20.0]])
    np.testing.assert_allclose(map_points(pts, a, b), pts, atol=1e-9)
    t = subject_to_subject_transform(a, b)
    for p in pts:
        np.testing.assert_allclose(t.TransformPoint(p.tolist()), p, atol=1e-9)
    lab = _labelmap_like(a, _blob(), tmp_path / "a_lab.nii.gz")
    for interp in ("linear", "nearest"):
        out = map_labelmap(lab, a, b, tmp_path / f"out_{interp}.nii.gz", interpolation=interp)
        np.testing.assert_array_equal(_read(out), _blob())
        got = sitk.ReadImage(str(out))
        assert got.GetSize() == (20, 16) and np.allclose(got.GetOrigin(), (-3.0, 5.0))


# A: subject -> atlas +3 mm in x (forward: -3); B: subject -> atlas -2 mm in y (forward: +2); both in the
# dense parts, on an atlas grid larger than the inputs so that every mapped point stays on it.
_MODEL = dict(model_size=(26, 22))


def _translated_cases(tmp_path, **geo):
    a = make_case(tmp_path / "A", inv=_constant((3.0, 0.0)), fwd=_constant((-3.0, 0.0)), **_MODEL, **geo)
    b = make_case(tmp_path / "B", inv=_constant((0.0, -2.0)), fwd=_constant((0.0, 2.0)), **_MODEL, **geo)
    return a, b


def test_constant_translations_offset_points_and_pull_back(tmp_path):
    a, b = _translated_cases(tmp_path)
    pts = np.array([[6.0, 5.0], [8.25, 7.5], [10.0, 9.0]])
    # p_B = Phi_B(Phi_A^-1(p_A)) = p_A + (3, 0) + (0, 2)
    np.testing.assert_allclose(map_points(pts, a, b), pts + [3.0, 2.0], atol=1e-9)
    # the pull-back goes the other way: T(p_B) = p_B - (3, 2)
    t = subject_to_subject_transform(a, b)
    np.testing.assert_allclose(t.TransformPoint((9.0, 7.0)), (6.0, 5.0), atol=1e-9)
    # and from B to A: p_A = p_B - (3, 2)
    np.testing.assert_allclose(map_points(pts + [3.0, 2.0], b, a), pts, atol=1e-9)


def test_translated_labelmap_moves_by_the_offset_and_round_trips(tmp_path):
    a, b = _translated_cases(tmp_path)
    src = _blob()
    lab = _labelmap_like(a, src, tmp_path / "a_lab.png")
    for interp in ("linear", "nearest"):
        on_b = map_labelmap(lab, a, b, tmp_path / f"on_b_{interp}.png", interpolation=interp)
        expected = np.zeros_like(src)
        expected[2:, 3:] = src[:-2, :-3]  # spacing 1 mm: +3 voxels in x, +2 in y
        np.testing.assert_array_equal(_read(on_b), expected)
        back = map_labelmap(on_b, b, a, tmp_path / f"back_{interp}.png", interpolation=interp)
        np.testing.assert_array_equal(_read(back), src)
        assert sitk.ReadImage(str(back)).GetPixelID() == sitk.sitkUInt8


def test_different_origins_and_directions_map_grid_centre_to_grid_centre_2d(tmp_path):
    ga = dict(size=(20, 16), spacing=(1.0, 1.0), origin=(10.0, -7.0), direction=_rotation2(0.4))
    gb = dict(size=(20, 16), spacing=(1.0, 1.0), origin=(-30.0, 55.0), direction=_rotation2(-1.1) @ np.diag([1, -1]))
    a, b = make_case(tmp_path / "A", **ga), make_case(tmp_path / "B", **gb)
    ca, cb = _centre(**ga), _centre(**gb)
    np.testing.assert_allclose(map_points(ca[None], a, b)[0], cb, atol=1e-9)
    np.testing.assert_allclose(subject_to_subject_transform(a, b).TransformPoint(cb.tolist()), ca, atol=1e-9)
    # any atlas offset v from the centre keeps its grid-axis coordinates: c_A + R_A v -> c_B + R_B v
    v = np.array([3.0, -2.5])
    np.testing.assert_allclose(map_points((ca + ga["direction"] @ v)[None], a, b)[0],
                               cb + gb["direction"] @ v, atol=1e-9)
    # same size and spacing: the atlas sits on both grids alike, so the labelmap array is unchanged
    lab = _labelmap_like(a, _blob(), tmp_path / "a_lab.nii.gz")
    out = map_labelmap(lab, a, b, tmp_path / "on_b.nii.gz")
    np.testing.assert_array_equal(_read(out), _blob())
    np.testing.assert_allclose(sitk.ReadImage(str(out)).GetDirection(), gb["direction"].ravel(), atol=1e-6)


def test_different_origins_and_directions_map_grid_centre_to_grid_centre_3d(tmp_path):
    ga = dict(size=(9, 8, 7), spacing=(1.5, 1.0, 2.0), origin=(4.0, -2.0, 30.0),
              direction=_rotation3((1, 2, 3), 0.7))
    gb = dict(size=(11, 6, 10), spacing=(0.5, 2.0, 1.0), origin=(-100.0, 20.0, 3.0),
              direction=np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float))
    model = dict(model_size=(8, 8, 8), model_spacing=(1.5, 1.5, 1.5))
    a, b = make_case(tmp_path / "A", **ga, **model), make_case(tmp_path / "B", **gb, **model)
    ca, cb = _centre(**ga), _centre(**gb)
    np.testing.assert_allclose(map_points(ca[None], a, b)[0], cb, atol=1e-9)
    np.testing.assert_allclose(subject_to_subject_transform(a, b).TransformPoint(cb.tolist()), ca, atol=1e-9)
    v = np.array([2.0, -1.5, 3.0])
    np.testing.assert_allclose(map_points((ca + ga["direction"] @ v)[None], a, b)[0],
                               cb + gb["direction"] @ v, atol=1e-9)


def test_affine_dense_parts_compose_analytically_and_are_inverse_consistent(tmp_path):
    """Subject->atlas maps whose dense parts are affine (exact under linear interpolation of the fields),
    on top of the cases' frames: Phi_A^-1(p) = M_A R_A^T (p - c_A) + t_A, Phi_A(q) = c_A + R_A M_A^-1 (q - t_A);
    same for B; different directions."""
    ma, ta = 1.05 * _rotation2(0.1), np.array([1.0, -0.5])
    mb, tb = 0.95 * _rotation2(-0.15), np.array([-0.8, 0.6])
    ra, rb = _rotation2(0.3), _rotation2(-0.5)
    ga = dict(size=(40, 40), spacing=(1.0, 1.0), origin=(-20.0, -18.0), direction=ra)
    gb = dict(size=(40, 40), spacing=(1.0, 1.0), origin=(50.0, -25.0), direction=rb)
    ca, cb = _centre(**ga), _centre(**gb)

    def inv_of(m, t):  # dense part of subject -> atlas, after the frame: x -> M x + t
        return lambda x: x @ m.T + t - x

    def fwd_of(m, t):  # dense part of atlas -> subject, before the frame: q -> M^-1 (q - t)
        mi = np.linalg.inv(m)
        return lambda q: (q - t) @ mi.T - q

    a = make_case(tmp_path / "A", inv=inv_of(ma, ta), fwd=fwd_of(ma, ta), **ga)
    b = make_case(tmp_path / "B", inv=inv_of(mb, tb), fwd=fwd_of(mb, tb), **gb)
    pts = ca + np.array([[0.0, 0.0], [4.0, -3.0], [-6.0, 5.5], [8.0, 2.0]])
    q = (pts - ca) @ ra @ ma.T + ta  # the atlas points: one atlas frame for both cases
    expected = cb + (q - tb) @ np.linalg.inv(mb).T @ rb.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all on the fields' grids
        got = map_points(pts, a, b)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    t = subject_to_subject_transform(a, b)
    np.testing.assert_allclose([t.TransformPoint(p.tolist()) for p in got], pts, atol=1e-9)
    np.testing.assert_allclose(map_points(got, b, a), pts, atol=1e-9)


def test_affine_parts_continue_exactly_outside_the_model_field_of_view(tmp_path):
    """The affine parts of the .h5 composites act everywhere; only the dense part drops out (zero
    displacement, ITK's convention) outside the atlas grid, with a warning. A NIfTI field would leave
    such a point where it is."""
    ma, ta = np.array([[0.0, -1.1], [0.9, 0.1]]), np.array([40.0, -12.0])   # atlas -> A
    mb, tb = 1.2 * _rotation2(2.5), np.array([-300.0, 95.0])               # atlas -> B
    a = make_case(tmp_path / "A", affine=(ma, ta), inv=_constant((0.5, 0.0)), fwd=_constant((-0.5, 0.0)))
    b = make_case(tmp_path / "B", affine=(mb, tb), inv=_constant((0.0, 1.0)), fwd=_constant((0.0, -1.0)))
    far = np.array([[500.0, -250.0], [-80.0, 1000.0]])   # atlas points hundreds of mm off the 20 x 16 atlas grid
    q = (far - ta) @ np.linalg.inv(ma).T
    expected = q @ mb.T + tb
    with pytest.warns(UserWarning, match="2 of 2 point.*A/inverse_transform.h5 and 2 outside"):
        np.testing.assert_allclose(map_points(far, a, b), expected, atol=1e-9)
    q_near = np.array([[2.0, -3.0]])  # on the atlas grid: both dense parts act
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = map_points(q_near @ ma.T + ta, a, b)
    np.testing.assert_allclose(got, (q_near + [0.5, -1.0]) @ mb.T + tb, atol=1e-9)
    fwd_field = sitk.DisplacementFieldTransform(read_displacement_field(b, "forward"))
    np.testing.assert_allclose(fwd_field.TransformPoint(q[0].tolist()), q[0], atol=1e-9)  # NIfTI: unmoved


def _atlas_disk(grid: Grid, radius: float):
    import torch

    inside = (grid.points(dtype=torch.float64)[0] ** 2).sum(-1) < radius ** 2
    return torch.stack([~inside, inside]).double()[None]  # (1, 2, *size) one-hot


@pytest.mark.parametrize("with_svf", [False, True])
def test_files_written_by_segment_map_points_where_the_model_transforms_do(tmp_path, with_svf):
    """Integration with atlasreg.segment.write_case_outputs: model-grid transforms Phi = T o exp(v) on
    rotated/offset native grids. Without an SVF, T a translation by -t (model coordinates, mm along the
    image axes) and the answer is analytic; with an SVF the expected points come from the transform
    objects, and the .h5 composites agree with the NIfTI fields on the fields' grids."""
    import torch

    import atlasreg.correspondence as corr
    import atlasreg.segment as seg
    from atlasreg.data.cases import Case
    from atlasreg.spatial.transforms import compose_transform

    assert (corr.FORWARD_TRANSFORM, corr.INVERSE_TRANSFORM, corr.FORWARD_FIELD, corr.INVERSE_FIELD) == \
        (seg.FORWARD_TRANSFORM, seg.INVERSE_TRANSFORM, seg.FORWARD_FIELD, seg.INVERSE_FIELD)
    model = Grid.centred((12, 12), (2.0, 2.0))
    setups = {"A": (dict(size=(22, 18), spacing=(1.5, 1.0), origin=(5.0, -3.0), direction=_rotation2(0.5)),
                    np.array([2.0, -1.0]), 0),
              "B": (dict(size=(16, 24), spacing=(1.0, 1.25), origin=(-40.0, 60.0), direction=_rotation2(-2.0)),
                    np.array([-0.5, 3.0]), 1)}
    atlas_labelmap = _atlas_disk(model, 5.0)  # inside both inputs
    folders, phis = {}, {}
    for name, (geo, t, seed) in setups.items():
        src = sitk.Image(geo["size"], sitk.sitkFloat32)
        src.SetSpacing(geo["spacing"])
        src.SetOrigin(geo["origin"])
        src.SetDirection(geo["direction"].ravel().tolist())
        case = Case(name, torch.zeros(1, 1, *model.size), None, Grid.from_sitk(src), src,
                    str(tmp_path / f"{name}.nii.gz"))
        v = smooth_svf(model.downsample(2), 0.8, seed=seed).double() if with_svf else None
        phi = compose_transform(v, torch.eye(2, dtype=torch.float64)[None],
                                -torch.as_tensor(t, dtype=torch.float64)[None], model)
        phis[name] = phi
        folders[name] = seg.write_case_outputs(tmp_path / "seg", case, [0, 1], model, None, {"refine": phi},
                                               atlas_labelmap)
    (ga, ta, _), (gb, tb, _) = setups["A"], setups["B"]
    ca, cb = _centre(**ga), _centre(**gb)
    p_a = ca + np.array([[1.0, 2.0], [-3.0, 0.5], [2.5, -4.0]])
    x = (p_a - ca) @ ga["direction"]  # model (atlas) coordinates of p_A before Phi_A^-1

    def through_model(x, source, target):  # Phi_target(Phi_source^-1(x)) with the transform objects
        atlas = phis[source].inverse().points(torch.as_tensor(x)[None, :, None])  # (1, n, 1, 2) points
        return phis[target].points(atlas)[0, :, 0].numpy()

    expected = cb + (through_model(x, "A", "B") if with_svf else x + ta - tb) @ gb["direction"].T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = map_points(p_a, folders["A"], folders["B"])
        back = map_points(got, folders["B"], folders["A"])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    x_b = (got - cb) @ gb["direction"]
    expected_back = ca + (through_model(x_b, "B", "A") if with_svf else x_b + tb - ta) @ ga["direction"].T
    np.testing.assert_allclose(back, expected_back, atol=1e-6)
    if not with_svf:
        np.testing.assert_allclose(back, p_a, atol=1e-9)

    # The .h5 composites and the NIfTI fields are the same maps at the fields' voxel centres.
    a = folders["A"]
    inv_nii, fwd_nii = read_displacement_field(a, "inverse"), read_displacement_field(a, "forward")
    for which, field in (("inverse", inv_nii), ("forward", fwd_nii)):
        grid = Grid.from_sitk(field)
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij")[::-1], -1).reshape(-1, 2)
        pts = grid.index_to_world(idx)
        h5 = read_case_transform(a, which)
        by_h5 = np.array([h5.TransformPoint(p.tolist()) for p in pts])
        nii = sitk.DisplacementFieldTransform(sitk.Image(field))
        by_nii = np.array([nii.TransformPoint(p.tolist()) for p in pts])
        if which == "inverse" and with_svf:  # A's input grid reaches past the model grid, where ITK
            keep = np.all(np.abs(by_h5) < np.asarray(model.half_extent) - 1.0, axis=1)  # drops the dense part
            assert keep.sum() > 200
            by_h5, by_nii = by_h5[keep], by_nii[keep]
        np.testing.assert_allclose(by_h5, by_nii, atol=1e-4)  # NIfTI stores directions in float32

    # A's refined labelmap (the atlas warped onto A) carried to B is B's refined labelmap.
    out = map_labelmap(a / "refine_labelmap.nii.gz", a, folders["B"], tmp_path / "a_on_b.nii.gz")
    on_b, ref_b = _read(out), _read(folders["B"] / "refine_labelmap.nii.gz")
    ref_img = sitk.ReadImage(str(folders["B"] / "refine_labelmap.nii.gz"))
    edge = sitk.GetArrayFromImage(sitk.BinaryDilate(ref_img, [1, 1]) != sitk.BinaryErode(ref_img, [1, 1]))
    assert ref_b.sum() > 50 and not np.any((on_b != ref_b) & (edge == 0))  # differences only on the edge
    dice = 2 * np.sum((on_b == 1) & (ref_b == 1)) / (np.sum(on_b == 1) + np.sum(ref_b == 1))
    assert dice > 0.9


# ---------------------------------------------------------------------------------- CSV and the CLI


def _parser():
    p = argparse.ArgumentParser(prog="atlasreg")
    add_correspond_parser(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_points_keep_extra_columns(tmp_path, capsys):
    a, b = _translated_cases(tmp_path)
    src = tmp_path / "pts.csv"
    src.write_text("name,x,y,note\napex,6,5,first\nbase,8.5,7.25,\"a, b\"\n", encoding="utf-8")
    out = tmp_path / "out" / "mapped.csv"
    assert _run(["correspond", "--from", str(a), "--to", str(b), "--points", str(src), "--out", str(out)]) == 0
    assert "mapped" in capsys.readouterr().out
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["apex", "base"] and rows[1]["note"] == "a, b"
    np.testing.assert_allclose([[float(r["x"]), float(r["y"])] for r in rows], [[9.0, 7.0], [11.5, 9.25]],
                               atol=1e-6)
    assert out.read_text().splitlines()[0] == "name,x,y,note"


def test_cli_labelmap_and_3d_points(tmp_path):
    geo = dict(size=(10, 9, 8), spacing=(1.0, 1.0, 1.0), model_size=(12, 11, 12))
    a = make_case(tmp_path / "A", inv=_constant((1.0, 0.0, 0.0)), fwd=_constant((-1.0, 0.0, 0.0)), **geo)
    b = make_case(tmp_path / "B", inv=_constant((0.0, 0.0, 2.0)), fwd=_constant((0.0, 0.0, -2.0)), **geo)
    arr = np.zeros((8, 9, 10), np.int16)
    arr[2:5, 3:6, 2:6] = 3
    lab = _labelmap_like(a, arr, tmp_path / "lab.nii.gz")
    out = tmp_path / "on_b.nii.gz"
    assert _run(["correspond", "--from", str(a), "--to", str(b), "--labelmap", str(lab), "--out", str(out),
                 "--labels", "0,3,5"]) == 0
    expected = np.zeros_like(arr)
    expected[:-2, :, 1:] = arr[2:, :, :-1]  # +1 voxel in x, -2 in z
    np.testing.assert_array_equal(_read(out), expected)
    pts = tmp_path / "p.csv"
    pts.write_text("x,y,z\n4,4,4\n", encoding="utf-8")
    _run(["correspond", "--from", str(a), "--to", str(b), "--points", str(pts), "--out", str(tmp_path / "o.csv")])
    _, _, got = read_points_csv(tmp_path / "o.csv")
    np.testing.assert_allclose(got, [[5.0, 4.0, 2.0]], atol=1e-6)


def test_points_outside_the_fields_warn(tmp_path):
    a = make_case(tmp_path / "A", inv=_constant((3.0, 0.0)), fwd=_constant((-3.0, 0.0)))
    b = make_case(tmp_path / "B")
    with pytest.warns(UserWarning, match="1 of 2 point.* and 1 outside"):
        out = map_points([[5.0, 5.0], [100.0, 5.0]], a, b)
    # outside the atlas grid the dense parts (A's +3 mm) drop out; the frames still act
    np.testing.assert_allclose(out, [[8.0, 5.0], [100.0, 5.0]], atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        map_points([[5.0, 5.0]], a, b)


# ----------------------------------------------------------------------------------------- errors


def test_missing_case_folder_and_fields(tmp_path):
    a = make_case(tmp_path / "A")
    with pytest.raises(AtlasregError, match="case folder not found") as e:
        map_points([[1.0, 1.0]], a, tmp_path / "nope")
    assert e.value.path == str(tmp_path / "nope")
    only_inv = make_case(tmp_path / "B", files=("inverse", "inverse_field"))
    with pytest.raises(AtlasregError, match="forward transform not found") as e:
        map_points([[1.0, 1.0]], a, only_inv)
    assert e.value.path == str(only_inv / "forward_transform.h5")
    with pytest.raises(AtlasregError, match="forward transform not found"):
        subject_to_subject_transform(only_inv, a)
    with pytest.raises(AtlasregError, match="forward displacement field not found") as e:
        read_displacement_field(only_inv, "forward")
    assert e.value.path == str(only_inv / "forward_displacement.nii.gz")
    # a folder of the old layout (NIfTI fields only) is refused, not misread
    old = make_case(tmp_path / "old", files=("forward_field", "inverse_field"))
    with pytest.raises(AtlasregError, match="inverse transform not found.*segmented again") as e:
        map_points([[1.0, 1.0]], old, a)
    assert e.value.path == str(old / "inverse_transform.h5")
    # map_labelmap takes B's grid from B's inverse field
    no_grid = make_case(tmp_path / "C", files=("inverse", "forward"))
    lab = _labelmap_like(a, _blob(), tmp_path / "lab.png")
    with pytest.raises(AtlasregError, match="inverse displacement field not found") as e:
        map_labelmap(lab, a, no_grid, tmp_path / "o.png")
    assert e.value.path == str(no_grid / "inverse_displacement.nii.gz") and not (tmp_path / "o.png").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(AtlasregError, match="is not a folder"):
        read_displacement_field(tmp_path / "file", "inverse")
    with pytest.raises(AtlasregError, match="is not a folder"):
        read_case_transform(tmp_path / "file", "inverse")


def test_bad_transforms(tmp_path):
    a = make_case(tmp_path / "A")
    tx = read_case_transform(a, "forward")  # the frame after a (zero) dense part
    assert [tx.GetNthTransform(i).GetName() for i in range(tx.GetNumberOfTransforms())] == \
        ["AffineTransform", "DisplacementFieldTransform"]
    with pytest.raises(ValueError, match="'forward' or 'inverse'"):
        read_case_transform(a, "sideways")
    bad = make_case(tmp_path / "B")
    (bad / "inverse_transform.h5").write_bytes(b"not a transform")
    with pytest.raises(AtlasregError, match="cannot read transform: not an ITK transform file") as e:
        map_points([[1.0, 1.0]], bad, a)
    assert e.value.path == str(bad / "inverse_transform.h5")
    sitk.WriteTransform(sitk.CompositeTransform(2), str(bad / "inverse_transform.h5"))
    with pytest.raises(AtlasregError, match="empty composite transform"):
        read_case_transform(bad, "inverse")
    nan_affine = sitk.AffineTransform(2)
    nan_affine.SetTranslation((float("nan"), 0.0))
    sitk.WriteTransform(nan_affine, str(bad / "inverse_transform.h5"))
    with pytest.raises(AtlasregError, match="NaN or infinite values in its AffineTransform"):
        read_case_transform(bad, "inverse")
    field = np.zeros((4, 5, 2))
    field[1, 1, 1] = np.inf
    dense = sitk.DisplacementFieldTransform(sitk.GetImageFromArray(field, isVector=True))
    sitk.WriteTransform(_composite(sitk.AffineTransform(2), dense), str(bad / "forward_transform.h5"))
    with pytest.raises(AtlasregError, match="NaN or infinite values in its DisplacementFieldTransform") as e:
        subject_to_subject_transform(bad, a)
    assert e.value.path == str(bad / "forward_transform.h5")
    # B's input grid (for labelmaps) must be readable and of the cases' dimension
    lab = _labelmap_like(a, _blob(), tmp_path / "lab.png")
    c = make_case(tmp_path / "C")
    (c / "inverse_displacement.nii.gz").write_bytes(b"not an image")
    with pytest.raises(AtlasregError, match="cannot read displacement field"):
        map_labelmap(lab, a, c, tmp_path / "o.png")
    sitk.WriteImage(sitk.Image((4, 4, 4), sitk.sitkVectorFloat64, 3), str(c / "inverse_displacement.nii.gz"))
    with pytest.raises(AtlasregError, match="displacement field is 3D but the case's transforms are 2D") as e:
        map_labelmap(lab, a, c, tmp_path / "o.png")
    assert e.value.path == str(c / "inverse_displacement.nii.gz") and not (tmp_path / "o.png").exists()


def test_bad_fields(tmp_path):
    case = tmp_path / "C"
    case.mkdir()
    scalar = sitk.Image((5, 5), sitk.sitkFloat32)
    sitk.WriteImage(scalar, str(case / "inverse_displacement.nii.gz"))
    with pytest.raises(AtlasregError, match="1 component") as e:
        read_displacement_field(case, "inverse")
    assert e.value.path.endswith("inverse_displacement.nii.gz")
    (case / "forward_displacement.nii.gz").write_bytes(b"not an image")
    with pytest.raises(AtlasregError, match="cannot read displacement field"):
        read_displacement_field(case, "forward")
    nan = np.zeros((5, 5, 2))
    nan[2, 2, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan, isVector=True), str(case / "inverse_displacement.nii.gz"))
    with pytest.raises(AtlasregError, match="NaN"):
        read_displacement_field(case, "inverse")


def test_dimension_mismatch(tmp_path):
    a = make_case(tmp_path / "A")
    b = make_case(tmp_path / "B", size=(6, 5, 4), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(AtlasregError, match="3D but .* is 2D") as e:
        map_points([[1.0, 1.0]], a, b)
    assert e.value.path == str(b / "forward_transform.h5")
    with pytest.raises(AtlasregError, match="3D but .* is 2D") as e:
        subject_to_subject_transform(a, b)
    assert e.value.path == str(b / "inverse_transform.h5")
    with pytest.raises(AtlasregError, match="3 coordinates but the cases are 2D"):
        map_points([[1.0, 1.0, 1.0]], a, make_case(tmp_path / "A2"))
    lab3 = sitk.Image((6, 5, 4), sitk.sitkUInt8)
    sitk.WriteImage(lab3, str(tmp_path / "lab3.nii.gz"))
    with pytest.raises(AtlasregError, match="labelmap is 3D but the cases are 2D") as e:
        map_labelmap(tmp_path / "lab3.nii.gz", a, tmp_path / "A2", tmp_path / "o.nii.gz")
    assert e.value.path == str(tmp_path / "lab3.nii.gz")
    b3 = make_case(tmp_path / "B3", size=(6, 5, 4), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(AtlasregError, match="PNG can only hold 2D"):
        map_labelmap(tmp_path / "lab3.nii.gz", b, b3, tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.nii.gz").exists()


def test_bad_labelmaps(tmp_path):
    a, b = make_case(tmp_path / "A"), make_case(tmp_path / "B")
    with pytest.raises(AtlasregError, match="file not found"):
        map_labelmap(tmp_path / "missing.png", a, b, tmp_path / "o.png")
    lab = _labelmap_like(a, _blob(), tmp_path / "lab.png")
    with pytest.raises(AtlasregError, match=r"label values \[7\] are not in the declared label list") as e:
        map_labelmap(lab, a, b, tmp_path / "o.png", labels=[0, 1, 2])
    assert e.value.path == str(lab)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("name,a,b\np,1,2\n", "needs columns x,y"),
    ("x,y\n1,abc\n", "line 2: y = 'abc' is not a number"),
    ("x,y\n1,2\n\n3,inf\n", "line 4: y = 'inf' is not finite"),
    ("x,y,z\n1,2,3\n", "has a z column but the cases are 2D"),
    ("x,y\n1,2,3\n", "line 2: 3 fields, the header has 2"),
    ("x,y,x\n1,2,3\n", "more than one 'x' column"),
    ("x,y\n1,\n", "line 2: y = '' is not a number"),
])
def test_bad_csv(tmp_path, text, message):
    a, b = make_case(tmp_path / "A"), make_case(tmp_path / "B")
    src = tmp_path / "pts.csv"
    src.write_text(text, encoding="utf-8")
    with pytest.raises(AtlasregError, match=message) as e:
        map_points_csv(src, a, b, tmp_path / "out.csv")
    assert e.value.path == str(src)
    assert not (tmp_path / "out.csv").exists()


def test_csv_3d_needs_z_and_missing_file(tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("x,y\n1,2\n", encoding="utf-8")
    with pytest.raises(AtlasregError, match="has no z column but the cases are 3D"):
        read_points_csv(src, ndim=3)
    with pytest.raises(AtlasregError, match="file not found"):
        read_points_csv(tmp_path / "none.csv")
    header, rows, pts = read_points_csv(src)
    assert header == ["x", "y"] and rows == [["1", "2"]] and pts.shape == (1, 2)


def test_cli_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):  # one of --labelmap / --points is required
        _parser().parse_args(["correspond", "--from", "a", "--to", "b", "--out", "o"])
    with pytest.raises(SystemExit):  # not both
        _parser().parse_args(["correspond", "--from", "a", "--to", "b", "--labelmap", "l", "--points", "p",
                              "--out", "o"])
    capsys.readouterr()
    with pytest.raises(AtlasregError, match="case folder not found"):
        _run(["correspond", "--from", str(tmp_path / "a"), "--to", str(tmp_path / "b"), "--points",
              str(tmp_path / "p.csv"), "--out", str(tmp_path / "o.csv")])
    a, b = make_case(tmp_path / "A"), make_case(tmp_path / "B")
    lab = _labelmap_like(a, _blob(), tmp_path / "lab.png")
    with pytest.raises(AtlasregError, match="--labels expects"):
        _run(["correspond", "--from", str(a), "--to", str(b), "--labelmap", str(lab), "--labels", "0,x",
              "--out", str(tmp_path / "o.png")])
