"""The command line end to end on tiny generated data, and every bad input of the core issue."""

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from scipy import ndimage

from lightning.pytorch.callbacks import Callback

from atlasreg.cli import main
from atlasreg.config import load_config
from atlasreg.contracts import case_labelmap_path
from atlasreg.models.train import train
from atlasreg.data.letter_b import write_letter_b_dataset
from bad_inputs_rows import other_checkpoint

SIZE = 32  # native image size of the tiny data


def tiny_config(tmp, train_dir, epochs=2):
    cfg = {
        "name": "tiny",
        "data": {"train": {"images": str(train_dir), "image_suffix": "_img", "label_suffix": "_seg"},
                 "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
        "model": {"ndim": 2, "size": [16, 16], "spacing": [2.0, 2.0], "itn_channels": [4, 8, 8, 8],
                  "stn_channels": [4, 4, 8]},
        "training": {"epochs": epochs, "batch_size": 4, "fade_in": None, "atlas_batch_size": 4},
        "refinement": {"iterations": 3, "cases_at_once": 2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cli")
    write_letter_b_dataset(tmp / "train", 6, seed=0, size=SIZE)
    write_letter_b_dataset(tmp / "test", 3, seed=1, start_index=101, size=SIZE, corrupt=True)
    config = tiny_config(tmp, tmp / "train")
    assert main(["train", str(config), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp


def test_train_writes_checkpoint_atlas_and_config(trained):
    run = trained / "run"
    assert (run / "model.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "tiny"
    atlas = sitk.ReadImage(str(run / "atlas" / "atlas_labelmap.nii.gz"))
    assert atlas.GetSize() == (16, 16) and atlas.GetSpacing() == (2.0, 2.0)
    assert (run / "atlas_initial" / "atlas_image.nii.gz").is_file()  # Fig. 9: the atlas at the start
    ckpt = torch.load(run / "model.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["model"]["size"] == [16, 16]
    assert "atlas_labelmap" in ckpt["state_dict"] and ckpt["optimizer_states"]


class Crash(Callback):
    """Simulates a run killed at the start of its second epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated interruption")


def test_interrupted_training_resumes_from_last_checkpoint(trained, capsys):
    """A run killed during epoch 1 of 2 continues from its last checkpoint in the same folder."""
    out = trained / "resumable"
    cfg = load_config(tiny_config(trained, trained / "train", epochs=2))
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, out, progress=False, callbacks=[Crash()])
    assert not (out / "model.ckpt").exists()
    before = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert before["global_step"] == 2  # epoch 0 done: two batches (6 cases, batch 4)
    capsys.readouterr()
    assert main(["train", str(tiny_config(trained, trained / "train", epochs=2)), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "epoch    0" not in printed and "epoch    1" in printed
    after = torch.load(out / "model.ckpt", weights_only=False)
    assert after["global_step"] == before["global_step"] + 2  # only the missing epoch was run
    assert not torch.equal(after["state_dict"]["atlas_labelmap"], before["state_dict"]["atlas_labelmap"])


def test_segment_and_evaluate_end_to_end(trained):
    out = trained / "seg"
    assert main(["segment", str(trained / "test"), "--image-suffix", "_img", "--checkpoint",
                 str(trained / "run" / "model.ckpt"), "--out", str(out), "--quiet"]) == 0
    case = out / "B101"
    source = sitk.ReadImage(str(trained / "test" / "B101_img.png"))
    for name in ("itn", "onepass", "refine", "atlas"):
        img = sitk.ReadImage(str(case / f"{name}_labelmap.png"))
        assert img.GetSize() == source.GetSize()  # written on the input's own grid
        assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 255}
    disp = sitk.ReadImage(str(case / "inverse_displacement.nii.gz"))
    assert disp.GetNumberOfComponentsPerPixel() == 2 and disp.GetSize() == source.GetSize()
    assert sitk.ReadImage(str(case / "deformed_atlas_image.nii.gz")).GetSize() == source.GetSize()
    assert not list(out.glob(".*"))  # no temporary leftovers

    ev = trained / "eval"
    assert main(["evaluate", str(out), "--references", str(trained / "test"), "--reference-suffix", "_seg",
                 "--checkpoint", str(trained / "run" / "model.ckpt"), "--out", str(ev)]) == 0
    rows = list(csv.DictReader(open(ev / "metrics_per_case.csv")))
    assert {r["method"] for r in rows} == {"itn", "itn_lcc", "onepass", "refine", "atlas"}
    assert len({r["case"] for r in rows}) == 3
    assert "refine" in (ev / "summary.md").read_text()
    info = yaml.safe_load((ev / "info.yaml").read_text())
    assert info["model"] == "tiny" and info["refinement"]["iterations"] == 3  # from segment.yaml
    assert set(info["references"]) == {"B101", "B102", "B103"}

    # The report reads the evaluation folder; evaluate finds the checkpoint through segment.yaml.
    ev2 = trained / "eval_named"
    assert main(["evaluate", str(out), "--references", str(trained / "test"), "--reference-suffix", "_seg",
                 "--test-set", "corrupt", "--out", str(ev2)]) == 0
    assert yaml.safe_load((ev2 / "info.yaml").read_text())["test_set"] == "corrupt"
    assert main(["report", str(ev2), "--out", str(trained / "report"), "--bootstrap", "200"]) == 0
    md = (trained / "report" / "report.md").read_text()
    assert "Test set: corrupt" in md and "| letter | DSC" in md


def test_segment_outputs_follow_input_geometry(trained, tmp_path):
    """A NIfTI input with spacing, origin and direction: outputs carry the same geometry."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "test" / "B101_img.png"))).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 1.1))
    img.SetOrigin((10.0, -5.0))
    img.SetDirection((0.0, -1.0, 1.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "case.nii.gz"))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "case.nii.gz"), "--checkpoint", str(trained / "run" / "model.ckpt"),
                 "--out", str(out), "--quiet"]) == 0
    for name in ("refine_labelmap.nii.gz", "inverse_displacement.nii.gz", "deformed_atlas_image.nii.gz"):
        res = sitk.ReadImage(str(out / "case" / name))
        assert res.GetSize() == img.GetSize()
        assert np.allclose(res.GetSpacing(), img.GetSpacing())
        assert np.allclose(res.GetOrigin(), img.GetOrigin())
        assert np.allclose(res.GetDirection(), img.GetDirection())
    # The forward field (atlas -> subject) lives on the saved atlas's grid.
    fwd = sitk.ReadImage(str(out / "case" / "forward_displacement.nii.gz"))
    atlas = sitk.ReadImage(str(trained / "run" / "atlas" / "atlas_image.nii.gz"))
    assert fwd.GetSize() == atlas.GetSize() and np.allclose(fwd.GetOrigin(), atlas.GetOrigin())
    assert np.allclose(fwd.GetSpacing(), atlas.GetSpacing())


# ---------------------------------------------------------------- bad input (issue item 9)

def run_fails(argv, capsys, *needles):
    capsys.readouterr()  # only this call's output: earlier commands may have warned (e.g. an empty label)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("atlasreg: error:"), err
    for n in needles:
        assert n in err, err
    return err


def segment_argv(trained, inputs, out):
    return ["segment", *map(str, inputs), "--checkpoint", str(trained / "run" / "model.ckpt"), "--out", str(out),
            "--quiet"]


def run_fails_alone(argv, capsys, bad, *needles):
    """`atlasreg segment` where the input `bad` cannot be read (issue 16 item 3): exit status 1, stderr
    two lines, `atlasreg: error: <bad>: <problem>` (holding `needles`) and the summary naming the case
    manifest, which records the case as failed with that message; every other input is written.
    Returns the problem line."""
    from atlasreg.contracts import read_segment_manifest

    inputs = [a for a in argv[1:argv.index("--checkpoint")]]
    out = Path(argv[argv.index("--out") + 1])
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    manifest = out / "segment_manifest.csv"
    assert code == 1, captured.err
    assert len(lines) == 2 and lines[1] == f"atlasreg: error: 1 of {len(inputs)} cases failed, see {manifest}", lines
    assert lines[0].startswith(f"atlasreg: error: {bad}: "), lines
    for n in needles:
        assert n in lines[0], lines
    rows = read_segment_manifest(manifest)
    assert sorted((r["image"], r["status"], r["error"]) for r in rows) == sorted(
        (str(Path(i).resolve()), "failed" if Path(i) == Path(bad) else "done",
         lines[0][len("atlasreg: error: "):] if Path(i) == Path(bad) else "") for i in inputs)
    written = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert written == sorted(r["case"] for r in rows if r["status"] == "done")
    assert f"{len(inputs) - 1} case(s) written" in captured.out
    assert yaml.safe_load((out / "segment.yaml").read_text())["status"] == "complete"
    assert not list(out.glob(".*"))  # no temporary leftovers
    return lines[0]


def test_missing_file(trained, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    run_fails(segment_argv(trained, [missing], tmp_path / "o"), capsys, "nope.png", "not found")
    run_fails(["segment", str(trained / "test"), "--checkpoint", str(tmp_path / "x.ckpt"), "--out",
               str(tmp_path / "o")], capsys, "x.ckpt")


def test_an_unreadable_file_fails_alone_and_the_good_case_is_written(trained, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    good = trained / "test" / "B101_img.png"
    out = tmp_path / "o"
    run_fails_alone(segment_argv(trained, [good, bad], out), capsys, bad, "cannot read image")
    assert sorted(p.name for p in out.iterdir()) == ["B101_img", "segment.yaml", "segment_manifest.csv"]


def test_nan_intensities(trained, tmp_path, capsys):
    arr = np.random.rand(SIZE, SIZE).astype(np.float32)
    arr[3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nii.gz"))
    run_fails_alone(segment_argv(trained, [tmp_path / "nan.nii.gz"], tmp_path / "o"), capsys, tmp_path / "nan.nii.gz",
                    "NaN")


def _truncated_nifti(array, path, keep=0.5):
    """`array` written as NIfTI (`path`: .nii or .nii.gz), then cut to the fraction `keep` of its bytes
    (0.8 of a 32 x 32 labelmap: SimpleITK reads 119 of its 161 foreground voxels and zeros)."""
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_a_truncated_image_fails_alone_in_segment(trained, tmp_path, capsys, ext):
    # SimpleITK reads a half .nii.gz as a zero-filled image; segment used to accept it (issue 14). It
    # fails alone: the good case is written (issue 16 item 3).
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "test" / "B101_img.png"))).astype(np.float32)
    bad = _truncated_nifti(source, tmp_path / f"B101{ext}")
    out = tmp_path / "o"
    run_fails_alone(segment_argv(trained, [trained / "test" / "B102_img.png", bad], out), capsys, bad, "truncated")
    assert (out / "B102_img").is_dir() and not (out / "B101").exists()


def test_truncated_labelmap_is_refused_by_train(trained, tmp_path, capsys):
    folder = tmp_path / "train"
    folder.mkdir()
    for f in ("B1_img.png", "B2_img.png", "B2_seg.png"):
        (folder / f).write_bytes((trained / "train" / f).read_bytes())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "train" / "B1_seg.png")))
    bad = _truncated_nifti(labels, folder / "B1_seg.nii.gz", keep=0.8)
    out = tmp_path / "run"
    run_fails(["train", str(tiny_config(tmp_path, folder)), "--out", str(out), "--quiet"], capsys,
              f"{bad}: truncated")
    assert not out.exists()  # the folder train made is removed: it holds no checkpoint


def test_truncated_reference_is_refused_by_evaluate(trained, tmp_path, capsys):
    seg = tmp_path / "seg"
    assert main(segment_argv(trained, [trained / "test" / "B101_img.png"], seg)) == 0
    refs = tmp_path / "refs"
    refs.mkdir()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "test" / "B101_seg.png")))
    bad = _truncated_nifti(labels, refs / "B101_img.nii.gz", keep=0.8)
    out = tmp_path / "ev"
    run_fails(["evaluate", str(seg), "--references", str(refs), "--checkpoint",
               str(trained / "run" / "model.ckpt"), "--out", str(out)], capsys, f"{bad}: truncated")
    assert not out.exists()


