"""Export (atlasreg.export) of 3D cases: every output of ``atlasreg segment`` lines up with the original
scan. A small synthetic volume (nested ellipsoids, anisotropic spacing) is segmented by a tiny 3D
Atlas-ISTN trained for a few steps, for three headers and preprocessings:

* 'oblique': spacing (0.9, 1.3, 3.5) mm, an oblique direction (20 degrees about (1, 2, 3)) with a
  flipped axis and a non-zero origin; model axes along the file's ('native'), grid on the image centre;
* 'ras_foreground': the same file, reoriented to RAS, the model grid centred on the foreground;
* 'identity_header': a NIfTI with an identity affine and ``data.spacing`` (ACDC: orientation search
  in-plane, centre on the labels, so a first ITN pass places the grid at test time).

Each output is read back with SimpleITK and nibabel; the written ITK transform is applied by SimpleITK
to the saved atlas and compared with atlasreg's own outputs and point maps."""

import types

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from fields import in_atlas_fov, inside_fov
from volumes import LABELS, ellipsoids, write_identity_header_scan, write_scan

from atlasreg.atlas import save_atlas
from atlasreg.config import load_config
from atlasreg.data.cases import Preprocessing, load_case
from atlasreg.export import native_outputs
from atlasreg.models.registry import build_method
from atlasreg.predict import predict_cases
from atlasreg.segment import segment
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import AffineSVFTransform, AffineTransform

SIZE, SPACING = [8, 16, 16], [1.6, 1.6, 4.0]  # model grid: array order (z, y, x); ITK order (x, y, z), mm
ACDC_SPACING = (1.4, 1.6, 6.0)  # the declared spacing of the identity-header scan (ITK order, mm)
VARIANTS = {
    "oblique": ({}, None),
    "ras_foreground": ({"orientation": "RAS", "centre": "foreground", "foreground_threshold": 130.0}, None),
    "identity_header": ({"orientation_search": "in_plane", "centre": "labels"}, list(ACDC_SPACING)),
}
LABELMAPS = ("itn", "itn_lcc", "atlas", "onepass", "refine")


def config(variant):
    pre, spacing = VARIANTS[variant]
    return load_config(None, {
        "data": {"labels": LABELS, "spacing": spacing, "preprocessing": pre},
        "model": {"ndim": 3, "size": SIZE, "spacing": SPACING, "itn_channels": [4, 8, 8, 8],
                  "stn_channels": [4, 4, 8]},
        "training": {"lr": 0.01, "fade_in": None},
        "refinement": {"iterations": 3, "cases_at_once": 1}})


def write_scans(folder, variant):
    """The subject and the atlas's source (another scan: shifted, larger ellipsoids), as files."""
    if variant == "identity_header":
        subject = ellipsoids(spacing=ACDC_SPACING, size_xyz=(16, 18, 6))
        atlas = ellipsoids(spacing=ACDC_SPACING, size_xyz=(16, 18, 6), shift_mm=(-2.0, 2.0, -3.0),
                           radii_mm=(10.5, 11.0, 15.0), seed=1)
        return (write_identity_header_scan(folder, "case", *subject),
                write_identity_header_scan(folder, "atlas_source", *atlas))
    subject = ellipsoids()
    atlas = ellipsoids(shift_mm=(-2.0, 2.0, -3.0), radii_mm=(10.5, 11.0, 15.0), seed=1)
    return write_scan(folder, "case", *subject), write_scan(folder, "atlas_source", *atlas)


def tiny_trained_module(cfg, atlas_files, subject_files, steps=6):
    """A tiny 3D Atlas-ISTN: its atlas is another scan on the model grid, then `steps` Adam steps of
    the training loss on the subject, so that Phi has a real affine part and an SVF of a few mm."""
    torch.manual_seed(0)
    module = build_method(cfg)
    prep = Preprocessing.from_config(cfg)
    atlas = load_case(*atlas_files, prep)
    module.atlas_labelmap.copy_(atlas.labelmap)
    module.atlas_image.copy_(atlas.image)
    module.atlas_ready.fill_(True)
    case = load_case(*subject_files, prep)
    opt = torch.optim.Adam(module.net.parameters(), float(cfg["training"]["lr"]))
    module.train()
    for step in range(steps):
        opt.zero_grad()
        module.training_step((case.image, case.labelmap, torch.zeros(1), case.mask), step).backward()
        opt.step()
    return module.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory):
    """Segment the subject file with `atlasreg.segment.segment`; also keep the same prediction in memory
    (its world transforms) and the model's atlas written by `save_atlas`."""
    torch.set_num_threads(1)
    variant = request.param
    tmp = tmp_path_factory.mktemp(variant)
    subject_files, atlas_files = write_scans(tmp, variant)
    cfg = config(variant)
    module = tiny_trained_module(cfg, atlas_files, subject_files)
    (folder,) = segment(module, [subject_files[0]], tmp / "seg", progress=False)
    prep = Preprocessing.from_config(cfg)
    (pred,) = predict_cases(module, [load_case(subject_files[0], None, prep, name="case")])
    outputs = native_outputs(pred.case, list(LABELS), module.net.grid, pred.itn, pred.transforms,
                             module.atlas_labelmap, module.atlas_image)
    atlas = save_atlas(module.atlas_labelmap, module.atlas_image, list(LABELS), module.net.grid, tmp / "atlas")
    return types.SimpleNamespace(variant=variant, image=subject_files[0], label=subject_files[1], folder=folder,
                                 module=module, prep=prep, pred=pred, outputs=outputs, atlas=atlas)


