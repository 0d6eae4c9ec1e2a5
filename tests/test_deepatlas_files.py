"""atlasreg.deepatlas.files: coordinate maps on each input's own grid, templates from labelled exam files
(Eq. 14), their propagation written on the inputs' grids (Sec. 3.2.1) and bounding-cube crops (Sec. 5.2.4).

The network's maps are replaced by known ones (the identity, an affine map), so every number has a
known answer: with the identity map the template space is the model grid placed on each case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from atlasreg.config import load_config
from atlasreg.contracts import (COMPLETE, CROP_IMAGE, CROP_INFO, TEMPLATE_INFO, case_labelmap_path, read_segment_info,
                                template_paths)
from atlasreg.data.cases import Preprocessing, load_case
from atlasreg.deepatlas.coordinates import coordinates_to_world, identity_coordinates
from atlasreg.deepatlas.files import (build_template, crop_files, native_coordinates, propagate_files, read_template,
                                      template_box)
from atlasreg.deepatlas.method import DeepAtlasModule, template_grid
from atlasreg.errors import AtlasregError
from deepatlas_material import letter_b_images, tiny_config
from volumes import LABELS, ellipsoids, rotation_about, write_scan


pytestmark = pytest.mark.usefixtures("one_thread")


def known_model(config: dict, folder, matrix=None) -> tuple[DeepAtlasModule, object]:
    """A DeepATLAS module whose coordinate map is ``A u`` (the identity without `matrix`) on the model grid
    placed on each case, and a checkpoint file of it."""
    module = DeepAtlasModule(load_config(None, config))
    module.eval()

    def coordinates(images, full_resolution=True):
        u = identity_coordinates(images.shape[2:], dtype=images.dtype).expand(images.shape[0], -1, *images.shape[2:])
        return u if matrix is None else torch.einsum("ij,nj...->ni...", torch.as_tensor(matrix, dtype=u.dtype), u)

    module.coordinates = coordinates
    checkpoint = folder / "model.ckpt"
    torch.save({"atlasreg": {"method": "deepatlas"}, "hyper_parameters": {"config": module.config},
                "state_dict": module.state_dict()}, checkpoint)
    return module, checkpoint


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """Letter-B B1..B3 (PNG, 32 x 32, 1 mm declared) and B1 again as an oblique NIfTI at twice the
    resolution over the same extent (64 x 64 of 0.5 mm, rotated 30 degrees, moved)."""
    root = tmp_path_factory.mktemp("letters")
    images, labels = letter_b_images(root, 3)
    image = sitk.ReadImage(str(images / "B1.png"), sitk.sitkFloat32)
    label = sitk.ReadImage(str(labels / "B1.png"))
    for img in (image, label):
        img.SetSpacing((1.0, 1.0))
    fine = sitk.Image(64, 64, sitk.sitkFloat32)
    fine.SetSpacing((0.5, 0.5))
    fine.SetOrigin((-0.25, -0.25))
    up_image = sitk.Resample(image, fine, sitk.Transform(), sitk.sitkLinear)
    up_label = sitk.Resample(label, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    angle = math.radians(30.0)
    direction = (math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle))
    other = root / "other"
    other.mkdir()
    for img, name in ((up_image, "B1fine.nii.gz"), (up_label, "B1fine_seg.nii.gz")):
        img.SetDirection(direction)
        img.SetOrigin((40.0, -12.0))
        sitk.WriteImage(img, str(other / name))
    return images, labels, other


def test_native_coordinates_are_the_world_positions_on_the_placed_grid(tmp_path):
    """An oblique, anisotropic 3D scan and the identity map: every input voxel's coordinate, taken back to
    the world through the placed model grid, is that voxel's world point (inside the model's field of
    view); outside, the map keeps its border value."""
    image, labelmap = ellipsoids(size_xyz=(20, 18, 9), spacing=(0.9, 1.3, 3.5))
    paths = write_scan(tmp_path, "scan", image, labelmap, spacing=(0.9, 1.3, 3.5))
    config = tiny_config({"images": str(tmp_path)}, ndim=3, size=(8, 16, 16), spacing=(1.2, 1.2, 3.0), labels=LABELS)
    module, _ = known_model(config, tmp_path)
    with pytest.warns(UserWarning, match=r"exceeds the model's field of view 19.2x19.2x24 mm: 39.5%"):
        case = load_case(paths[0], None, Preprocessing.from_config(module.config))
    c, inside = native_coordinates(module, case)
    assert c.shape == (1, 3, 9, 18, 20) and inside.shape == (1, 1, 9, 18, 20)
    assert 0 < inside.sum() < inside.numel()  # the model grid (3 x 8 = 24 mm in z) sees part of the scan
    world = coordinates_to_world(c[0].movedim(0, -1).double(), case.placed)
    points = case.physical.points(dtype=torch.float64)[0]
    keep = inside[0, 0].bool()
    assert torch.allclose(world[keep], points[keep], atol=1e-4)
    assert c[0].abs().max() <= 1.0 + 1e-6 and not torch.allclose(world[~keep], points[~keep], atol=1.0)


def test_template_from_one_case_reproduces_it_and_segments_it_on_another_grid(letters, tmp_path):
    """Eq. 14 from ONE labelled PNG, written as a template folder; propagated back to that case it gives
    its own labelmap, and to the same letter on an oblique NIfTI grid of twice the resolution its
    labelmap there, each output on its input's grid and header, as declared label values."""
    images, labels, other = letters
    module, checkpoint = known_model(tiny_config({"images": str(images)}), tmp_path)
    template = build_template(module, [images / "B1.png"], [labels / "B1.png"], tmp_path / "template", checkpoint,
                              progress=False)
    paths = template_paths(template)
    probabilities = sitk.ReadImage(str(paths.probabilities))
    grid = template_grid(module.config)
    assert probabilities.GetNumberOfComponentsPerPixel() == 2 and probabilities.GetSize() == (64, 64)
    assert probabilities.GetSpacing() == pytest.approx(grid.spacing)
    array = sitk.GetArrayFromImage(probabilities)
    # background + letter: 1 by linearity, to the solver's accuracy (CG to a relative residual of 1e-5; the
    # voxels between the exam's samples, set by the small membrane term alone, converge slowest: 3.4e-3)
    assert np.allclose(array.sum(-1), 1.0, atol=5e-3) and np.median(np.abs(array.sum(-1) - 1.0)) < 5e-4
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(paths.labelmap))))) == {0, 255}
    info = yaml.safe_load(paths.info.read_text())
    assert info["labels"] == {0: "background", 255: "letter"} and len(info["cases"]) == 1
    assert info["cases"][0]["labelmap"] == str((labels / "B1.png").resolve()) and info["grid"] == grid.to_dict()

    out = tmp_path / "propagated"
    written = propagate_files(module, template, [images / "B1.png", other / "B1fine.nii.gz"], out, checkpoint,
                              progress=False)
    assert [p.name for p in written] == ["B1", "B1fine"]
    manifest = read_segment_info(out)
    assert manifest["status"] == COMPLETE and manifest["cases"] == ["B1", "B1fine"]
    assert manifest["refinement"]["template"] == str(template.resolve())
    for case, image, reference, least in (("B1", images / "B1.png", labels / "B1.png", 0.99),
                                          ("B1fine", other / "B1fine.nii.gz", other / "B1fine_seg.nii.gz", 0.97)):
        ext = ".png" if case == "B1" else ".nii.gz"
        result = sitk.ReadImage(str(case_labelmap_path(out / case, "onepass", ext)))
        source = sitk.ReadImage(str(image))
        assert result.GetSize() == source.GetSize() and result.GetOrigin() == pytest.approx(source.GetOrigin())
        assert result.GetSpacing() == pytest.approx(source.GetSpacing())
        assert result.GetDirection() == pytest.approx(source.GetDirection())
        values = sitk.GetArrayFromImage(result)
        assert set(np.unique(values)) == {0, 255}
        assert dice(values == 255, sitk.GetArrayFromImage(sitk.ReadImage(str(reference))) == 255) >= least