@pytest.mark.parametrize("peak", [1e20, 3e38])
def test_extreme_intensities_segment_like_the_ordinary_image(trained, tmp_path, peak):
    # float32 intensities near 3e38 crashed `segment` (SIGSEGV in the refinement, from NaN after
    # normalisation); near 1e20 the image was normalised to a constant, with exit status 0 (issue 14).
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "test" / "B101_img.png"))).astype(np.float64)
    for name, array in (("plain", source), ("scaled", source * (peak / source.max()))):
        (tmp_path / name).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(tmp_path / name / "B101.nii.gz"))
        assert main(segment_argv(trained, [tmp_path / name / "B101.nii.gz"], tmp_path / f"{name}_out")) == 0

    def output(name, file):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}_out" / "B101" / file)))

    for labelmap in ("itn", "onepass", "refine"):
        plain, scaled = output("plain", f"{labelmap}_labelmap.nii.gz"), output("scaled", f"{labelmap}_labelmap.nii.gz")
        assert np.array_equal(plain, scaled), labelmap
        assert plain.any() or labelmap == "itn"  # the 2-epoch model's ITN finds no letter on this case
    # The refined field (mm): 1e-6 apart (round-off of the normalisation); 1.7e-3 with the float32
    # statistics at 1e20 (the image normalised to a constant).
    field = [output(name, "inverse_displacement.nii.gz") for name in ("plain", "scaled")]
    assert np.abs(field[0] - field[1]).max() < 1e-4


