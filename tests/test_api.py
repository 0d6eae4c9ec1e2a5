"""The public Python API: the README example runs as written; files, SimpleITK images and arrays give
the same labelmaps as `atlasreg segment`; evaluate() matches the evaluation module."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import atlasreg
from atlasreg.demo import run_demo
from atlasreg.errors import AtlasregError

README = Path(__file__).resolve().parents[1] / "README.md"
N_TRAIN = 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("api")
    run_demo(root / "demo_output", epochs=1, n_train=N_TRAIN, n_test=2, progress=False)
    return root


def readme_example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no Python API example"
    return block.group(1)


def test_readme_api_example_runs(demo, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    # The README refers to the first test case of the default demo (300 training cases).
    code = code.replace("B301", f"B{N_TRAIN + 1}")
    cwd = os.getcwd()
    try:
        os.chdir(demo)
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "dice" in printed
    saved = demo / "demo_output" / "api" / f"B{N_TRAIN + 1}"
    assert (saved / "refine_labelmap.png").is_file() and (saved / "inverse_transform.h5").is_file()


def test_file_image_and_array_inputs_match_the_command_line(demo):
    model = atlasreg.load_model(demo / "demo_output" / "model" / "model.ckpt", device="cpu")
    folder = demo / "demo_output" / "data" / "test_corrupt"
    cases = [f"B{N_TRAIN + 1}", f"B{N_TRAIN + 2}"]
    # The command line refined both test cases in one batch; so does segment_many: identical outputs.
    results = model.segment_many([folder / f"{c}_img.png" for c in cases], names=cases)
    for case, result in zip(cases, results):
        written = demo / "demo_output" / "segment" / "corrupt" / case
        assert result.name == case
        assert set(result.labelmaps) == {"itn", "itn_lcc", "onepass", "refine", "atlas"}
        for name, img in result.labelmaps.items():
            expected = sitk.GetArrayFromImage(sitk.ReadImage(str(written / f"{name}_labelmap.png")))
            assert np.array_equal(sitk.GetArrayFromImage(img), expected), (case, name)
        # The transform object maps input points into atlas space, as the written field does.
        field = sitk.ReadImage(str(written / "inverse_displacement.nii.gz"))
        p = np.array([40.0, 70.0])
        expected = p + np.array(field.GetPixel(40, 70))
        got = result.to_atlas.points(torch.tensor(p, dtype=torch.float32)[None, None])[0, 0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-3)
    path = folder / f"{cases[0]}_img.png"
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0))  # the demo's data.spacing for PNGs
    from_file = model.segment(path, refine=False)
    from_sitk = model.segment(image, name=cases[0], refine=False)
    from_array = model.segment(sitk.GetArrayFromImage(image), spacing=(1.0, 1.0), refine=False)
    assert "refine" not in from_file.labelmaps
    for other in (from_sitk, from_array):
        for name in ("itn", "onepass", "atlas"):
            assert np.array_equal(other.array(name), results[0].array(name)), name
        assert other.labelmap().GetSize() == image.GetSize()


def test_evaluate_matches_the_evaluation_module(demo):
    import csv

    case = f"B{N_TRAIN + 1}"
    written = demo / "demo_output" / "segment" / "corrupt" / case
    ref = demo / "demo_output" / "data" / "test_corrupt" / f"{case}_seg.png"
    got = atlasreg.evaluate(written / "refine_labelmap.png", ref, {0: "background", 255: "letter"})
    rows = [r for r in csv.DictReader(open(demo / "demo_output" / "evaluation" / "corrupt" / "metrics_per_case.csv"))
            if r["case"] == case and r["method"] == "refine"]
    assert set(got) == {255} and len(rows) == 1
    for metric in ("dice", "hd95", "asd"):
        assert got[255][metric] == pytest.approx(float(rows[0][metric]), rel=1e-6, abs=1e-9)


def test_api_errors_are_one_line(demo, tmp_path):
    model = atlasreg.load_model(demo / "demo_output" / "model" / "model.ckpt")
    with pytest.raises(AtlasregError, match="not found"):
        model.segment(tmp_path / "missing.png")
    with pytest.raises(AtlasregError, match="not a 2D image"):
        model.segment(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(AtlasregError, match="list"):
        model.segment([1, 2, 3])
    with pytest.raises(AtlasregError, match="not found"):
        atlasreg.load_model(tmp_path / "none.ckpt")
