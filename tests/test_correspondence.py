"""Tests for atlasreg.correspondence: subject-to-subject mapping through atlas space (Eqs. 22-23) with
known answers on hand-built case folders (displacement fields written with SimpleITK)."""

from __future__ import annotations

import argparse
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from atlasreg.correspondence import (add_correspond_parser, frame_change_transform, map_labelmap, map_points,
                                     map_points_csv, read_displacement_field, read_points_csv,
                                     subject_to_subject_transform)
from atlasreg.errors import AtlasregError


# ------------------------------------------------------------------------------------------ helpers


def _rotation2(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _rotation3(axis, theta):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * k @ k


def _world_points(size, spacing, origin, direction):
    """World coordinates (*array shape, D) of the voxel centres of a grid (size in ITK order)."""
    d = len(size)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")[::-1], -1)  # (z,y,x,D)
    return np.asarray(origin) + (idx * np.asarray(spacing)) @ np.asarray(direction).reshape(d, d).T


def _centre(size, spacing, origin, direction):
    d = len(size)
    return np.asarray(origin) + np.asarray(direction).reshape(d, d) @ (
        np.asarray(spacing) * (np.asarray(size) - 1) / 2)


def _field(size, spacing, origin, direction, disp_fn):
    pts = _world_points(size, spacing, origin, direction)
    disp = disp_fn(pts.reshape(-1, len(size))).reshape(pts.shape)
    img = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


def _zero(p):
    return np.zeros_like(p)


def _constant(v):
    return lambda p: np.broadcast_to(np.asarray(v, float), p.shape).copy()


def make_case(folder: Path, size=(20, 16), spacing=(1.0, 1.0), origin=None, direction=None,
              inv=_zero, fwd=_zero, files=("forward", "inverse")) -> Path:
    """A case folder as `atlasreg segment` writes it: the two displacement fields on the input grid.
    inv / fwd: world points (n, D) -> world displacements (n, D)."""
    d = len(size)
    origin = tuple(float(o) for o in (origin if origin is not None else (0.0,) * d))
    direction = np.eye(d) if direction is None else np.asarray(direction, float)
    folder.mkdir(parents=True, exist_ok=True)
    if "inverse" in files:
        sitk.WriteImage(_field(size, spacing, origin, direction, inv), str(folder / "inverse_displacement.nii.gz"))
    if "forward" in files:
        sitk.WriteImage(_field(size, spacing, origin, direction, fwd), str(folder / "forward_displacement.nii.gz"))
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


def test_constant_translations_offset_points_and_pull_back(tmp_path):
    # A: subject -> atlas +3 mm in x (forward: -3); B: subject -> atlas -2 mm in y (forward: +2).
    a = make_case(tmp_path / "A", inv=_constant((3.0, 0.0)), fwd=_constant((-3.0, 0.0)))
    b = make_case(tmp_path / "B", inv=_constant((0.0, -2.0)), fwd=_constant((0.0, 2.0)))
    pts = np.array([[6.0, 5.0], [8.25, 7.5], [10.0, 9.0]])
    # p_B = Phi_B(Phi_A^-1(p_A)) = p_A + (3, 0) + (0, 2)
    np.testing.assert_allclose(map_points(pts, a, b), pts + [3.0, 2.0], atol=1e-9)
    # the pull-back goes the other way: T(p_B) = p_B - (3, 2)
    t = subject_to_subject_transform(a, b)
    np.testing.assert_allclose(t.TransformPoint((9.0, 7.0)), (6.0, 5.0), atol=1e-9)
    # and from B to A: p_A = p_B - (3, 2)
    np.testing.assert_allclose(map_points(pts + [3.0, 2.0], b, a), pts, atol=1e-9)


def test_translated_labelmap_moves_by_the_offset_and_round_trips(tmp_path):
    a = make_case(tmp_path / "A", inv=_constant((3.0, 0.0)), fwd=_constant((-3.0, 0.0)))
    b = make_case(tmp_path / "B", inv=_constant((0.0, -2.0)), fwd=_constant((0.0, 2.0)))
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
    np.testing.assert_allclose(map_points(ca[None], a, b)[0], cb, atol=1e-5)
    np.testing.assert_allclose(subject_to_subject_transform(a, b).TransformPoint(cb.tolist()), ca, atol=1e-5)
    # any atlas offset v from the centre keeps its grid-axis coordinates: c_A + R_A v -> c_B + R_B v
    v = np.array([3.0, -2.5])
    np.testing.assert_allclose(map_points((ca + ga["direction"] @ v)[None], a, b)[0],
                               cb + gb["direction"] @ v, atol=1e-5)
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
    a, b = make_case(tmp_path / "A", **ga), make_case(tmp_path / "B", **gb)
    ca, cb = _centre(**ga), _centre(**gb)
    np.testing.assert_allclose(map_points(ca[None], a, b)[0], cb, atol=1e-4)
    np.testing.assert_allclose(subject_to_subject_transform(a, b).TransformPoint(cb.tolist()), ca, atol=1e-4)


def test_frame_change_transform_formula():
    from atlasreg.spatial.grid import Grid

    ga = Grid((16, 20), (1.0, 1.0), (10.0, -7.0), tuple(_rotation2(0.4).ravel()))
    gb = Grid((10, 12), (2.0, 0.5), (-3.0, 1.0), tuple(_rotation2(2.0).ravel()))
    t = frame_change_transform(ga, gb)
    q = np.array([4.0, -1.5])
    expected = gb.centre + gb.direction_matrix @ ga.direction_matrix.T @ (q - ga.centre)
    np.testing.assert_allclose(t.TransformPoint(q.tolist()), expected, atol=1e-9)


def test_affine_fields_compose_analytically_and_are_inverse_consistent(tmp_path):
    """Subject->atlas maps that are affine (exact under linear interpolation of the fields):
    Phi_A^-1(p) = M_A p + t_A, Phi_A(q) = M_A^-1 (q - t_A); same for B; different directions."""
    ma, ta = 1.05 * _rotation2(0.1), np.array([1.0, -0.5])
    mb, tb = 0.95 * _rotation2(-0.15), np.array([-0.8, 0.6])
    ra, rb = _rotation2(0.3), _rotation2(-0.5)
    ga = dict(size=(40, 40), spacing=(1.0, 1.0), origin=(-20.0, -18.0), direction=ra)
    gb = dict(size=(40, 40), spacing=(1.0, 1.0), origin=(50.0, -25.0), direction=rb)
    ca, cb = _centre(**ga), _centre(**gb)

    def inv_of(m, t, c):  # subject -> atlas, affine about the grid centre
        return lambda p: (p - c) @ m.T + c + t - p

    def fwd_of(m, t, c):
        mi = np.linalg.inv(m)
        return lambda q: (q - c - t) @ mi.T + c - q

    a = make_case(tmp_path / "A", inv=inv_of(ma, ta, ca), fwd=fwd_of(ma, ta, ca), **ga)
    b = make_case(tmp_path / "B", inv=inv_of(mb, tb, cb), fwd=fwd_of(mb, tb, cb), **gb)
    pts = ca + np.array([[0.0, 0.0], [4.0, -3.0], [-6.0, 5.5], [8.0, 2.0]])
    q_a = (pts - ca) @ ma.T + ca + ta
    q_b = cb + (q_a - ca) @ (rb @ ra.T).T
    expected = (q_b - cb - tb) @ np.linalg.inv(mb).T + cb
    got = map_points(pts, a, b)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # NIfTI stores directions in float32
    t = subject_to_subject_transform(a, b)
    np.testing.assert_allclose([t.TransformPoint(p.tolist()) for p in got], pts, atol=1e-4)
    np.testing.assert_allclose(map_points(got, b, a), pts, atol=1e-4)


def test_fields_written_by_segment_follow_the_assumed_frames(tmp_path):
    """Integration with atlasreg.segment.write_case_outputs: model-grid transforms that are constant
    translations t (model coordinates, mm along the image axes) on rotated/offset native grids."""
    import torch

    from atlasreg.data.cases import Case
    from atlasreg.segment import write_case_outputs
    from atlasreg.spatial.grid import Grid, identity_points

    model_size, model_spacing = (12, 12), (2.0, 2.0)
    setups = {"A": (dict(size=(22, 18), spacing=(1.5, 1.0), origin=(5.0, -3.0), direction=_rotation2(0.5)),
                    np.array([2.0, -1.0])),
              "B": (dict(size=(16, 24), spacing=(1.0, 1.25), origin=(-40.0, 60.0), direction=_rotation2(-2.0)),
                    np.array([-1.5, 3.0]))}
    folders = {}
    for name, (geo, t) in setups.items():
        src = sitk.Image(geo["size"], sitk.sitkFloat32)
        src.SetSpacing(geo["spacing"])
        src.SetOrigin(geo["origin"])
        src.SetDirection(geo["direction"].ravel().tolist())
        case = Case(name, torch.zeros(1, 1, *model_size), None, Grid.from_sitk(src), src,
                    str(tmp_path / f"{name}.nii.gz"))
        ident = identity_points(model_size, model_spacing, dtype=torch.float64)[0]
        shift = torch.as_tensor(t, dtype=torch.float64)
        folders[name] = write_case_outputs(tmp_path / "seg", case, [0, 1], model_spacing, {},
                                           fwd_points=ident - shift, inv_points=ident + shift)
    (ga, ta), (gb, tb) = setups["A"], setups["B"]
    ca, cb = _centre(**ga), _centre(**gb)
    p_a = ca + np.array([1.0, 2.0])
    x = ga["direction"].T @ (p_a - ca) + ta  # atlas model coordinates
    expected = cb + gb["direction"] @ (x - tb)
    np.testing.assert_allclose(map_points(p_a[None], folders["A"], folders["B"])[0], expected, atol=1e-4)


# ---------------------------------------------------------------------------------- CSV and the CLI


def _parser():
    p = argparse.ArgumentParser(prog="atlasreg")
    add_correspond_parser(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_points_keep_extra_columns(tmp_path, capsys):
    a = make_case(tmp_path / "A", inv=_constant((3.0, 0.0)), fwd=_constant((-3.0, 0.0)))
    b = make_case(tmp_path / "B", inv=_constant((0.0, -2.0)), fwd=_constant((0.0, 2.0)))
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
    geo = dict(size=(10, 9, 8), spacing=(1.0, 1.0, 1.0))
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
    with pytest.warns(UserWarning, match="1 of 2 point"):
        out = map_points([[5.0, 5.0], [100.0, 5.0]], a, b)
    np.testing.assert_allclose(out, [[8.0, 5.0], [100.0, 5.0]], atol=1e-9)  # zero displacement outside
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        map_points([[5.0, 5.0]], a, b)


# ----------------------------------------------------------------------------------------- errors


def test_missing_case_folder_and_fields(tmp_path):
    a = make_case(tmp_path / "A")
    with pytest.raises(AtlasregError, match="case folder not found") as e:
        map_points([[1.0, 1.0]], a, tmp_path / "nope")
    assert e.value.path == str(tmp_path / "nope")
    only_inv = make_case(tmp_path / "B", files=("inverse",))
    with pytest.raises(AtlasregError, match="forward displacement field not found") as e:
        map_points([[1.0, 1.0]], a, only_inv)
    assert e.value.path == str(only_inv / "forward_displacement.nii.gz")
    with pytest.raises(AtlasregError, match="forward displacement field not found"):
        subject_to_subject_transform(only_inv, a)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AtlasregError, match="is not a folder"):
        read_displacement_field(tmp_path / "file", "inverse")


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
    assert e.value.path == str(b / "forward_displacement.nii.gz")
    with pytest.raises(AtlasregError, match="3D but .* is 2D"):
        subject_to_subject_transform(a, b)
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