def same_header(a: sitk.Image, b: sitk.Image) -> bool:
    """The same size, spacing, origin and direction up to the NIfTI header's float32 precision (measured
    against the input: spacing and origin identical, the oblique direction within 5e-8, from its
    quaternion written again)."""
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-7, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-7, atol=1e-7)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-7))


def test_every_output_has_the_input_geometry(run):
    """Labelmaps, the deformed atlas image and the inverse displacement: the input's size, spacing,
    origin and direction (SimpleITK) and the input's NIfTI affine (nibabel); the forward displacement:
    the saved atlas's grid."""
    source = sitk.ReadImage(str(run.image))
    source_nib = nib.load(str(run.image))
    on_input = [f"{name}_labelmap.nii.gz" for name in LABELMAPS] + ["deformed_atlas_image.nii.gz",
                                                                    "inverse_displacement.nii.gz"]
    assert {p.name for p in run.folder.iterdir()} >= set(on_input) | {"forward_displacement.nii.gz"}
    for name in on_input:
        path = run.folder / name
        img = sitk.ReadImage(str(path))
        assert same_header(img, source), name
        back = nib.load(str(path))
        assert back.shape[:3] == source_nib.shape, name
        np.testing.assert_allclose(back.affine, source_nib.affine, atol=1e-5, err_msg=name)
        if name.endswith("_labelmap.nii.gz"):
            assert set(np.unique(sitk.GetArrayFromImage(img))) <= set(LABELS), name
    field = sitk.ReadImage(str(run.folder / "inverse_displacement.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    if run.variant == "identity_header":  # the outputs keep the unit-spacing header of the file
        assert source.GetSpacing() == (1.0, 1.0, 1.0) and np.allclose(source_nib.affine, np.eye(4))

    forward = sitk.ReadImage(str(run.folder / "forward_displacement.nii.gz"))
    atlas = sitk.ReadImage(str(run.atlas["atlas_image.nii.gz"]))
    model = Grid.centred(SIZE, SPACING)
    assert same_header(forward, atlas) and same_header(forward, model.reference_image())
    assert forward.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(nib.load(str(run.folder / "forward_displacement.nii.gz")).affine,
                               nib.load(str(run.atlas["atlas_image.nii.gz"])).affine, atol=1e-5)


def test_written_outputs_are_the_in_memory_prediction(run):
    """segment() writes what predict_cases + native_outputs compute (the round trip below compares
    SimpleITK with these in-memory transforms)."""
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(run.folder / "deformed_atlas_image.nii.gz")))
    ours = sitk.GetArrayFromImage(run.outputs["deformed_atlas_image"])
    np.testing.assert_allclose(written, ours, atol=1e-5)
    for name in LABELMAPS:
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(run.folder / f"{name}_labelmap.nii.gz")))
        assert np.array_equal(written, sitk.GetArrayFromImage(run.outputs["labelmaps"][name])), name


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_perfect_prediction_gives_back_the_input_labelmap(variant, tmp_path):
    """The case's own labelmap on its model grid given as the ITN output and as the atlas (with an
    identity Phi) comes back onto the input's grid where it was: any flip, axis swap, wrong spacing or
    centre between the placement and the export would move it. Measured Dice of the outer / middle /
    inner structures (at least, over the variants): 0.991 / 0.939 / 0.885 (the inner structure is 2-4
    model voxels across)."""
    cfg = config(variant)
    prep = Preprocessing.from_config(cfg)
    (image, label), _ = write_scans(tmp_path, variant)
    case = load_case(image, label, prep)
    model = prep.model_grid
    identity = AffineSVFTransform((AffineTransform.identity(3),), model)
    out = native_outputs(case, list(LABELS), model, case.labelmap[0], {"onepass": identity}, case.labelmap,
                         case.image)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    for name in ("itn", "atlas", "onepass"):
        got = sitk.GetArrayFromImage(out["labelmaps"][name])
        scores = [dice(got >= v, truth >= v) for v in (1, 2, 3)]  # nested: structure v and those inside it
        assert min(scores[:2]) > 0.93 and scores[2] > 0.85, (name, scores)