def test_few_shot_template_of_an_affine_map_and_the_box_of_a_structure(letters, tmp_path):
    """Three labelled exams (two folders paired by name) under one map that squeezes and swaps the
    template's axes: the template is the least-squares fit of their three masks, so propagated to any of
    them it gives their majority vote; the letter's template box holds its voxels."""
    images, labels, _ = letters
    matrix = [[0.0, 0.8], [0.9, 0.0]]
    module, checkpoint = known_model(tiny_config({"images": str(images)}), tmp_path, matrix)
    cases = ["B1", "B2", "B3"]
    template = build_template(module, [images], [labels], tmp_path / "few", checkpoint, progress=False)
    assert [c["name"] for c in yaml.safe_load((template / TEMPLATE_INFO).read_text())["cases"]] == cases
    out = propagate_files(module, template, [images], tmp_path / "seg", checkpoint, progress=False)
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(labels / f"{c}.png"))) == 255 for c in cases]
    vote = np.mean(masks, axis=0) > 0.5
    for folder in out:
        result = sitk.GetArrayFromImage(sitk.ReadImage(str(case_labelmap_path(folder, "onepass", ".png")))) == 255
        assert np.mean(result == vote) >= 0.99
    tpl = read_template(template, module, checkpoint)
    lo, hi = template_box(tpl, "letter", margin=0.0)
    inside = (tpl.probabilities[0].argmax(0) == 1).nonzero().float()
    n = torch.tensor(tpl.grid.size, dtype=torch.float32)
    points = (-1.0 + 2.0 * inside / (n - 1)).flip(1)
    assert torch.all(points >= torch.tensor(lo) - 1e-6) and torch.all(points <= torch.tensor(hi) + 1e-6)
    assert template_box(tpl, "255", margin=0.5)[0][0] < lo[0]
    with pytest.raises(AtlasregError, match=r"no structure 'heart' in the template \(its structures: 255 \(letter\)\)"):
        template_box(tpl, "heart")


