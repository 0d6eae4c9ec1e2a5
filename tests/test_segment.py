"""Outputs of atlasreg.segment beyond the labelmaps: transform_metrics.csv (MICE, IC-DSC, Jacobian) and
case.yaml, on a tiny untrained model (whose STN is the identity at initialisation)."""

import csv
import math

import numpy as np
import pytest
import torch
import yaml

from atlasreg.config import load_config
from atlasreg.data.letter_b import write_letter_b_dataset
from atlasreg.evaluation.evaluate import TRANSFORM_METRIC_COLUMNS, evaluate_predictions
from atlasreg.models.registry import build_method
from atlasreg.segment import segment, transform_metrics_csv, transform_statistics
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import AffineSVFTransform, AffineTransform

SIZE, SPACING = (16, 16), (2.0, 2.0)


def disc_atlas(radius_mm=9.0):
    """One-hot atlas (1, 2, 16, 16) on the model grid: a disc of `radius_mm` around the centre."""
    r = Grid.centred(SIZE, SPACING).points()[0].norm(dim=-1)
    return torch.nn.functional.one_hot((r < radius_mm).long(), 2).movedim(-1, 0)[None].float()


def tiny_module(method="atlas_istn"):
    torch.manual_seed(0)
    cfg = load_config(None, {
        "data": {"labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
        "model": {"method": method, "ndim": 2, "size": list(SIZE), "spacing": list(SPACING),
                  "itn_channels": [4, 8, 8, 8], "stn_channels": [4, 4, 8]},
        "refinement": {"iterations": 2, "cases_at_once": 2},
    })
    module = build_method(cfg).eval()
    module.atlas_labelmap.copy_(disc_atlas())
    module.atlas_image.copy_(module.atlas_labelmap[:, 1:])
    return module


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("images")
    write_letter_b_dataset(folder, 2, seed=0, size=32)
    return folder


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_segment_writes_transform_metrics_and_case_yaml(images, tmp_path):
    out = tmp_path / "seg"
    written = segment(tiny_module(), [images], out, progress=False, image_suffix="_img")
    assert sorted(p.name for p in written) == ["B1", "B2"]
    for case in ("B1", "B2"):
        meta = yaml.safe_load((out / case / "case.yaml").read_text())
        assert meta == {"image": str((images / f"{case}_img.png").resolve())}
        rows = read_rows(out / case / "transform_metrics.csv")
        assert (out / case / "transform_metrics.csv").read_text().splitlines()[0] == \
            "method,mice_mm,mice_voxels,ic_dsc,nonpositive_jacobian_fraction,std_log_jacobian"
        assert [r["method"] for r in rows] == ["onepass", "refine"]
        onepass = {k: float(v) for k, v in rows[0].items() if k != "method"}
        # zero-initialised STN heads: the 1-pass transform is the identity
        assert onepass["mice_mm"] == pytest.approx(0.0, abs=1e-4)
        assert onepass["mice_voxels"] == pytest.approx(0.0, abs=1e-4)
        assert onepass["ic_dsc"] == pytest.approx(1.0)
        assert onepass["nonpositive_jacobian_fraction"] == 0.0
        assert onepass["std_log_jacobian"] == pytest.approx(0.0, abs=1e-5)
        refine = {k: float(v) for k, v in rows[1].items() if k != "method"}
        # two small Adam steps from the identity: still nearly inverse consistent, no folding
        assert 0.0 <= refine["mice_voxels"] < 0.1 and refine["ic_dsc"] > 0.95
        assert refine["nonpositive_jacobian_fraction"] == 0.0
        assert math.isfinite(refine["std_log_jacobian"])
    assert not list(out.glob(".*"))  # no temporary folders left

    # evaluate gathers the per-case files
    refs = {case: images / f"{case}_seg.png" for case in ("B1", "B2")}
    evaluate_predictions(out, refs, {0: "background", 255: "letter"}, tmp_path / "eval")
    gathered = read_rows(tmp_path / "eval" / "transforms_per_case.csv")
    assert [(r["case"], r["method"]) for r in gathered] == [("B1", "onepass"), ("B1", "refine"),
                                                            ("B2", "onepass"), ("B2", "refine")]
    assert float(gathered[0]["ic_dsc"]) == pytest.approx(1.0)
    assert "## Transform metrics" in (tmp_path / "eval" / "summary.md").read_text()


def test_unet_without_transform_writes_no_transform_metrics(images, tmp_path):
    out = tmp_path / "seg"
    segment(tiny_module("unet"), [images / "B1_img.png"], out, progress=False)
    case = out / "B1_img"
    assert (case / "itn_labelmap.png").is_file() and not (case / "onepass_labelmap.png").exists()
    assert not (case / "transform_metrics.csv").exists()
    assert yaml.safe_load((case / "case.yaml").read_text())["image"] == str((images / "B1_img.png").resolve())


def test_transform_statistics_known_answers():
    """Identity: MICE 0, IC-DSC 1, no folding. A reflection x -> -x maps voxel centres onto voxel
    centres and is its own inverse (MICE 0, IC-DSC 1 for the symmetric disc) but folds everywhere."""
    eye = torch.eye(2).expand(2, 2, 2).clone()
    eye[1, 0, 0] = -1.0  # case 1: reflection of the x axis
    tr = AffineSVFTransform((AffineTransform(eye, torch.zeros(2, 2)),), Grid.centred(SIZE, SPACING))
    stats = transform_statistics(tr, disc_atlas())
    assert set(stats) == set(TRANSFORM_METRIC_COLUMNS[1:])
    np.testing.assert_allclose(stats["mice_mm"], 0.0, atol=1e-5)
    np.testing.assert_allclose(stats["mice_voxels"], 0.0, atol=1e-5)
    np.testing.assert_allclose(stats["ic_dsc"], 1.0)
    np.testing.assert_allclose(stats["nonpositive_jacobian_fraction"], [0.0, 1.0])
    assert stats["std_log_jacobian"][0] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(stats["std_log_jacobian"][1])  # no voxel with det J > 0


def test_transform_metrics_csv_format():
    text = transform_metrics_csv({"onepass": {"mice_mm": 0.5, "mice_voxels": 0.25, "ic_dsc": 0.99,
                                              "nonpositive_jacobian_fraction": 0.0,
                                              "std_log_jacobian": math.nan}})
    assert text.splitlines() == ["method,mice_mm,mice_voxels,ic_dsc,nonpositive_jacobian_fraction,std_log_jacobian",
                                 "onepass,0.5,0.25,0.99,0.0,nan"]


def test_degenerate_inputs_warn_once_each_and_give_finite_outputs(tmp_path):
    # A constant image (normalised to zeros) and one twice the field of view (cropped): one warning each,
    # and no NaN in anything written.
    import warnings

    import SimpleITK as sitk

    flat, big = tmp_path / "flat.png", tmp_path / "big.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((32, 32), 7, np.uint8)), str(flat))
    sitk.WriteImage(sitk.GetImageFromArray((np.random.default_rng(0).random((64, 64)) * 200).astype(np.uint8)),
                    str(big))
    out = tmp_path / "seg"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segment(tiny_module(), [flat, big], out, progress=False)
    assert [str(w.message) for w in caught] == [
        f"{flat}: constant intensity 7: normalised to zeros",
        f"{big}: extent 64x64 mm of the image exceeds the model's field of view 32x32 mm: 75% of the image's "
        "voxels lie outside and were cropped; the region around (31.5, 31.5) mm was used"]
    for case in ("flat", "big"):
        files = sorted((out / case).glob("*.nii.gz"))
        assert len(files) >= 3
        for f in files:
            assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))).all(), f
        for row in read_rows(out / case / "transform_metrics.csv"):
            assert all(math.isfinite(float(v)) for k, v in row.items() if k != "method"), row
    # A 1x1 image fails alone (issue 16 item 3): its error names it, the other case is written.
    dot = tmp_path / "dot.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 1), 7, np.uint8)), str(dot))
    from atlasreg.segment import CasesFailed

    message = f"{dot}: image is 1x1 voxels; a 2D model needs at least 2 voxels along every axis (nothing to segment)"
    with pytest.raises(CasesFailed) as e, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segment(tiny_module(), [flat, dot], tmp_path / "some", progress=False)
    assert str(e.value) == f"1 of 2 cases failed (first: {message})"
    assert e.value.result.failures == [("dot", dot, message)] and e.value.result.total == 2
    assert [p.name for p in e.value.result] == ["flat"] and sorted(p.name for p in (tmp_path / "some").iterdir()) == ["flat"]
    assert [str(w.message) for w in caught] == [f"{flat}: constant intensity 7: normalised to zeros"]  # once per run