def test_checkpoint_with_nan_weights_is_refused_before_the_refinement(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "run" / "model.ckpt", weights_only=False)
    name = next(k for k in ckpt["state_dict"] if k.startswith("net.itn") and k.endswith("weight"))
    ckpt["state_dict"][name].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    image = trained / "test" / "B101_img.png"
    run_fails(["segment", str(image), "--checkpoint", str(tmp_path / "nan.ckpt"), "--out", str(tmp_path / "o"),
               "--quiet"], capsys, str(image), "NaN")
    assert not (tmp_path / "o" / "B101").exists()


@pytest.mark.parametrize("option, message", [
    (["--iterations", "-1"], "refinement.iterations: expected an integer >= 0, got -1"),
    (["--refine-lr", "0"], "refinement.lr: expected a number > 0, got 0"),
    (["--refine-lr", "nan"], "refinement.lr: expected a number > 0, got nan"),
    (["--lambda", "-1"], "refinement.lambda: expected a number >= 0, got -1"),
    (["--beta", "inf"], "refinement.beta: expected a number >= 0, got inf"),
    (["--cases-at-once", "0"], "refinement.cases_at_once: expected an integer >= 1, got 0"),
    (["--iterations", "abc"], "argument --iterations: invalid int value: 'abc'"),
    (["--refine-target", "softmax"], "argument --refine-target: invalid choice: 'softmax'"),
    (["--refine-structures", "some"], "argument --refine-structures: invalid choice: 'some'"),
    (["--atlas-topology", "fused"], "argument --atlas-topology: invalid choice: 'fused'"),
    (["--refine-loss", "ncc"], "argument --refine-loss: invalid choice: 'ncc'"),
    (["--refine-lr", "1e10"], "the refinement diverged"),  # valid, but Adam's steps overflow
])
def test_segment_with_a_bad_refinement_value_fails_in_one_line_and_writes_nothing(trained, tmp_path, capsys,
                                                                                  option, message):
    out = tmp_path / "o"
    run_fails(segment_argv(trained, [trained / "test" / "B101_img.png"], out) + option, capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["segment", "x.png", "--checkpoint", "m.ckpt"], "the following arguments are required: --out"),
    (["train", "c.yaml", "--out", "o", "--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["report", "ev", "--out", "r", "--bootstrap", "1.5"], "argument --bootstrap: invalid int value: '1.5'"),
    (["segmnt"], "invalid choice: 'segmnt'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    err = run_fails(argv, capsys, message)
    assert err.endswith("--help)")
    assert not any(tmp_path.iterdir())


def test_dimensionality_mismatch(trained, tmp_path, capsys):
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(4, SIZE, SIZE).astype(np.float32)),
                    str(tmp_path / "vol.nii.gz"))
    run_fails_alone(segment_argv(trained, [tmp_path / "vol.nii.gz"], tmp_path / "o"), capsys, tmp_path / "vol.nii.gz",
                    "3D")


def make_training_folder(trained, tmp_path, label_array):
    folder = tmp_path / "train"
    folder.mkdir()
    for f in ("B1_img.png", "B2_img.png", "B2_seg.png"):
        (folder / f).write_bytes((trained / "train" / f).read_bytes())
    sitk.WriteImage(sitk.GetImageFromArray(label_array), str(folder / "B1_seg.png"))
    return tiny_config(tmp_path, folder)


@pytest.mark.parametrize("label_array, needle", [
    (np.zeros((SIZE + 2, SIZE), np.uint8), "size"),                 # labelmap of another size
    (np.full((SIZE, SIZE), 7, np.uint8), "not in the declared"),     # undeclared label value
    (np.zeros((SIZE, SIZE), np.uint8), "no foreground"),             # a case with no foreground
])
def test_bad_training_labelmaps(trained, tmp_path, capsys, label_array, needle):
    config = make_training_folder(trained, tmp_path, label_array)
    out = tmp_path / "run"
    run_fails(["train", str(config), "--out", str(out), "--quiet"], capsys, "B1_seg.png", needle)
    assert not (out / "model.ckpt").exists()
    assert not out.exists()  # issue 14: early errors left empty output folders


def test_bad_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {sise: [64, 64]}\n")
    run_fails(["train", str(cfg), "--out", str(tmp_path / "o")], capsys, "model.sise")


# ---------------------------------------------------------------- 3D end to end (issue 11)

def test_train_segment_evaluate_3d_volumes_end_to_end(tmp_path, capsys):
    """Four small synthetic volumes (nested ellipsoids) with anisotropic spacing, two of them with an
    oblique, flipped header: `atlasreg train` (3D model, 2 epochs), `segment --split validation` and
    `evaluate --split validation` give a Dice per declared structure for every output."""
    from volumes import LABELS, OBLIQUE, ellipsoids, write_scan

    torch.set_num_threads(1)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, (spacing, direction) in enumerate([((0.9, 1.3, 3.5), OBLIQUE), ((1.0, 1.2, 3.0), np.eye(3)),
                                              ((0.9, 1.3, 3.5), np.eye(3)), ((1.1, 1.0, 4.0), OBLIQUE)]):
        img, lab = ellipsoids(spacing=spacing, seed=i, shift_mm=(i - 1.5, 0.5 * i, -i), radii_mm=(9.0 + i, 10.0, 13.0))
        image, label = write_scan(tmp_path / "images", f"case{i}", img, lab, spacing=spacing, direction=direction)
        label.rename(tmp_path / "labels" / f"case{i}.nii.gz")
    data = {"images": str(tmp_path / "images"), "labels": str(tmp_path / "labels")}
    cfg = {
        "name": "tiny3d",
        "data": {"train": {**data, "cases": {"fraction": [0.0, 0.75], "seed": 0}},
                 "validation": {**data, "cases": {"fraction": [0.75, 1.0], "seed": 0}},
                 "labels": LABELS, "preprocessing": {"centre": "foreground", "foreground_threshold": 130.0}},
        "model": {"ndim": 3, "size": [8, 16, 16], "spacing": [1.6, 1.6, 4.0], "itn_channels": [4, 8, 8, 8],
                  "stn_channels": [4, 4, 8]},
        "training": {"epochs": 2, "batch_size": 2, "fade_in": None, "atlas_batch_size": 4},
        "refinement": {"iterations": 3, "cases_at_once": 2},
    }
    config = tmp_path / "tiny3d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run, seg, ev = tmp_path / "run", tmp_path / "seg", tmp_path / "eval"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    atlas = sitk.ReadImage(str(run / "atlas" / "atlas_labelmap.nii.gz"))
    assert atlas.GetSize() == (16, 16, 8) and np.allclose(atlas.GetSpacing(), (1.6, 1.6, 4.0))
    ckpt = str(run / "model.ckpt")
    assert main(["segment", "--split", "validation", "--checkpoint", ckpt, "--out", str(seg), "--quiet"]) == 0
    (case,) = [p for p in seg.iterdir() if p.is_dir()]
    source = sitk.ReadImage(str(tmp_path / "images" / f"{case.name}.nii.gz"))
    refined = sitk.ReadImage(str(case / "refine_labelmap.nii.gz"))
    assert refined.GetSize() == source.GetSize() and np.allclose(refined.GetDirection(), source.GetDirection())
    assert np.allclose(refined.GetSpacing(), source.GetSpacing()) and np.allclose(refined.GetOrigin(), source.GetOrigin())
    capsys.readouterr()
    assert main(["evaluate", str(seg), "--split", "validation", "--checkpoint", ckpt, "--out", str(ev)]) == 0
    rows = list(csv.DictReader(open(ev / "metrics_per_case.csv")))
    assert {r["method"] for r in rows} == {"itn", "itn_lcc", "onepass", "refine", "atlas"}
    for method in ("itn", "onepass", "refine", "atlas"):
        mine = [r for r in rows if r["method"] == method]
        assert sorted(r["structure"] for r in mine) == sorted(list(LABELS.values())[1:]), method
        assert all(r["case"] == case.name for r in mine)
        assert all(0.0 <= float(r["dice"]) <= 1.0 for r in mine if r["dice"] != "nan"), method
    # The atlas placed on the case covers its outer structure (the grid is centred on the foreground).
    outer = next(r for r in rows if r["method"] == "atlas" and r["structure"] == "outer")
    assert float(outer["dice"]) > 0.5


# ---------------------------------------------------------------- output paths (issue 14 item 5)

@pytest.fixture(scope="module")
def outputs(trained):
    """A segment folder with two cases, its evaluation and a points CSV: inputs of every command."""
    seg, ev = trained / "paths_seg", trained / "paths_eval"
    if not seg.exists():
        images = [trained / "test" / f"B10{i}_img.png" for i in (1, 2)]
        assert main(segment_argv(trained, images, seg) + ["--iterations", "0", "--image-suffix", "_img"]) == 0
        assert main(["evaluate", str(seg), "--references", str(trained / "test"), "--reference-suffix", "_seg",
                     "--checkpoint", str(trained / "run" / "model.ckpt"), "--out", str(ev)]) == 0
        (trained / "points.csv").write_text("name,x,y\na,10.0,12.0\n")
    return trained


def command(trained, name, out):
    """A valid command line of `name` writing to `out`."""
    ckpt = str(trained / "run" / "model.ckpt")
    return {
        "train": ["train", str(trained / "tiny.yaml"), "--out", str(out), "--quiet"],
        "segment": segment_argv(trained, [trained / "test" / "B101_img.png"], out) + ["--iterations", "1"],
        "evaluate": ["evaluate", str(trained / "paths_seg"), "--references", str(trained / "test"),
                     "--reference-suffix", "_seg", "--checkpoint", ckpt, "--out", str(out)],
        "report": ["report", str(trained / "paths_eval"), "--out", str(out), "--bootstrap", "20"],
        "correspond": ["correspond", "--from", str(trained / "paths_seg" / "B101"), "--to",
                       str(trained / "paths_seg" / "B102"), "--points", str(trained / "points.csv"), "--out", str(out)],
        "register": ["register", str(trained / "test" / "B101_img.png"), str(trained / "test" / "B102_img.png"),
                     "--out", str(out), "--quiet"],
    }[name]


COMMANDS = ("train", "segment", "evaluate", "report", "correspond")


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", COMMANDS + ("register",))
def test_out_naming_a_file_or_below_a_file_is_a_one_line_error(outputs, tmp_path, capsys, name):
    folder_out = name != "correspond"  # correspond writes one file
    existing = tmp_path / ("taken.txt" if folder_out else "taken")
    if folder_out:
        existing.write_text("keep")
    else:
        existing.mkdir()
    run_fails(command(outputs, name, existing), capsys, str(existing),
              "exists and is not a folder" if folder_out else "is a folder, not a file")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run_fails(command(outputs, name, blocker / "sub" / ("o" if folder_out else "o.csv")), capsys,
              f"{blocker} is a file, not a folder")
    assert _tree(tmp_path) == ["file", existing.name] and (not folder_out or existing.read_text() == "keep")


@pytest.mark.parametrize("name", COMMANDS + ("register",))
def test_out_on_a_read_only_file_system_is_a_one_line_error(outputs, tmp_path, capsys, monkeypatch, name):
    # The tests run as root, whom permissions do not stop: os.access answers as for a read-only mount.
    import os

    readonly = tmp_path / "ro"
    readonly.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(readonly)) else real(p, mode, **kw))
    run_fails(command(outputs, name, readonly / "o.csv"), capsys, "not writable", str(readonly))
    assert _tree(tmp_path) == ["ro"]