def test_template_inputs_and_folders_are_checked(letters, tmp_path):
    images, labels, _ = letters
    module, checkpoint = known_model(tiny_config({"images": str(images)}), tmp_path)
    with pytest.raises(AtlasregError, match=r"B2\.png: no labelmap for this image"):
        build_template(module, [images / "B1.png", images / "B2.png"], [labels / "B1.png"], tmp_path / "t",
                       checkpoint, progress=False)
    blank = tmp_path / "blank.png"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkUInt8), str(blank))
    with pytest.raises(AtlasregError, match=r"blank\.png: has no foreground"):
        build_template(module, [images / "B1.png"], [blank], tmp_path / "t", checkpoint, progress=False)
    with pytest.raises(AtlasregError, match=r"label values \[255\] are not in the declared label list \[0, 1\]"):
        build_template(module, [images / "B1.png"], [labels / "B1.png"], tmp_path / "t", checkpoint,
                       labels={0: "background", 1: "one"}, progress=False)
    assert not (tmp_path / "t").exists()
    template = build_template(module, [images / "B1.png"], [labels / "B1.png"], tmp_path / "t", checkpoint,
                              progress=False)
    with pytest.raises(AtlasregError, match=r"missing: template folder not found"):
        read_template(tmp_path / "missing", module)
    with pytest.raises(AtlasregError, match=r"not a template folder"):
        read_template(images, module)
    (tmp_path / "o").mkdir()
    other, other_checkpoint = known_model(tiny_config({"images": str(images)}, atlas_factor=3), tmp_path / "o")
    with pytest.raises(AtlasregError, match=r"does not fit the model's template grid \[96, 96\]"):
        read_template(template, other)
    with pytest.raises(AtlasregError, match=r"t: was built with another checkpoint"):
        read_template(template, module, other_checkpoint)
    with pytest.raises(AtlasregError, match=r"was built with another checkpoint"):
        propagate_files(module, template, [images], tmp_path / "p", other_checkpoint, progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_of_a_box_is_the_input_resampled_on_the_boxs_grid(letters, tmp_path, ndim):
    """The identity map: the template box [-0.5, 0.5]^D is the central half of the model grid placed on
    the case; the crop equals SimpleITK's linear resampling of the input onto the crop's header (exact
    for this similarity map), its vertices are the box's corners in the world, 2D PNG and an oblique 3D
    NIfTI."""
    if ndim == 2:
        images, _, _ = letters
        path, config, size = images / "B2.png", tiny_config({"images": str(images)}), (12, 16)
    else:
        image, labelmap = ellipsoids(size_xyz=(20, 18, 12), spacing=(0.9, 1.3, 2.0))
        path = write_scan(tmp_path, "scan", image, labelmap, spacing=(0.9, 1.3, 2.0),
                          direction=rotation_about((1, 1, 0), 25.0))[0]
        config = tiny_config({"images": str(tmp_path)}, ndim=3, size=(8, 16, 16), spacing=(1.5, 1.5, 3.0),
                             labels=LABELS)
        size = (6, 10, 12)
    module, _ = known_model(config, tmp_path)
    (folder,) = crop_files(module, [path], tmp_path / "crops", [-0.5] * ndim, [0.5] * ndim, size, progress=False)
    crop = sitk.ReadImage(str(folder / CROP_IMAGE))
    source = sitk.ReadImage(str(path), sitk.sitkFloat32)
    case = load_case(path, None, Preprocessing.from_config(module.config))
    source.SetSpacing(case.physical.spacing)  # the declared spacing of a PNG
    assert crop.GetSize() == tuple(reversed(size))
    if ndim == 3:
        assert crop.GetDirection() == pytest.approx(source.GetDirection(), abs=1e-6)
    expected = sitk.GetArrayFromImage(sitk.Resample(source, crop, sitk.Transform(), sitk.sitkLinear, 0.0))
    assert np.allclose(sitk.GetArrayFromImage(crop), expected, atol=1e-3 * float(np.abs(expected).max()))
    info = yaml.safe_load((folder / CROP_INFO).read_text())
    half = torch.tensor([(n - 1) * s / 4 for n, s in zip(case.placed.size_xyz, case.placed.spacing)])
    corner = case.placed.centred_to_world(-half[None].double())[0]
    assert info["vertices"][0] == pytest.approx(corner.tolist(), abs=1e-4)
    assert np.asarray(info["index_to_world"])[:ndim, ndim] == pytest.approx(crop.GetOrigin(), abs=1e-5)
    with pytest.raises(AtlasregError, match=r"too few to project it"):
        crop_files(module, [path], tmp_path / "none", [1.5] * ndim, [1.9] * ndim, size, progress=False)