def _dicom_outputs_have(case_dir, source, ndim):
    """Every labelmap of `case_dir` is NIfTI with the geometry of `source` (the image read from the
    DICOM input), read back with SimpleITK and with nibabel (RAS: ITK's x and y negated)."""
    import nibabel as nib
    import SimpleITK as sitk

    labelmaps = sorted(case_dir.glob("*_labelmap*"))
    assert [p.name for p in labelmaps] == [f"{n}_labelmap.nii.gz" for n in ("atlas", "itn", "itn_lcc", "onepass",
                                                                            "refine")]
    d = np.asarray(source.GetDirection()).reshape(ndim, ndim)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0][:ndim])
    for path in labelmaps:
        back = sitk.ReadImage(str(path))
        assert back.GetSize() == source.GetSize(), path
        np.testing.assert_allclose(back.GetSpacing(), source.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetDirection(), source.GetDirection(), atol=1e-4)
        assert set(np.unique(sitk.GetArrayFromImage(back))) <= {0, 255, 1}
        nifti = nib.load(str(path))
        assert nifti.shape == source.GetSize(), path
        np.testing.assert_allclose(nifti.affine[:ndim, :ndim], lps_to_ras @ d @ np.diag(source.GetSpacing()),
                                   atol=1e-4)
        np.testing.assert_allclose(nifti.affine[:ndim, 3], lps_to_ras @ np.asarray(source.GetOrigin()), atol=1e-4)