def test_simpleitk_applies_the_written_inverse_transform_as_atlasreg_does(run):
    """inverse_transform.h5 read by SimpleITK: its point map at the input's voxel centres equals
    atlasreg's to_atlas within 0.05 voxel of the input grid (measured: about 1e-5 voxel, float32), and
    sitk.Resample of the saved atlas image and labelmap onto the input grid gives the deformed atlas
    image and the refined labelmap, inside the field of view (the model grid, where ITK's and
    atlasreg's fields agree). forward_transform.h5 likewise maps the atlas's voxel centres as to_subject
    does. For 'identity_header' the transforms hold the scaling between file units and declared
    millimetres."""
    source = sitk.ReadImage(str(run.image))
    native = Grid.from_sitk(source)
    model = run.module.net.grid
    to_atlas = run.outputs["to_atlas"]
    tx = sitk.ReadTransform(str(run.folder / "inverse_transform.h5"))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in native.size], indexing="ij"), -1)[..., ::-1]
    world = native.index_to_world(index)  # (*size, 3) world points of the input voxels, file header
    theirs = np.array([tx.TransformPoint(tuple(p)) for p in world.reshape(-1, 3)]).reshape(world.shape)
    ours = to_atlas.points(torch.as_tensor(world, dtype=torch.float32)[None])[0].double().numpy()
    inside = inside_fov(to_atlas, native, model).numpy()
    assert inside.mean() > 0.2  # a real part of the scan
    voxel = min(run.pred.case.physical.spacing)  # mm of the input grid (the declared spacing for ACDC)
    err = np.linalg.norm(theirs - ours, axis=-1)[inside] / voxel
    print(f"{run.variant}: SimpleITK vs atlasreg point maps: max {err.max():.2e} voxel ({voxel} mm) over "
          f"{inside.sum()} voxels")
    assert err.max() < 0.05
    # forward_transform.h5 at the atlas's voxel centres (one voxel in from its faces) against to_subject.
    fwd = sitk.ReadTransform(str(run.folder / "forward_transform.h5"))
    atlas_pts = model.points(dtype=torch.float64)[0]
    theirs_fwd = np.array([fwd.TransformPoint(tuple(p)) for p in atlas_pts.reshape(-1, 3).tolist()])
    ours_fwd = run.outputs["to_subject"].points(atlas_pts.float()[None])[0].double().reshape(-1, 3).numpy()
    inner = in_atlas_fov(atlas_pts, model).reshape(-1).numpy()
    to_mm = run.pred.case.file_to_physical()  # file units -> physical mm where a spacing was declared
    diff = torch.as_tensor(theirs_fwd - ours_fwd)[None]
    if to_mm is not None:
        diff = diff @ to_mm.matrix[0].T
    fwd_err = diff[0].norm(dim=-1).numpy()[inner] / voxel
    print(f"{run.variant}: forward: max {fwd_err.max():.2e} voxel over {inner.sum()} atlas voxels")
    assert fwd_err.max() < 0.05
    moved = np.linalg.norm(ours - run.pred.case.frame(torch.float64).inverse().points(
        torch.as_tensor(world)[None])[0].numpy(), axis=-1)[inside]
    assert moved.max() > 1.0  # Phi is no identity: the SVF and affine part move points by mm

    atlas_img = sitk.ReadImage(str(run.atlas["atlas_image.nii.gz"]), sitk.sitkFloat64)
    atlas_lab = sitk.ReadImage(str(run.atlas["atlas_labelmap.nii.gz"]))
    deformed = sitk.GetArrayFromImage(sitk.ReadImage(str(run.folder / "deformed_atlas_image.nii.gz")))
    resampled = sitk.GetArrayFromImage(sitk.Resample(atlas_img, source, tx, sitk.sitkLinear, 0.0))
    assert np.abs(resampled - deformed)[inside].max() < 1e-3 * np.abs(deformed).max()
    refined = sitk.GetArrayFromImage(sitk.ReadImage(str(run.folder / "refine_labelmap.nii.gz")))
    # The labelmap: SimpleITK's linear resampling of the saved atlas probabilities, then argmax, as
    # atlasreg does (equal but for ties); the nearest neighbour of the saved argmax labelmap differs at
    # boundary voxels only (this coarse atlas: 1.6 x 1.6 x 4 mm against 0.9 x 1.3 x 3.5 mm).
    probs = sitk.ReadImage(str(run.atlas["atlas_probabilities.nii.gz"]))
    linear = sitk.GetArrayFromImage(sitk.Resample(probs, source, tx, sitk.sitkLinear, 0.0))
    values = np.asarray(list(LABELS))[linear.argmax(-1)]
    assert (values == refined)[inside].mean() > 0.99
    nearest = sitk.GetArrayFromImage(sitk.Resample(atlas_lab, source, tx, sitk.sitkNearestNeighbor, 0))
    assert (nearest == refined)[inside].mean() > 0.85
