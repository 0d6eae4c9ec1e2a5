"""atlasreg.deepatlas.cli: the `atlasreg deepatlas` commands end to end in 2D and 3D (pretrain on images
without labels, a template from ONE labelled case, propagation written on each input's own grid, crops,
`atlasreg evaluate` reading the propagation), resuming, and bad inputs (one line, status 2, nothing
written)."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from atlasreg.cli import main
from atlasreg.contracts import CROP_IMAGE, METRICS_PER_CASE, case_labelmap_path
from bad_inputs_rows import Row, problems, run_row
from deepatlas_material import letter_b_images, tiny_config
from volumes import LABELS, OBLIQUE, ellipsoids, rotation_about, write_scan


pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys=None) -> str:
    status = main([str(a) for a in argv])
    out = capsys.readouterr() if capsys is not None else None
    assert status == 0, out.err if out else argv
    return out.out if out else ""


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


@dataclass
class Material:
    """A pretrained 2D model and its inputs (the bad-input rows start from it and never change it)."""

    root: Path
    images: Path      # B1..B6, images alone
    labels: Path      # their labelmaps (B1's makes the template)
    config: Path
    checkpoint: Path
    template: Path


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Material:
    root = tmp_path_factory.mktemp("deepatlas_cli")
    images, labels = letter_b_images(root / "data", 6)
    config = root / "deepatlas.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"images": "data/images"}, seed_atlas="B1")))
    run(["deepatlas", "pretrain", config, "--out", root / "run", "--quiet"])
    checkpoint = root / "run" / "model.ckpt"
    run(["deepatlas", "template", "--checkpoint", checkpoint, "--images", images / "B1.png", "--labels",
         labels / "B1.png", "--out", root / "template", "--quiet"])
    return Material(root, images, labels, config, checkpoint, root / "template")


def test_2d_pretrain_template_from_one_case_propagate_evaluate_and_crop(material, tmp_path, capsys):
    """Six unlabelled 32 x 32 Letter-B images, a few steps per stage; a template from ONE labelled case;
    propagation to two cases: the labelmaps exist, lie on each input's grid and hold declared values;
    `atlasreg evaluate` reads them (DeepATLAS's report column); a crop of the letter's template box."""
    m = material
    out = run(["deepatlas", "propagate", m.images / "B2.png", m.images / "B3.png", "--checkpoint", m.checkpoint,
               "--template", m.template, "--out", tmp_path / "seg", "--quiet"], capsys)
    assert out == f"2 case(s) written to {tmp_path / 'seg'}\n"
    for case in ("B2", "B3"):
        result = sitk.ReadImage(str(case_labelmap_path(tmp_path / "seg" / case, "onepass", ".png")))
        assert same_grid(result, sitk.ReadImage(str(m.images / f"{case}.png")))
        assert set(np.unique(sitk.GetArrayFromImage(result))) <= {0, 255}
    with pytest.warns(UserWarning, match=r"4 reference case\(s\) have no prediction folder"):
        run(["evaluate", tmp_path / "seg", "--references", m.labels, "--out", tmp_path / "eval"], capsys)
    with open(tmp_path / "eval" / METRICS_PER_CASE) as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["method"], r["structure"]) for r in rows] == [("B2", "onepass", "letter"),
                                                                        ("B3", "onepass", "letter")]
    from atlasreg.models.registry import get_method

    assert get_method("deepatlas").report_column({}, "onepass") == "DeepATLAS"
    run(["deepatlas", "crop", m.images / "B4.png", "--checkpoint", m.checkpoint, "--template", m.template,
         "--structure", "letter", "--size", "12,16", "--out", tmp_path / "crops", "--quiet"], capsys)
    assert sitk.ReadImage(str(tmp_path / "crops" / "B4" / CROP_IMAGE)).GetSize() == (16, 12)
    before = m.checkpoint.read_bytes()
    again = run(["deepatlas", "pretrain", m.config, "--out", m.root / "run"], capsys)
    assert "holds a finished run (12 of 12 steps): nothing to do" in again and m.checkpoint.read_bytes() == before


def test_3d_pretrain_template_and_propagation_on_oblique_volumes(tmp_path, capsys):
    """Three nested-ellipsoid volumes with oblique, flipped, anisotropic headers of their own: a template
    from one of them and its propagation to the two others, on their own grids, with declared labels."""
    data = tmp_path / "data"
    data.mkdir()
    directions = (OBLIQUE, rotation_about((0, 0, 1), 40.0), np.eye(3))
    for i, direction in enumerate(directions):
        image, labelmap = ellipsoids(size_xyz=(18, 16, 8), spacing=(1.2, 1.3, 3.0), seed=i,
                                     shift_mm=(1.5 * i, -1.0, 0.5 * i))
        write_scan(data, f"v{i}", image, labelmap, spacing=(1.2, 1.3, 3.0), origin=(10.0 * i, -5.0, 3.0),
                   direction=direction)
    config = tmp_path / "volumes.yaml"
    cfg = tiny_config({"images": str(data), "label_suffix": "_seg"}, ndim=3, size=(8, 16, 16),
                      spacing=(1.5, 1.5, 3.0), labels=LABELS, batch_size=3, steps_per_level=1, head_warmup_steps=1,
                      autoencoder={"steps": 1})
    config.write_text(yaml.safe_dump(cfg))
    run(["deepatlas", "pretrain", config, "--out", tmp_path / "run", "--quiet"], capsys)
    checkpoint = tmp_path / "run" / "model.ckpt"
    assert torch.load(checkpoint, weights_only=False)["deepatlas"]["stage"] == "stage 3/3"
    run(["deepatlas", "template", "--checkpoint", checkpoint, "--images", data / "v0.nii.gz", "--labels",
         data / "v0_seg.nii.gz", "--out", tmp_path / "template", "--quiet"], capsys)
    run(["deepatlas", "propagate", data / "v1.nii.gz", data / "v2.nii.gz", "--checkpoint", checkpoint,
         "--template", tmp_path / "template", "--out", tmp_path / "seg", "--quiet"], capsys)
    for case in ("v1", "v2"):
        result = sitk.ReadImage(str(case_labelmap_path(tmp_path / "seg" / case, "onepass", ".nii.gz")))
        assert same_grid(result, sitk.ReadImage(str(data / f"{case}.nii.gz")))
        assert set(np.unique(sitk.GetArrayFromImage(result))) <= set(LABELS)


# ------------------------------------------------------------------------------------------ bad inputs
def _argv(m: Material, step: str, *extra, checkpoint=None) -> list[str]:
    return ["deepatlas", step, "--checkpoint", str(checkpoint or m.checkpoint), *map(str, extra), "--quiet"]


def _other_checkpoint(m: Material, d: Path) -> Path:
    """The same model with one weight changed: another checkpoint (other bytes, another coordinate space)."""
    state = torch.load(m.checkpoint, weights_only=False)
    state["state_dict"]["atlas.tensor"] += 1.0
    torch.save(state, d / "other.ckpt")
    return d / "other.ckpt"


def _atlas_istn_checkpoint(m: Material, d: Path) -> Path:
    from atlasreg.config import load_config
    from atlasreg.models.registry import build_method

    cfg = load_config(None, {"data": {"labels": {0: "background", 255: "letter"}},
                             "model": {"size": [16, 16], "itn_channels": [4, 8], "stn_channels": [4, 4, 8]}})
    module = build_method(cfg)
    torch.save({"atlasreg": {"method": "atlas_istn"}, "hyper_parameters": {"config": cfg},
                "state_dict": module.state_dict()}, d / "atlas_istn.ckpt")
    return d / "atlas_istn.ckpt"


def _copy(path: Path, d: Path) -> Path:
    shutil.copyfile(path, d / path.name)
    return d / path.name


ROWS = [
    Row("deepatlas propagate", "template folder missing", lambda m, d: (
        _argv(m, "propagate", m.images / "B2.png", "--template", d / "nothing", "--out", d / "out"),
        str(d / "nothing"))),
    Row("deepatlas propagate", "not a template folder", lambda m, d: (
        _argv(m, "propagate", m.images / "B2.png", "--template", m.images, "--out", d / "out"), str(m.images))),
    Row("deepatlas propagate", "template of another checkpoint", lambda m, d: (
        _argv(m, "propagate", m.images / "B2.png", "--template", m.template, "--out", d / "out",
              checkpoint=_other_checkpoint(m, d)), str(m.template))),
    Row("deepatlas propagate", "input missing", lambda m, d: (
        _argv(m, "propagate", d / "B9.png", "--template", m.template, "--out", d / "out"), str(d / "B9.png"))),
    Row("deepatlas propagate", "input not an image", lambda m, d: (
        _argv(m, "propagate", _copy(m.config, d).rename(d / "x.png"), "--template", m.template, "--out", d / "out"),
        str(d / "x.png"))),
    Row("deepatlas propagate", "checkpoint of another method", lambda m, d: (
        _argv(m, "propagate", m.images / "B2.png", "--template", m.template, "--out", d / "out",
              checkpoint=_atlas_istn_checkpoint(m, d)), "atlas_istn.ckpt")),
    Row("deepatlas template", "an image without its labelmap", lambda m, d: (
        _argv(m, "template", "--images", m.images / "B1.png", m.images / "B2.png", "--labels", m.labels / "B1.png",
              "--out", d / "t"), str(m.images / "B2.png"))),
    Row("deepatlas template", "an image given as its labelmap", lambda m, d: (
        _argv(m, "template", "--images", m.images / "B1.png", "--labels", m.images / "B1.png", "--out", d / "t"),
        str(m.images / "B1.png"))),
    Row("deepatlas template", "a labelmap with no foreground", lambda m, d: (
        _argv(m, "template", "--images", m.images / "B1.png", "--labels", _blank(d), "--out", d / "t"),
        str(d / "blank.png"))),
    Row("deepatlas template", "--out holds other files", lambda m, d: (
        _argv(m, "template", "--images", m.images / "B1.png", "--labels", m.labels / "B1.png", "--out",
              _filled(d)), str(d / "full"))),
    Row("deepatlas template", "checkpoint missing", lambda m, d: (
        _argv(m, "template", "--images", m.images / "B1.png", "--labels", m.labels / "B1.png", "--out", d / "t",
              checkpoint=d / "none.ckpt"), str(d / "none.ckpt"))),
    Row("deepatlas pretrain", "images folder missing", lambda m, d: (
        ["deepatlas", "pretrain", str_config(m, d, {"images": str(d / "nothing")}), "--out", str(d / "run")],
        str(d / "nothing"))),
    Row("deepatlas pretrain", "mask channels without labelmaps", lambda m, d: (
        ["deepatlas", "pretrain", str_config(m, d, {"images": str(m.images)}, losses={"mask_channels": True}),
         "--out", str(d / "run")], str(m.images / "B1.png"))),
    Row("deepatlas pretrain", "a corrupt image among the images", lambda m, d: (
        ["deepatlas", "pretrain", str_config(m, d, {"images": str(_with_corrupt(m, d))}), "--out", str(d / "run")],
        str(d / "imgs" / "B7.png"))),
    Row("deepatlas pretrain", "one image with the implicit warp", lambda m, d: (
        ["deepatlas", "pretrain", str_config(m, d, {"images": str(_one_image(m, d))}), "--out", str(d / "run")],
        str(d / "one" / "B1.png"))),
    Row("deepatlas crop", "neither a box nor a structure", lambda m, d: (
        _argv(m, "crop", m.images / "B2.png", "--out", d / "c"), "--box")),
    Row("deepatlas crop", "a structure the template lacks", lambda m, d: (
        _argv(m, "crop", m.images / "B2.png", "--template", m.template, "--structure", "heart", "--out", d / "c"),
        str(m.template))),
    Row("deepatlas crop", "a box the image does not show", lambda m, d: (
        _argv(m, "crop", m.images / "B2.png", "--box=1.5,1.5,1.9,1.9", "--out", d / "c"), str(m.images / "B2.png"))),
    Row("deepatlas crop", "a box of the wrong length", lambda m, d: (
        _argv(m, "crop", m.images / "B2.png", "--box=0,0,1", "--out", d / "c"), "--box")),
]


def _blank(d: Path) -> Path:
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkUInt8), str(d / "blank.png"))
    return d / "blank.png"


def _filled(d: Path) -> Path:
    (d / "full").mkdir()
    (d / "full" / "notes.txt").write_text("keep")
    return d / "full"


def str_config(m: Material, d: Path, train: dict, **deepatlas) -> str:
    """A tiny DeepATLAS config file training on `train`, as a command-line argument."""
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(train, **deepatlas)))
    return str(path)


def _with_corrupt(m: Material, d: Path) -> Path:
    shutil.copytree(m.images, d / "imgs")
    (d / "imgs" / "B7.png").write_bytes((m.images / "B1.png").read_bytes()[:60])
    return d / "imgs"


def _one_image(m: Material, d: Path) -> Path:
    (d / "one").mkdir()
    shutil.copyfile(m.images / "B1.png", d / "one" / "B1.png")
    return d / "one"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.command}: {r.input}")
def test_a_bad_input_is_one_line_status_2_and_writes_nothing(material, tmp_path, row):
    result = run_row(row, material, tmp_path)
    assert not problems(result), (problems(result), result.stderr)