def test_dicom_radiographs_segment_with_a_2d_model_into_nifti(tmp_path):
    """A folder of DICOM case folders (a radiograph in each) and a radiograph file given directly: 2D
    cases named after the folder and the file, segmented by a 2D model, outputs .nii.gz with the
    radiographs' spacing, in-plane origin and direction."""
    import yaml

    from atlasreg.data.io import read_image
    from dicom_series import UID_ROOT, write_dicom_image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :16]
    disc = ((yy - 10) ** 2 + (xx - 8) ** 2 < 30).astype(np.uint16)
    for k, path in enumerate((tmp_path / "dicom" / "xr1" / "IM0001", tmp_path / "xr2.dcm")):
        array = disc * 900 + rng.integers(0, 100, size=(20, 16)).astype(np.uint16)
        write_dicom_image(path, array, (1.5, 1.4), (5.0, 7.0, -3.0), (0, 1, 0), (-1, 0, 0),
                          series_uid=f"{UID_ROOT}.8{k}")
    out = tmp_path / "seg"
    written = segment(tiny_module(), [tmp_path / "dicom", tmp_path / "xr2.dcm"], out, progress=False)
    assert sorted(p.name for p in written) == ["xr1", "xr2"]
    for case, given in (("xr1", tmp_path / "dicom" / "xr1"), ("xr2", tmp_path / "xr2.dcm")):
        source = read_image(given)
        assert source.GetDimension() == 2 and source.GetOrigin() == (5.0, 7.0)
        _dicom_outputs_have(out / case, source, 2)
        assert yaml.safe_load((out / case / "case.yaml").read_text()) == {"image": str(given.resolve())}


def test_a_dicom_series_segments_with_a_3d_model_into_nifti(tmp_path):
    """A folder holding one oblique DICOM series, given as the input: one case named after the folder,
    outputs .nii.gz on the series' grid (spacing from the slice positions, origin, direction)."""
    from atlasreg.data.io import read_image
    from dicom_series import write_dicom_series

    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) @ np.diag([1.0, -1.0, 1.0])
    zz, yy, xx = np.mgrid[:12, :10, :8]
    ball = ((zz - 6) ** 2 / 9 + (yy - 5) ** 2 / 9 + (xx - 4) ** 2 / 4 < 1.5).astype(np.int16)
    array = ball * 800 + np.random.default_rng(0).integers(0, 50, size=ball.shape).astype(np.int16)
    write_dicom_series(tmp_path / "ct7", array, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), direction, thickness=1.0)
    torch.manual_seed(0)
    cfg = load_config(None, {
        "data": {"labels": {0: "background", 1: "ball"}},
        "model": {"method": "atlas_istn", "ndim": 3, "size": [8, 8, 8], "spacing": [4.0, 4.0, 4.0],
                  "itn_channels": [4, 8, 8, 8], "stn_channels": [4, 4, 8]},
        "refinement": {"iterations": 1}})
    module = build_method(cfg).eval()
    r = Grid.centred((8, 8, 8), (4.0, 4.0, 4.0)).points()[0].norm(dim=-1)
    module.atlas_labelmap.copy_(torch.nn.functional.one_hot((r < 8.0).long(), 2).movedim(-1, 0)[None].float())
    module.atlas_image.copy_(module.atlas_labelmap[:, 1:])
    written = segment(module, [tmp_path / "ct7"], tmp_path / "seg", progress=False)
    assert [p.name for p in written] == ["ct7"]
    source = read_image(tmp_path / "ct7")
    assert source.GetSize() == (8, 10, 12)
    np.testing.assert_allclose(source.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-6)
    _dicom_outputs_have(tmp_path / "seg" / "ct7", source, 3)