@pytest.mark.parametrize("name", ["segment", "report", "correspond"])
def test_a_full_disk_while_writing_is_a_one_line_error(outputs, tmp_path, capsys, monkeypatch, name):
    import errno
    import os

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / ("o.csv" if name == "correspond" else "o")
    run_fails(command(outputs, name, out), capsys, "No space left on device")
    assert not [p for p in tmp_path.rglob(".tmp-*")]


@pytest.mark.parametrize("name", COMMANDS)
def test_leftovers_of_a_killed_run_are_cleaned_by_the_next_run(outputs, tmp_path, name):
    folder = tmp_path / "o"
    out = folder if name != "correspond" else folder / "o.csv"
    (folder / "sub").mkdir(parents=True)
    stale = [folder / ".tmp-0123abcd-B101", folder / "sub" / ".tmp-89abcdef-x.nii.gz",
             folder / (".tmp-00ff00ff-o.csv" if name == "correspond" else ".tmp-00ff00ff-report.md")]
    stale[0].mkdir()
    (stale[0] / "refine_labelmap.png").write_bytes(b"partial")
    for p in stale[1:]:
        p.write_bytes(b"partial")
    unrelated = folder / ".tmp-notes.txt"  # not an atomic writer's name: kept
    unrelated.write_text("mine")
    assert main(command(outputs, name, out)) == 0
    left = [p for p in stale if p.exists()]
    if name == "correspond":  # writes one file: only its own temporaries are its business
        assert left == stale[:2]
    else:
        assert left == []
    assert unrelated.read_text() == "mine"


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_segment_refuses_a_folder_of_another_run_and_overwrite_clears_it(trained, tmp_path, capsys):
    """Issue 14 item 4: segment.yaml names the run (checkpoint bytes, settings); another checkpoint or
    other settings are refused naming it, and nothing changes; the same run grows the folder;
    --overwrite deletes the other run's cases; case folders without a manifest are refused."""
    test, out = trained / "test", tmp_path / "seg"
    assert main(segment_argv(trained, [test / "B101_img.png"], out) + ["--iterations", "2", "--image-suffix", "_img"]) == 0
    info = yaml.safe_load((out / "segment.yaml").read_text())
    assert info["status"] == "complete" and info["cases"] == ["B101"] and len(info["checkpoint_sha256"]) == 64
    other = other_checkpoint(trained / "run" / "model.ckpt", tmp_path / "other.ckpt")
    before = _snapshot(out)
    run_fails(["segment", str(test / "B102_img.png"), "--checkpoint", str(other), "--out", str(out), "--quiet",
               "--iterations", "2", "--image-suffix", "_img"], capsys, f"{out / 'segment.yaml'}: holds segmentations of another run",
              "checkpoint", "--overwrite")
    run_fails(segment_argv(trained, [test / "B102_img.png"], out) + ["--iterations", "3", "--image-suffix", "_img"], capsys,
              "refinement.iterations: 2 -> 3")
    assert _snapshot(out) == before

    assert main(segment_argv(trained, [test / "B102_img.png"], out) + ["--iterations", "2", "--image-suffix", "_img"]) == 0
    assert yaml.safe_load((out / "segment.yaml").read_text())["cases"] == ["B101", "B102"]

    assert main(["segment", str(test / "B103_img.png"), "--checkpoint", str(other), "--out", str(out), "--quiet",
                 "--iterations", "2", "--overwrite", "--image-suffix", "_img"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["B103", "segment.yaml", "segment_manifest.csv"]
    assert yaml.safe_load((out / "segment.yaml").read_text())["checkpoint"] == str(other.resolve())

    (out / "segment.yaml").unlink()
    run_fails(segment_argv(trained, [test / "B101_img.png"], out), capsys,
              f"{out}: holds segmentations (B103) without segment.yaml")


def test_segment_refine_target_reaches_the_refinement_and_its_manifest(trained, tmp_path, monkeypatch):
    """--refine-target labelmap fits the atlas to the one-hot of the ITN's argmax,
    --refine-structures segmented counts only the structures it holds (models/refine.py) and
    --atlas-topology connected fits and warps the connected atlas (atlas_topology.py), --refine-loss
    reaches the manifest; segment.yaml
    records the settings, and the config's values (the paper's logits, all structures) are the defaults."""
    import atlasreg.models.refine as refine

    seen, counted = [], []
    original, segmented = refine.refinement_target, refine.segmented_structures
    monkeypatch.setattr(refine, "refinement_target", lambda logits, target: seen.append(target) or original(logits, target))
    monkeypatch.setattr(refine, "segmented_structures",
                        lambda logits, mask=None: counted.append(1) or segmented(logits, mask))
    test = trained / "test"
    for target, out in (("labelmap", tmp_path / "a"), (None, tmp_path / "b")):
        extra = ["--refine-target", target, "--refine-structures", "segmented", "--atlas-topology",
                 "connected", "--refine-loss", "dice"] if target else []
        assert main(segment_argv(trained, [test / "B101_img.png"], out) + ["--iterations", "1", "--image-suffix",
                                                                          "_img"] + extra) == 0
        info = yaml.safe_load((out / "segment.yaml").read_text())
        assert info["refinement"]["target"] == (target or "logits")
        assert info["refinement"]["structures"] == ("segmented" if target else "all")
        assert info["refinement"]["atlas_topology"] == ("connected" if target else "none")
        assert info["refinement"]["label_loss"] == ("dice" if target else "mse")
    assert seen == ["labelmap", "logits"]
    # with the connected atlas every structure of every labelmap warped from it is one component
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case_labelmap_path(tmp_path / "a" / "B101", "refine", ".png"))))
    for value in np.unique(labels)[1:]:
        assert ndimage.label(labels == value, np.ones((3, 3)))[1] == 1
    assert counted == [1]
    # A manifest of an older atlasreg, written before refinement.target and .structures existed, is
    # the same run: continued (its case skipped), not refused as another run's settings.
    info["refinement"].pop("target")
    info["refinement"].pop("structures")
    info["refinement"].pop("atlas_topology")
    info["refinement"].pop("label_loss")
    (tmp_path / "b" / "segment.yaml").write_text(yaml.safe_dump(info))
    assert main(segment_argv(trained, [test / "B101_img.png"], tmp_path / "b") + ["--iterations", "1",
                                                                                 "--image-suffix", "_img"]) == 0
    assert seen == ["labelmap", "logits"]