# ------------------------------------------------------------------- folders: images and labelmaps


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # collect_inputs looks at names only
    return folder


@pytest.mark.parametrize("label, image, suggested", [
    ("_seg", "_img", "_img"), ("_label", "_t1", "_t1"), ("_labels", "_img", "_img"), ("_mask", "_ct", "_ct"),
    ("_gt", "_img", "_img"), ("_SEG", "_img", "_img"), ("_mask", "", "<suffix of the images>")])
def test_a_folder_mixing_images_and_labelmaps_is_refused_with_a_suffix_to_give(tmp_path, label, image, suggested):
    from atlasreg.errors import AtlasregError
    from atlasreg.segment import collect_inputs

    ext = ".nii.gz"
    folder = _touch(tmp_path / "data", *[f"case{i}{s}{ext}" for i in (1, 2, 3) for s in (image, label)])
    with pytest.raises(AtlasregError) as e:
        collect_inputs([folder])
    assert e.value.path == str(folder) and "\n" not in str(e.value)
    assert str(e.value).endswith(f"mixes images and files named like labelmaps (3 of 6, e.g. case1{label}{ext}); "
                                 f"give the images' suffix to take only them, e.g. --image-suffix {suggested}")
    if image:  # with the suffix: the images, named without it
        assert collect_inputs([folder], image) == [(f"case{i}", folder / f"case{i}{image}{ext}") for i in (1, 2, 3)]
    # files given by name are taken as they are; a folder of images only (or labelmaps only) is not refused
    assert collect_inputs([folder / f"case1{label}{ext}"]) == [(f"case1{label}", folder / f"case1{label}{ext}")]
    only = _touch(tmp_path / "only", "a_mask.png", "b_mask.png")
    assert [n for n, _ in collect_inputs([only])] == ["a_mask", "b_mask"]