def test_evaluate_refuses_an_interrupted_or_mixed_segmentation_run(trained, tmp_path, capsys, monkeypatch):
    """Issue 14 item 4: a segment run interrupted after its first case stays marked in progress, and
    evaluate refuses it; rerunning the same command completes it; a case folder the manifest does not
    list (another run's) is refused by evaluate too."""
    import shutil

    import atlasreg.segment as segment_module

    test, out = trained / "test", tmp_path / "seg"
    write = segment_module.write_outputs  # a case folder's files
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(segment_module, "write_outputs", interrupted)
    argv = segment_argv(trained, [test], out) + ["--image-suffix", "_img", "--iterations", "2", "--cases-at-once", "1"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "atlasreg: interrupted"
    assert (out / "B101").is_dir() and not (out / "B102").exists()
    assert yaml.safe_load((out / "segment.yaml").read_text())["status"] == "in_progress"
    evaluate = ["evaluate", str(out), "--references", str(test), "--reference-suffix", "_seg", "--checkpoint",
                str(trained / "run" / "model.ckpt"), "--out", str(tmp_path / "ev")]
    run_fails(evaluate, capsys, f"{out / 'segment.yaml'}: the segmentation run is incomplete")
    assert not (tmp_path / "ev").exists()

    monkeypatch.setattr(segment_module, "write_outputs", write)
    assert main(argv) == 0
    assert yaml.safe_load((out / "segment.yaml").read_text())["status"] == "complete"
    assert main(evaluate) == 0

    shutil.copytree(out / "B101", out / "B999")
    run_fails(evaluate + ["--overwrite"], capsys, f"{out}: holds 1 case folder(s) its segmentation run did not write (B999")


def _same_case_files(a, b):
    """The files under folders `a` and `b`: the same names and bytes; the ITK .h5 transforms (HDF5 stores
    the time each object was written) the same transforms, parameters bit for bit."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in names:
        if name.endswith(".h5"):
            ta, tb = (sitk.CompositeTransform(sitk.ReadTransform(str(f / name))) for f in (a, b))
            assert ta.GetNumberOfTransforms() == tb.GetNumberOfTransforms() == 2, name
            for i in range(2):
                x, y = ta.GetNthTransform(i), tb.GetNthTransform(i)
                assert (x.GetName(), x.GetParameters(), x.GetFixedParameters()) == \
                    (y.GetName(), y.GetParameters(), y.GetFixedParameters()), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


@pytest.fixture(scope="module")
def many(trained):
    """Five test images (B201-B205) and their segmentation by one unsplit run, batches of 2 cases."""
    write_letter_b_dataset(trained / "many", 5, seed=4, start_index=201, size=SIZE, corrupt=True)
    out = trained / "many_whole"
    assert main(_many_argv(trained, out)) == 0
    return trained


def _many_argv(trained, out, *extra):
    return segment_argv(trained, [trained / "many"], out) + ["--image-suffix", "_img", "--iterations", "40",
                                                               "--cases-at-once", "2", *extra]


def _case_dirs(out):
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_two_parts_write_the_files_of_one_run_and_complete_it_together(many, tmp_path, capsys):
    """Issue 16 item 3: --num-parts 2 --part-id I into one folder; the parts take the batches of
    --cases-at-once alternately (B201-B202, B205 and B203-B204), write exactly the files of the unsplit
    run (read with 0 or 2 worker processes), and the folder is complete, for evaluate too, only when both
    have finished."""
    from atlasreg.contracts import read_segment_manifest

    out = tmp_path / "parts"
    evaluate = ["evaluate", str(out), "--references", str(many / "many"), "--reference-suffix", "_seg",
                "--checkpoint", str(many / "run" / "model.ckpt"), "--out", str(tmp_path / "ev")]
    assert main(_many_argv(many, out, "--num-parts", "2", "--part-id", "1", "--num-workers", "0")) == 0
    assert _case_dirs(out) == ["B203", "B204"]
    info = yaml.safe_load((out / "segment.yaml").read_text())
    assert info["status"] == "in_progress" and info["parts"] == 2 and len(info["cases"]) == 5
    run_fails(evaluate, capsys, f"{out / 'segment.yaml'}: the segmentation run is incomplete",
              "part(s) 0 of 2 have not finished")
    assert main(_many_argv(many, out, "--num-parts", "2", "--part-id", "0", "--num-workers", "2")) == 0
    assert _case_dirs(out) == ["B201", "B202", "B203", "B204", "B205"]
    assert yaml.safe_load((out / "segment.yaml").read_text())["status"] == "complete"
    for part, cases in ((0, ["B201", "B202", "B205"]), (1, ["B203", "B204"])):
        rows = read_segment_manifest(out / f"segment_manifest.part-{part}-of-2.csv")
        assert [(r["case"], r["status"]) for r in rows] == [(c, "done") for c in cases]
        assert yaml.safe_load((out / f"segment.part-{part}-of-2.yaml").read_text()) == \
            {"part": part, "parts": 2, "status": "complete"}
    for case in _case_dirs(out):
        _same_case_files(many / "many_whole" / case, out / case)
    capsys.readouterr()
    assert main(evaluate) == 0
    assert "parts" not in yaml.safe_load((tmp_path / "ev" / "info.yaml").read_text())
    # a part id out of range: one line, before anything is read or written
    run_fails(_many_argv(many, tmp_path / "none", "--num-parts", "2", "--part-id", "2"), capsys,
              "--part-id 2: expected an integer with 0 <= part id < --num-parts (2)")
    assert not (tmp_path / "none").exists()


def test_devices_2_runs_two_parts_as_child_processes(many, tmp_path, monkeypatch, capsys):
    """Issue 16 item 3: `segment --devices 2` starts two child processes, parts 0 and 1 of 2, at once
    into one folder (the first claims it before the second starts), shows one line of cases written and
    ends complete with exactly the files of the unsplit run. The children run with OMP_NUM_THREADS=1
    each, here as the unsplit run (torch.set_num_threads(1) below: a convolution's result may depend on
    the thread count)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import atlasreg

    monkeypatch.setenv("PYTHONPATH", str(Path(atlasreg.__file__).parents[1]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "devices"
    done = subprocess.run([sys.executable, "-m", "atlasreg", *_many_argv(many, out, "--devices", "2", "--quiet")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"5 case(s) written to {out}"
    assert yaml.safe_load((out / "segment.yaml").read_text())["status"] == "complete"
    assert sorted(p.name for p in out.glob("segment.part-*")) == ["segment.part-0-of-2.yaml", "segment.part-1-of-2.yaml"]
    for case in _case_dirs(out):
        _same_case_files(many / "many_whole" / case, out / case)


def test_under_torchrun_each_rank_takes_its_part(many, tmp_path, monkeypatch):
    """Issue 16 item 3: started by torchrun (RANK, WORLD_SIZE) without --num-parts, `segment` runs the
    part of its rank: rank 1 of 2 writes B203-B204, as --num-parts 2 --part-id 1 does."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "rank1"
    assert main(_many_argv(many, out, "--num-workers", "0")) == 0
    assert _case_dirs(out) == ["B203", "B204"]
    assert (out / "segment.part-1-of-2.yaml").is_file() and not (out / "segment.part-0-of-2.yaml").exists()


def test_a_run_killed_with_sigkill_resumes_to_the_files_of_an_uninterrupted_run(many, tmp_path, capsys):
    """Issue 16 items 3 and 5: `atlasreg segment` killed with SIGKILL once its first case folder is
    written, then run again: it skips the complete cases, computes the batches holding a missing case
    again and writes those cases only; every file equals the uninterrupted run's, and no temporary
    entry is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import atlasreg
    from atlasreg.contracts import read_segment_manifest

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(atlasreg.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "atlasreg.cli", *_many_argv(many, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (out.is_dir() and _case_dirs(out)):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed = _case_dirs(out)
    assert 1 <= len(killed) < 5, killed
    assert yaml.safe_load((out / "segment.yaml").read_text())["status"] == "in_progress"
    assert {r["case"] for r in read_segment_manifest(out / "segment_manifest.csv")} <= set(killed)

    capsys.readouterr()
    assert main(_many_argv(many, out)) == 0  # in this process: one interpreter start less
    printed = capsys.readouterr().out
    rows = read_segment_manifest(out / "segment_manifest.csv")
    assert sorted(r["case"] for r in rows if r["status"] == "skipped") == killed
    assert sorted(r["case"] for r in rows if r["status"] == "done") == sorted(set(_case_dirs(out)) - set(killed))
    assert f"{5 - len(killed)} case(s) written to {out}, {len(killed)} skipped" in printed
    assert yaml.safe_load((out / "segment.yaml").read_text()) == yaml.safe_load((many / "many_whole" / "segment.yaml").read_text())
    assert not [p for p in out.rglob(".*")]  # no temporary leftovers
    for case in _case_dirs(many / "many_whole"):
        _same_case_files(many / "many_whole" / case, out / case)
    assert _case_dirs(out) == _case_dirs(many / "many_whole")


def test_evaluate_and_report_refuse_an_output_of_other_inputs(trained, tmp_path, capsys):
    """Issue 14 item 4: evaluate into a folder holding the evaluation of other predictions, and report
    into a folder holding a report of other evaluations, are refused naming the manifest; --overwrite
    replaces them; a report rerun leaves no figure of the earlier report."""
    test = trained / "test"
    evs = []
    for name in ("a", "b"):
        seg = tmp_path / f"seg_{name}"
        assert main(segment_argv(trained, [test / "B101_img.png", test / "B102_img.png"], seg)
                    + ["--iterations", "1", "--image-suffix", "_img"]) == 0
        evs.append(["evaluate", str(seg), "--references", str(test), "--reference-suffix", "_seg", "--checkpoint",
                    str(trained / "run" / "model.ckpt"), "--out", str(tmp_path / "ev")])
    assert main(evs[0]) == 0
    before = _snapshot(tmp_path / "ev")
    run_fails(evs[1], capsys, f"{tmp_path / 'ev' / 'info.yaml'}: holds an evaluation of another run",
              f"predictions: {tmp_path / 'seg_a'} -> {tmp_path / 'seg_b'}")
    assert _snapshot(tmp_path / "ev") == before
    assert main(evs[1] + ["--overwrite"]) == 0
    assert yaml.safe_load((tmp_path / "ev" / "info.yaml").read_text())["predictions"] == str(tmp_path / "seg_b")

    report = ["report", str(tmp_path / "ev"), "--out", str(tmp_path / "report"), "--bootstrap", "50"]
    assert main(report) == 0
    (tmp_path / "report" / "figures" / "figure99.png").write_bytes(b"stale")
    assert main(report) == 0
    assert "figure99.png" not in {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert main(evs[0][:-1] + [str(tmp_path / "ev_a")]) == 0
    other = ["report", str(tmp_path / "ev_a"), "--out", str(tmp_path / "report"), "--bootstrap", "50"]
    run_fails(other, capsys, f"{tmp_path / 'report' / 'report.yaml'}: holds a report of another run", "evaluations")
    assert main(other + ["--overwrite"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["letter-b", "--out", "{file}/sub", "--n", "2"], "{file}/sub: cannot be created: {file} is a file, not a folder"),
    (["letter-b", "--out", "{file}"], "{file}: exists and is not a folder"),
    (["demo", "--out", "{file}", "--epochs", "1"], "{file}: exists and is not a folder"),
    (["letter-b", "--out", "{tmp}/lb", "--n", "0"], "argument --n: expected an integer >= 1, got 0"),
    (["letter-b", "--out", "{tmp}/lb", "--n", "-3"], "argument --n: expected an integer >= 1, got -3"),
    (["demo", "--out", "{tmp}/demo", "--train-cases", "0"], "argument --train-cases: expected an integer >= 1"),
])
def test_letter_b_and_demo_check_their_arguments_before_writing(tmp_path, capsys, argv, message):
    """Issue 14 item 5 for the two generating commands: a bad --out or count is one line, status 2,
    and nothing is created (was: a traceback for --n -3, and data written before a bad --out failed)."""
    (tmp_path / "file").write_text("keep")
    fill = {"file": str(tmp_path / "file"), "tmp": str(tmp_path)}
    run_fails([a.format(**fill) for a in argv], capsys, message.format(**fill))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "keep"


# ------------------------------------------------------------------------- --help, --version, options


def test_the_parser_help_and_version_import_no_heavy_module():
    """`atlasreg --help` answers at once: building the parser, --version and every command's --help
    import neither torch nor SimpleITK, numpy or the other heavy libraries (checked in a fresh
    interpreter, not by timing)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import atlasreg

    script = (
        "import contextlib, io, sys\n"
        "from atlasreg.cli import build_parser, main\n"
        "build_parser()\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    codes = [main(['--version'])] + [main([c, '--help']) for c in ('train', 'segment', 'evaluate',\n"
        "             'correspond', 'register', 'report', 'letter-b', 'demo', 'deepatlas')] + [main(['--help'])]\n"
        "    codes += [main(['deepatlas', c, '--help']) for c in ('pretrain', 'template', 'propagate', 'crop')]\n"
        "heavy = ('torch', 'numpy', 'SimpleITK', 'scipy', 'nibabel', 'monai', 'lightning', 'matplotlib')\n"
        "print(codes, sorted(m for m in heavy if m in sys.modules), out.getvalue().splitlines()[0])\n")
    src = str(Path(atlasreg.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{[0] * 15} [] atlasreg {atlasreg.__version__}"


def test_version(capsys):
    import atlasreg

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"atlasreg {atlasreg.__version__}\n"


def _commands():
    import argparse

    from atlasreg.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub


def test_every_option_of_every_command_has_help_and_its_default_shown():
    import argparse

    parser, sub = _commands()
    assert set(sub.choices) == {"train", "segment", "evaluate", "correspond", "register", "register-to-atlas",
                                "report", "letter-b", "demo", "deepatlas"}
    assert all(c.help and c.help.strip() for c in sub._choices_actions)  # the list in `atlasreg --help`
    (steps,) = [a for a in sub.choices["deepatlas"]._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(steps.choices) == {"pretrain", "template", "propagate", "crop"}
    assert all(c.help and c.help.strip() for c in steps._choices_actions)
    nested = [(f"deepatlas {name}", command) for name, command in steps.choices.items()]
    for name, command in [("atlasreg", parser), *sub.choices.items(), *nested]:
        text = " ".join(command.format_help().split())  # words, without argparse's wrapping
        for action in command._actions:
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{what} has no help"
            if action.default not in (None, False, "", [], argparse.SUPPRESS):
                assert f"default: {action.default}" in text, f"{what}: its default {action.default!r} is not shown"


def test_the_correspond_parser_is_the_command_lines(tmp_path):
    """atlasreg.correspondence.add_correspond_parser (public) adds the same command as `atlasreg`'s."""
    import argparse

    from atlasreg.correspondence import add_correspond_parser

    own = argparse.ArgumentParser(prog="atlasreg")
    added = add_correspond_parser(own.add_subparsers(dest="command"))
    _, sub = _commands()
    assert [a.option_strings for a in added._actions] == [a.option_strings for a in sub.choices["correspond"]._actions]
    args = own.parse_args(["correspond", "--from", "a", "--to", "b", "--points", "p.csv", "--out", "o.csv"])
    assert (args.from_case, args.to_case, args.points, args.interpolation) == ("a", "b", "p.csv", "linear")


def test_segment_leaves_out_the_labelmaps_of_a_folder_as_the_config_names_them(trained, tmp_path, capsys):
    out = tmp_path / "seg"
    with pytest.warns(UserWarning, match=r"3 file\(s\) named as the labelmaps of the checkpoint's config "
                                         r"\(\*_seg\) left out, 3 image\(s\) taken; --image-suffix _img names"):
        assert main(segment_argv(trained, [trained / "test"], out) + ["--iterations", "0"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["B101_img", "B102_img", "B103_img"]
    assert "3 case(s) written" in capsys.readouterr().out


def _console_run(config, out, *extra):
    """`atlasreg train` in a process of its own, as a user runs it: (stdout, stderr)."""
    import subprocess
    import sys
    from pathlib import Path

    import atlasreg

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(atlasreg.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-m", "atlasreg.cli", "train", str(config), "--out", str(out), *extra],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout, res.stderr


def test_train_console_shows_a_progress_bar_and_one_line_per_epoch_and_quiet_less(trained, tmp_path):
    """Issue 13 item 1: by default a progress bar (stderr) with the running losses and the epoch's time,
    and one summary line per epoch (stdout, with the validation figures where a pass ran); --quiet
    the summary lines without the bar; neither shows Lightning's banners, tips or library warnings
    with paths into site-packages, and a warning of atlasreg's shows in one line."""
    import shutil

    shutil.copytree(trained / "train", tmp_path / "train")
    constant = sitk.ReadImage(str(tmp_path / "train" / "B1_img.png"))
    flat = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(constant).shape, 7, np.uint8))
    flat.CopyInformation(constant)
    sitk.WriteImage(flat, str(tmp_path / "train" / "B1_img.png"))  # warns: constant intensity
    write_letter_b_dataset(tmp_path / "val", 2, seed=2, start_index=201, size=SIZE)
    cfg = yaml.safe_load(tiny_config(tmp_path, tmp_path / "train").read_text())
    cfg["data"]["validation"] = {"images": str(tmp_path / "val"), "image_suffix": "_img", "label_suffix": "_seg"}
    config = tmp_path / "console.yaml"
    config.write_text(yaml.safe_dump(cfg))

    shown = {"default": _console_run(config, tmp_path / "default"),
             "quiet": _console_run(config, tmp_path / "quiet", "--quiet")}
    for name, (out, err) in shown.items():
        for banned in ("Tip", "GPU available", "TPU", "site-packages", "litlogger", "v_num", "weights_only",
                       "Trainer.fit", "LeafSpec", "logging interval", "Warning:", "Traceback"):
            assert banned not in out + err, (name, banned)
        lines = out.splitlines()
        assert len(lines) == 4, (name, out)
        assert lines[0].startswith("epoch    0  loss ") and "  train " in lines[0] and "val" not in lines[0]
        assert lines[1].startswith("epoch    1  loss ")  # the last epoch: a validation pass (with refine)
        assert " val " in lines[1] and " dice itn " in lines[1] and " 1-pass " in lines[1] and " refine " in lines[1]
        assert lines[2:] == [f"model: {tmp_path / name / 'model.ckpt'}", f"atlas: {tmp_path / name / 'atlas'}"]
        warned = [line for line in err.replace("\r", "\n").splitlines() if "warning" in line]
        assert warned == [f"atlasreg: warning: {tmp_path / 'train' / 'B1_img.png'}: constant intensity 7: "
                          "normalised to zeros"], (name, warned)
    default_err, quiet_err = shown["default"][1], shown["quiet"][1]
    assert "Epoch 1: 100%" in default_err and "loss=" in default_err and "reg=" in default_err
    assert "Epoch" not in quiet_err and "loss=" not in quiet_err
    assert len("".join(shown["quiet"])) < len("".join(shown["default"]))


def test_command_line_warnings_show_once_in_one_line(capsys):
    """Each distinct warning once, in one line without the file and line that warned."""
    from atlasreg.cli import _SHOWN_WARNINGS, _show_warning

    _SHOWN_WARNINGS.clear()
    capsys.readouterr()
    for lineno in (1, 2):
        _show_warning(UserWarning("deprecated:\n  use\tthat instead"), UserWarning,
                      "/usr/lib/python3/site-packages/lib/mod.py", lineno)
    _show_warning("another", RuntimeWarning, "/x.py", 3)
    assert capsys.readouterr().err == ("atlasreg: warning: deprecated: use that instead\n"
                                       "atlasreg: warning: another\n")


def test_merge_option_takes_several_targets_separated_or_repeated():
    from atlasreg.cli import _parse_merge
    from atlasreg.errors import AtlasregError

    assert _parse_merge(None) is None and _parse_merge([]) is None
    assert _parse_merge(["255=1,2"]) == {255: [1, 2]}
    assert _parse_merge(["101=1,21;102=2,22"]) == _parse_merge(["101=1,21", "102=2,22"]) == {101: [1, 21],
                                                                                            102: [2, 22]}
    with pytest.raises(AtlasregError, match="target 101 is given twice"):
        _parse_merge(["101=1,21", "101=2"])
    with pytest.raises(AtlasregError, match="'102=b'"):
        _parse_merge(["101=1;102=b"])