def test_files_named_as_the_configs_labelmaps_are_left_out_with_one_warning(tmp_path):
    import warnings

    from atlasreg.errors import AtlasregError
    from atlasreg.segment import collect_inputs

    folder = _touch(tmp_path / "data", "B1_img.png", "B1_seg.png", "B2_img.png", "B2_seg.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = collect_inputs([folder], label_suffixes=["_seg"], config_image_suffix="_img")
        assert found == [("B1_img", folder / "B1_img.png"), ("B2_img", folder / "B2_img.png")]
        assert [str(w.message) for w in caught] == [
            f"{folder}: 2 file(s) named as the labelmaps of the checkpoint's config (*_seg) left out, 2 image(s) "
            "taken; --image-suffix _img names the cases without it"]
        caught.clear()
        assert collect_inputs([folder], "_img", ["_seg"], "_img") == [("B1", folder / "B1_img.png"),
                                                                     ("B2", folder / "B2_img.png")]
        assert not caught  # nothing was left out
    labels_only = _touch(tmp_path / "labels", "B1_seg.png")
    with pytest.raises(AtlasregError, match="no images found: all 1 image files are named as the labelmaps of "
                                            r"the checkpoint's config \(\*_seg\)") as e:
        collect_inputs([labels_only], label_suffixes=["_seg"])
    assert e.value.path == str(labels_only)


def test_segment_takes_the_images_of_a_folder_as_its_config_names_them(images, tmp_path):
    import warnings

    from atlasreg.errors import AtlasregError

    module = tiny_module()
    # no label suffix in the config: the folder of B<i>_img.png and B<i>_seg.png is refused, nothing written
    with pytest.raises(AtlasregError, match=r"mixes images .* --image-suffix _img$"):
        segment(module, [images], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    # the training split of the config names its labelmaps *_seg: those are left out, with one warning
    module.config["data"]["train"] = {"images": str(images), "image_suffix": "_img", "label_suffix": "_seg"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = segment(module, [images], tmp_path / "seg", {"iterations": 0}, progress=False)
    assert sorted(p.name for p in written) == ["B1_img", "B2_img"]
    assert [str(w.message) for w in caught] == [
        f"{images}: 2 file(s) named as the labelmaps of the checkpoint's config (*_seg) left out, 2 image(s) "
        "taken; --image-suffix _img names the cases without it"]


def test_the_progress_bar_advances_per_written_case(images, tmp_path, monkeypatch):
    import atlasreg.segment as segment_module

    events = []

    class Recording(segment_module.tqdm):
        def update(self, n=1):
            events.append((self.desc, n))
            return super().update(n)

    real = segment_module.write_outputs  # the case folder's files, on the writer thread

    def write(final, case, *args, **kwargs):
        events.append(("written", case.name))
        return real(final, case, *args, **kwargs)

    monkeypatch.setattr(segment_module, "tqdm", Recording)
    monkeypatch.setattr(segment_module, "write_outputs", write)
    # both cases in one group (cases_at_once 2): the bar moves after each case, not once for the group
    segment(tiny_module(), [images], tmp_path / "seg", {"iterations": 0, "cases_at_once": 2}, image_suffix="_img")
    assert events == [("written", "B1"), ("segmenting", 1), ("written", "B2"), ("segmenting", 1)]


def test_the_writer_hands_freed_memory_back_after_each_case(images, tmp_path, monkeypatch):
    import atlasreg.segment as segment_module

    events = []
    real = segment_module.write_outputs
    monkeypatch.setattr(segment_module, "write_outputs",
                        lambda final, case, *a, **k: events.append(case.name) or real(final, case, *a, **k))
    monkeypatch.setattr(segment_module, "release_free_memory", lambda: events.append("released"))
    # without it the resident set of a long run grew by about 0.1 MiB a case (glibc kept freed pages)
    segment(tiny_module(), [images], tmp_path / "seg", {"iterations": 0, "cases_at_once": 2}, image_suffix="_img")
    assert events == ["B1", "released", "B2", "released"]


def test_parts_partition_the_cases_into_the_batches_of_the_unsplit_run():
    """Issue 16 item 3: part I of P takes the batches k of cases_at_once cases with k % P == I; together
    the parts hold every batch of one unsplit run once (with cases_at_once 1: the cases i % P == I)."""
    from atlasreg.errors import AtlasregError
    from atlasreg.segment import part_batches

    for n in range(12):
        for size in range(1, 5):
            whole = part_batches(n, size)
            assert [i for b in whole for i in b] == list(range(n)) and all(len(b) == size for b in whole[:-1])
            for parts in range(1, 5):
                split = [part_batches(n, size, parts, part) for part in range(parts)]
                assert sorted((b for p in split for b in p), key=lambda b: b.start) == whole
                assert all(b.start // size % parts == part for part, p in enumerate(split) for b in p)
    assert [list(b) for b in part_batches(7, 1, 3, 1)] == [[1], [4]]
    for parts, part, message in ((2, 2, r"--part-id 2: expected an integer with 0 <= part id < --num-parts \(2\)"),
                                 (2, -1, "--part-id -1"), (0, 0, "--num-parts 0: expected an integer >= 1")):
        with pytest.raises(AtlasregError, match=message):
            part_batches(4, 2, parts, part)


def test_a_read_failure_is_a_record_not_an_exception(images, tmp_path):
    """The reader of DataLoader workers returns what failed (the one-line message naming the file) and
    what warned, instead of raising in a worker."""
    import SimpleITK as sitk

    from atlasreg.data.cases import Preprocessing
    from atlasreg.segment import CaseReader

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    reader = CaseReader([("B1", images / "B1_img.png"), ("bad", bad)], Preprocessing.from_config(tiny_module().config))
    good, failed = reader[0], reader[1]
    assert good.error is None and good.case.name == "B1" and good.case.image.shape == (1, 1, *SIZE)
    assert failed.case is None and failed.error.startswith(f"{bad}: ") and "\n" not in failed.error
    assert good.warned == [] and failed.warned == []
    flat = tmp_path / "flat.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((32, 32), 7, np.uint8)), str(flat))
    assert CaseReader([("flat", flat)], reader.prep)[0].warned == [
        (f"{flat}: constant intensity 7: normalised to zeros", UserWarning)]
