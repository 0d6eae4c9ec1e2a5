"""Bad inputs of the five commands (train, segment, evaluate, report, correspond), one row each, and the
harness that runs a row and says what it left behind (issue 14 acceptance).

A row is (command, input, build): `build(material, folder)` writes the bad input into the row's own
`folder` and returns the command line and what the message must name (the offending file, folder or
key). :func:`run_row` runs ``atlasreg.cli.main`` in-process with `folder` as the working directory,
captures stdout and stderr at the file-descriptor level (what SimpleITK or ITK print in C++ too) and
the warnings a command line would print, and compares every file under `folder` and under the shared
material before and after. :func:`problems` lists what a row did wrong: an exit status other than 2,
stderr other than one line ``atlasreg: error: ...`` naming the row's file or key, a traceback, a file
or folder created, changed or removed (for a fresh --out: nothing at all; for an existing --out:
nothing added or changed), a ``.tmp-`` entry left.

Used by tests/test_bad_inputs.py (one test per row) and benchmarks/bad_inputs.py (the table of
docs/results.md). Valid material is built once by :func:`make_material`: a tiny Letter-B data set, a
one-epoch 2-D model, a segmentation of two cases (transforms for correspond), their evaluation and a
points CSV.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import yaml

SIZE = 32  # Letter-B images of the material: 32 x 32 pixels

#: What a real command line shows of warnings: Python's default filters (DeprecationWarning and
#: friends ignored outside __main__).
_IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


# ---------------------------------------------------------------------------------------- material

@dataclass
class Material:
    """Valid inputs every row starts from (built once, never changed by a row)."""

    root: Path
    train: Path        # B1..B4 _img.png / _seg.png
    test: Path         # B101, B102 _img.png / _seg.png
    config: Path       # tiny 2-D config, training on `train`
    checkpoint: Path   # run/model.ckpt (one epoch)
    seg: Path          # `atlasreg segment` of B101, B102 (case folders with transforms)
    evaluation: Path   # `atlasreg evaluate` of seg
    points: Path       # points.csv: two 2-D world points

    @property
    def image(self) -> Path:
        return self.test / "B101_img.png"


def tiny_config(folder: Path, train_dir: Path, name: str = "tiny.yaml", **sections) -> Path:
    """A tiny 2-D config training on `train_dir` (one epoch); `sections` replace or add top-level
    entries as they are (e.g. an unknown key)."""
    cfg = {
        "name": "tiny",
        "data": {"train": {"images": str(train_dir), "image_suffix": "_img", "label_suffix": "_seg"},
                 "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0], "cache": False},
        "model": {"ndim": 2, "size": [16, 16], "spacing": [2.0, 2.0], "itn_channels": [4, 8, 8, 8],
                  "stn_channels": [4, 4, 8]},
        "training": {"epochs": 1, "batch_size": 4, "fade_in": None, "atlas_batch_size": 4},
        "refinement": {"iterations": 1, "cases_at_once": 2},
    }
    cfg.update(sections)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_material(root: Path) -> Material:
    """Train once (one epoch on four 32 x 32 cases), segment two cases, evaluate them."""
    import torch

    from atlasreg.cli import main
    from atlasreg.data.letter_b import write_letter_b_dataset

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    write_letter_b_dataset(root / "train", 4, seed=0, size=SIZE)
    write_letter_b_dataset(root / "test", 2, seed=1, start_index=101, size=SIZE)
    config = tiny_config(root, root / "train")
    ckpt = root / "run" / "model.ckpt"
    commands = [
        ["train", str(config), "--out", str(root / "run"), "--quiet"],
        ["segment", str(root / "test"), "--image-suffix", "_img", "--checkpoint", str(ckpt), "--out",
         str(root / "seg"), "--iterations", "0", "--quiet"],
        ["evaluate", str(root / "seg"), "--references", str(root / "test"), "--reference-suffix", "_seg",
         "--checkpoint", str(ckpt), "--out", str(root / "eval")]]
    for argv in commands:
        with _captured() as text, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-epoch model's empty structures
            status = main(argv)
        assert status == 0, f"{argv[0]} of the material: {text['err']}"
    points = root / "points.csv"
    points.write_text("name,x,y\napex,10.0,12.0\nbase,14.5,9.0\n")
    return Material(root, root / "train", root / "test", config, ckpt, root / "seg", root / "eval", points)


# ----------------------------------------------------------------------------------------- writers

def write_array(array, path: Path, spacing=None, origin=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array))
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def training_folder(m: Material, d: Path, bad: str | None = None, write=None) -> Path:
    """A copy of the training images in `d/train`; case B1's file `bad` (e.g. 'B1_seg.nii.gz') written
    by `write(path)` in place of its PNG."""
    folder = copy_tree(m.train, d / "train")
    if bad:
        stem = bad.split(".")[0]
        (folder / f"{stem}.png").unlink()
        write(folder / bad)
    return folder


def image_array(m: Material) -> np.ndarray:
    return read_array(m.image).astype(np.float32)


def labels_array(m: Material, case: str = "B1", folder: Path | None = None) -> np.ndarray:
    return read_array((folder or m.train) / f"{case}_seg.png")


# --------------------------------------------------------------------------------------- commands

def train_argv(config: Path, out: Path, *extra) -> list[str]:
    return ["train", str(config), "--out", str(out), "--quiet", *extra]


def segment_argv(m: Material, inputs, out: Path, *extra, checkpoint=None) -> list[str]:
    return ["segment", *map(str, inputs), "--checkpoint", str(checkpoint or m.checkpoint), "--out", str(out),
            "--quiet", "--iterations", "1", *extra]


def evaluate_argv(m: Material, out: Path, predictions=None, references=None, *extra,
                  checkpoint=None) -> list[str]:
    return ["evaluate", str(predictions or m.seg), "--references", str(references or m.test),
            "--reference-suffix", "_seg", "--checkpoint", str(checkpoint or m.checkpoint), "--out", str(out),
            *extra]


def report_argv(evaluations, out: Path, *extra) -> list[str]:
    return ["report", *map(str, evaluations), "--out", str(out), "--bootstrap", "50", *extra]


def correspond_argv(m: Material, out: Path, a=None, b=None, points=None, *extra) -> list[str]:
    what = ["--points", str(points or m.points)] if not extra or "--labelmap" not in extra else []
    return ["correspond", "--from", str(a or m.seg / "B101"), "--to", str(b or m.seg / "B102"), *what,
            "--out", str(out), *extra]


# --------------------------------------------------------------------------------------------- rows

Build = Callable[[Material, Path], tuple[list[str], str]]


@dataclass(frozen=True)
class Row:
    command: str
    input: str
    build: Build
    #: a defect in a file another engineer is editing: the reason (the test is xfail(strict=True))
    defect: str | None = None
    #: `segment` rows whose bad input fails alone (issue 16 item 3): the case folders the run must write
    #: besides (the good inputs); None: a row of the one-line, status-2, nothing-left kind
    fails_alone: tuple[str, ...] | None = None

    @property
    def id(self) -> str:
        return f"{self.command}: {self.input}"


ROWS: list[Row] = []


def row(command: str, text: str, defect: str | None = None, fails_alone: tuple[str, ...] | None = None):
    def add(build: Build) -> Build:
        ROWS.append(Row(command, text, build, defect, fails_alone))
        return build
    return add


def case_row(text: str, *written: str):
    """A `segment` row whose bad input fails alone (issue 16 item 3: one unreadable scan does not stop a
    batch): exit status 1, its line `atlasreg: error: <file>: <problem>` and the summary line, the
    case recorded as failed in the case manifest with that message, the cases `written` (the good
    inputs) written, nothing else created or changed but the run's manifests (:func:`problems`)."""
    return row("segment", text, fails_alone=written)


def _nan_image(m, path, value=np.nan):
    a = image_array(m)
    a[3, 4] = value
    return write_array(a, path)


# ------------------------------------------------------------------------------------------- train

@row("train", "config file missing")
def _(m, d):
    return train_argv(d / "none.yaml", d / "run"), "none.yaml"


@row("train", "config file empty (0 bytes)")
def _(m, d):
    (d / "empty.yaml").write_text("")
    return train_argv(d / "empty.yaml", d / "run"), "data.labels"


@row("train", "config not YAML")
def _(m, d):
    (d / "bad.yaml").write_text("model: [size: {\n")
    return train_argv(d / "bad.yaml", d / "run"), "bad.yaml"


@row("train", "config is a YAML list")
def _(m, d):
    (d / "list.yaml").write_text("- model\n- data\n")
    return train_argv(d / "list.yaml", d / "run"), "list.yaml"


@row("train", "unknown config key model.sise")
def _(m, d):
    config = tiny_config(d, m.train, model={"ndim": 2, "sise": [16, 16]})
    return train_argv(config, d / "run"), "model.sise"


@row("train", "unknown top-level config key trainng")
def _(m, d):
    config = tiny_config(d, m.train, trainng={"epochs": 1})
    return train_argv(config, d / "run"), "trainng"


@row("train", "--set training.epochs=abc")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.epochs=abc"), "training.epochs"


@row("train", "--set training.epochs=-1")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.epochs=-1"), "training.epochs"


@row("train", "--set training.batch_size=0")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.batch_size=0"), "training.batch_size"


@row("train", "--set training.lr=fast")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.lr=fast"), "training.lr"


@row("train", "--set training.lambda=abc")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.lambda=abc"), "training.lambda"


@row("train", "--set without '=' (training.epochs)")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.epochs"), "training.epochs"


@row("train", "--set training.lr=nan")
def _(m, d):
    return train_argv(m.config, d / "run", "--set", "training.lr=nan"), "training.lr"


@row("train", "--epochs 0")
def _(m, d):
    return train_argv(m.config, d / "run", "--epochs", "0"), "training.epochs"


@row("train", "training folder missing")
def _(m, d):
    return train_argv(tiny_config(d, d / "nowhere"), d / "run"), "nowhere"


@row("train", "training folder holds no images")
def _(m, d):
    (d / "empty").mkdir()
    return train_argv(tiny_config(d, d / "empty"), d / "run"), "empty"


@row("train", "training image empty (0 bytes .nii.gz)")
def _(m, d):
    folder = training_folder(m, d, "B1_img.nii.gz", lambda p: p.write_bytes(b""))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_img.nii.gz"


@row("train", "training labelmap truncated (half the bytes of a .nii.gz)")
def _(m, d):
    folder = training_folder(m, d, "B1_seg.nii.gz",
                             lambda p: truncate(write_array(labels_array(m), p)))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.nii.gz"


@row("train", "training image corrupt (PNG signature, garbage)")
def _(m, d):
    folder = training_folder(m, d, "B1_img.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_img.png"


@row("train", "training image with a NaN voxel")
def _(m, d):
    a = read_array(m.train / "B1_img.png").astype(np.float32)
    a[5, 5] = np.nan
    folder = training_folder(m, d, "B1_img.nii.gz", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_img.nii.gz"


@row("train", "training image with an infinite voxel")
def _(m, d):
    a = read_array(m.train / "B1_img.png").astype(np.float32)
    a[5, 5] = np.inf
    folder = training_folder(m, d, "B1_img.nii.gz", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_img.nii.gz"


@row("train", "training labelmap with value 7 (not declared)")
def _(m, d):
    a = labels_array(m)
    a[a == 255] = 7
    folder = training_folder(m, d, "B1_seg.png", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.png"


@row("train", "training labelmap of float 1e20 where the letter is")
def _(m, d):
    a = labels_array(m).astype(np.float32)
    a[a == 255] = 1e20
    folder = training_folder(m, d, "B1_seg.nii.gz", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.nii.gz"


@row("train", "training labelmap 34 x 32 (image 32 x 32)")
def _(m, d):
    folder = training_folder(m, d, "B1_seg.png",
                             lambda p: write_array(np.zeros((SIZE + 2, SIZE), np.uint8), p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.png"


@row("train", "training labelmap with another spacing than its image")
def _(m, d):
    folder = training_folder(m, d, "B1_seg.nii.gz",
                             lambda p: write_array(labels_array(m), p, spacing=(2.0, 2.0)))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.nii.gz"


@row("train", "training image 3-D (4 x 32 x 32) for a 2-D model")
def _(m, d):
    a = np.repeat(read_array(m.train / "B1_img.png")[None], 4, 0).astype(np.float32)
    folder = training_folder(m, d, "B1_img.nii.gz", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_img.nii.gz"


@row("train", "config model.size [12, 12] (not divisible by 8)")
def _(m, d):
    config = tiny_config(d, m.train, model={"ndim": 2, "size": [12, 12]})
    return train_argv(config, d / "run"), "model.size"


@row("train", "config with no declared labels")
def _(m, d):
    config = tiny_config(d, m.train, data={"train": {"images": str(m.train)}, "labels": {}})
    return train_argv(config, d / "run"), "data.labels"


@row("train", "config base: a missing file")
def _(m, d):
    (d / "child.yaml").write_text("base: parent.yaml\n")
    return train_argv(d / "child.yaml", d / "run"), "parent.yaml"


@row("train", "training labelmap with a NaN voxel")
def _(m, d):
    a = labels_array(m).astype(np.float32)
    a[0, 0] = np.nan
    folder = training_folder(m, d, "B1_seg.nii.gz", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.nii.gz"


@row("train", "--out an existing file")
def _(m, d):
    (d / "run").write_text("keep")
    return train_argv(m.config, d / "run"), str(d / "run")


@row("train", "--out below a file")
def _(m, d):
    (d / "file").write_text("keep")
    return train_argv(m.config, d / "file" / "run"), str(d / "file")


@row("train", "existing --out folder, training labelmap with value 7")
def _(m, d):
    (d / "run").mkdir()
    (d / "run" / "notes.txt").write_text("mine")
    a = labels_array(m)
    a[a == 255] = 7
    folder = training_folder(m, d, "B1_seg.png", lambda p: write_array(a, p))
    return train_argv(tiny_config(d, folder), d / "run"), "B1_seg.png"


@row("train", "--out holds a run with another config (--set training.lambda=0.5)")
def _(m, d):
    run = copy_tree(m.checkpoint.parent, d / "run")
    return train_argv(m.config, run, "--set", "training.lambda=0.5"), "training.lambda"


# ----------------------------------------------------------------------------------------- segment

@row("segment", "image missing")
def _(m, d):
    return segment_argv(m, [d / "none.png"], d / "out"), "none.png"


@case_row("image empty (0 bytes .nii.gz)")
def _(m, d):
    (d / "empty.nii.gz").write_bytes(b"")
    return segment_argv(m, [d / "empty.nii.gz"], d / "out"), "empty.nii.gz"


@case_row("image truncated (half the bytes of a .nii.gz)")
def _(m, d):
    bad = truncate(write_array(image_array(m), d / "half.nii.gz"))
    return segment_argv(m, [bad], d / "out"), "half.nii.gz"


@case_row("image truncated (half the bytes of a .png)")
def _(m, d):
    bad = d / "half.png"
    bad.write_bytes(m.image.read_bytes())
    truncate(bad)
    return segment_argv(m, [bad], d / "out"), "half.png"


@case_row("image corrupt (garbage bytes named .nii.gz)")
def _(m, d):
    (d / "junk.nii.gz").write_bytes(os.urandom(2000))
    return segment_argv(m, [d / "junk.nii.gz"], d / "out"), "junk.nii.gz"


@case_row("image corrupt (PNG signature, then garbage)")
def _(m, d):
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return segment_argv(m, [d / "bad.png"], d / "out"), "bad.png"


@case_row("a good image, then a corrupt one: the good one written", "B101_img")
def _(m, d):
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return segment_argv(m, [m.image, d / "broken.png"], d / "out"), "broken.png"


@case_row("image with a NaN voxel")
def _(m, d):
    return segment_argv(m, [_nan_image(m, d / "nan.nii.gz")], d / "out"), "nan.nii.gz"


@case_row("image with an infinite voxel")
def _(m, d):
    return segment_argv(m, [_nan_image(m, d / "inf.nii.gz", np.inf)], d / "out"), "inf.nii.gz"


@case_row("image with -inf and 3e38 voxels")
def _(m, d):
    a = image_array(m) * np.float32(3e38 / 255)
    a[0, 0] = -np.inf
    return segment_argv(m, [write_array(a, d / "huge.nii.gz")], d / "out"), "huge.nii.gz"


@case_row("image 3-D (4 x 32 x 32) for a 2-D model")
def _(m, d):
    a = np.repeat(image_array(m)[None], 4, 0)
    return segment_argv(m, [write_array(a, d / "vol.nii.gz")], d / "out"), "vol.nii.gz"


@case_row("image of 5 components per pixel")
def _(m, d):
    a = np.stack([image_array(m)] * 5, -1)
    img = sitk.GetImageFromArray(a, isVector=True)
    sitk.WriteImage(img, str(d / "vector.nii.gz"))
    return segment_argv(m, [d / "vector.nii.gz"], d / "out"), "vector.nii.gz"


@row("segment", "input folder holds no images")
def _(m, d):
    (d / "empty").mkdir()
    return segment_argv(m, [d / "empty"], d / "out"), "empty"


@row("segment", "checkpoint missing")
def _(m, d):
    return segment_argv(m, [m.image], d / "out", checkpoint=d / "none.ckpt"), "none.ckpt"


@row("segment", "checkpoint truncated (half the bytes)")
def _(m, d):
    bad = d / "half.ckpt"
    bad.write_bytes(m.checkpoint.read_bytes())
    truncate(bad)
    return segment_argv(m, [m.image], d / "out", checkpoint=bad), "half.ckpt"


@row("segment", "checkpoint not a checkpoint (a PNG)")
def _(m, d):
    bad = d / "image.ckpt"
    bad.write_bytes(m.image.read_bytes())
    return segment_argv(m, [m.image], d / "out", checkpoint=bad), "image.ckpt"


@row("segment", "checkpoint a torch file without a model")
def _(m, d):
    import torch

    bad = d / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    return segment_argv(m, [m.image], d / "out", checkpoint=bad), "weights.ckpt"


@case_row("image of complex pixels")
def _(m, d):
    img = sitk.GetImageFromArray(image_array(m).astype(np.complex64))
    sitk.WriteImage(img, str(d / "complex.nii.gz"))
    return segment_argv(m, [d / "complex.nii.gz"], d / "out"), "complex.nii.gz"


@row("segment", "checkpoint a folder")
def _(m, d):
    (d / "model.ckpt").mkdir()
    return segment_argv(m, [m.image], d / "out", checkpoint=d / "model.ckpt"), "model.ckpt"


@row("segment", "checkpoint empty (0 bytes)")
def _(m, d):
    (d / "empty.ckpt").write_bytes(b"")
    return segment_argv(m, [m.image], d / "out", checkpoint=d / "empty.ckpt"), "empty.ckpt"


@row("segment", "--lambda abc")
def _(m, d):
    return segment_argv(m, [m.image], d / "out", "--lambda", "abc"), "--lambda"


@row("segment", "--iterations -1")
def _(m, d):
    return segment_argv(m, [m.image], d / "out", "--iterations", "-1"), "refinement.iterations"


@row("segment", "--split of a split the config lacks")
def _(m, d):
    return segment_argv(m, [], d / "out", "--split", "validation"), "validation"


@row("segment", "--out an existing file")
def _(m, d):
    (d / "out").write_text("keep")
    return segment_argv(m, [m.image], d / "out"), str(d / "out")


@row("segment", "--out below a file")
def _(m, d):
    (d / "file").write_text("keep")
    return segment_argv(m, [m.image], d / "file" / "out"), str(d / "file")


@case_row("existing --out with a case (same settings), then a truncated image of that case")
def _(m, d):
    out = copy_tree(m.seg, d / "out")
    bad = truncate(write_array(image_array(m), d / "B102.nii.gz"))
    return segment_argv(m, [bad], out, "--iterations", "0"), "B102.nii.gz"  # the material's settings


def other_checkpoint(source: Path, path: Path) -> Path:
    """The checkpoint `source` with one ITN weight changed by 1e-3, saved as `path`: another
    checkpoint of the same config (for the rows and tests of output folders made by another run)."""
    import torch

    ckpt = torch.load(source, weights_only=False)
    name = next(k for k in ckpt["state_dict"] if k.startswith("net.itn") and k.endswith("weight"))
    ckpt["state_dict"][name] += 1e-3
    torch.save(ckpt, path)
    return path


@row("segment", "--out holds segmentations of another checkpoint")
def _(m, d):
    out = copy_tree(m.seg, d / "out")
    return segment_argv(m, [m.image], out, checkpoint=other_checkpoint(m.checkpoint, d / "other.ckpt")), "segment.yaml"


@row("segment", "--out holds segmentations made with other refinement settings (--lambda 0.5)")
def _(m, d):
    return segment_argv(m, [m.image], copy_tree(m.seg, d / "out"), "--lambda", "0.5"), "refinement.lambda"


@row("segment", "--out holds case folders without segment.yaml (unknown run)")
def _(m, d):
    out = copy_tree(m.seg, d / "out")
    (out / "segment.yaml").unlink()
    return segment_argv(m, [m.image], out), str(out)


@case_row("image of 1x1 pixels")
def _(m, d):
    return segment_argv(m, [write_array(np.ones((1, 1), np.float32), d / "dot.nii.gz")], d / "out"), "dot.nii.gz"


def _dicom_series(folder: Path, uid: str, names=None, slices: int = 4) -> Path:
    """A small DICOM volume (tests/dicom_series.py) in `folder`."""
    from dicom_series import UID_ROOT, write_dicom_series

    write_dicom_series(folder, np.zeros((slices, 32, 32), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3),
                       series_uid=f"{UID_ROOT}.{uid}", names=names)
    return folder


@row("segment", "DICOM folder with a corrupt .dcm beside its series")
def _(m, d):
    folder = _dicom_series(d / "ct", "91")
    (folder / "bad.dcm").write_bytes(os.urandom(600))
    return segment_argv(m, [folder], d / "out"), "bad.dcm"


@case_row("DICOM folder holding two series (a case of a folder)")
def _(m, d):
    _dicom_series(d / "ct", "92", names=[f"a{k}.dcm" for k in range(4)])
    _dicom_series(d / "ct", "93", names=[f"b{k}.dcm" for k in range(4)])
    return segment_argv(m, [d], d / "out"), "ct"


@row("segment", "DICOM series with a missing slice")
def _(m, d):
    folder = _dicom_series(d / "ct", "94")
    (folder / "slice001.dcm").unlink()
    return segment_argv(m, [folder], d / "out"), "ct"


# ---------------------------------------------------------------------------------------- evaluate

@row("evaluate", "predictions folder missing")
def _(m, d):
    return evaluate_argv(m, d / "ev", predictions=d / "none"), "none"


@row("evaluate", "predictions folder holds no cases")
def _(m, d):
    (d / "pred").mkdir()
    return evaluate_argv(m, d / "ev", predictions=d / "pred"), "pred"


@row("evaluate", "references folder missing")
def _(m, d):
    return evaluate_argv(m, d / "ev", references=d / "none"), "none"


@row("evaluate", "references folder holds no labelmaps")
def _(m, d):
    (d / "refs").mkdir()
    return evaluate_argv(m, d / "ev", references=d / "refs"), "refs"


@row("evaluate", "references name no case of the predictions")
def _(m, d):
    write_array(labels_array(m), d / "refs" / "X1_seg.png")
    return evaluate_argv(m, d / "ev", references=d / "refs"), "X1"


def _reference_folder(m, d, write) -> Path:
    refs = d / "refs"
    refs.mkdir()
    (refs / "B102_seg.png").write_bytes((m.test / "B102_seg.png").read_bytes())
    return write(refs)


@row("evaluate", "reference truncated (half the bytes of a .nii.gz)")
def _(m, d):
    _reference_folder(m, d, lambda r: truncate(write_array(labels_array(m, "B101", m.test), r / "B101_seg.nii.gz")))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101_seg.nii.gz"


@row("evaluate", "reference empty (0 bytes .png)")
def _(m, d):
    _reference_folder(m, d, lambda r: (r / "B101_seg.png").write_bytes(b""))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101_seg.png"


@row("evaluate", "reference corrupt (PNG signature, then garbage)")
def _(m, d):
    _reference_folder(m, d, lambda r: (r / "B101_seg.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101_seg.png"


@row("evaluate", "reference with value 7 (not declared)")
def _(m, d):
    a = labels_array(m, "B101", m.test)
    a[a == 255] = 7
    _reference_folder(m, d, lambda r: write_array(a, r / "B101_seg.png"))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101_seg.png"


@row("evaluate", "reference of float 3e38 where the letter is")
def _(m, d):
    a = labels_array(m, "B101", m.test).astype(np.float32)
    a[a == 255] = 3e38
    _reference_folder(m, d, lambda r: write_array(a, r / "B101_seg.nii.gz"))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101_seg.nii.gz"


@row("evaluate", "reference with a NaN voxel")
def _(m, d):
    a = labels_array(m, "B101", m.test).astype(np.float32)
    a[0, 0] = np.nan
    _reference_folder(m, d, lambda r: write_array(a, r / "B101_seg.nii.gz"))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101_seg.nii.gz"


@row("evaluate", "reference 34 x 32 (predictions 32 x 32)")
def _(m, d):
    _reference_folder(m, d, lambda r: write_array(np.zeros((SIZE + 2, SIZE), np.uint8), r / "B101_seg.png"))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101"


def _nifti_predictions(m, d, spacing=(0.9, 1.1), origin=(10.0, -5.0)) -> Path:
    """A predictions folder of case B101 with NIfTI labelmaps that store a geometry (an input image
    with a header): the material's PNG labelmaps, with `spacing` and `origin`."""
    for png in (m.seg / "B101").glob("*_labelmap.png"):
        write_array(read_array(png), d / "pred" / "B101" / png.name.replace(".png", ".nii.gz"), spacing, origin)
    return d / "pred"


@row("evaluate", "reference with another spacing than the predictions (NIfTI)")
def _(m, d):
    pred = _nifti_predictions(m, d)
    write_array(labels_array(m, "B101", m.test), d / "refs" / "B101_seg.nii.gz", (0.5, 0.5), (10.0, -5.0))
    return evaluate_argv(m, d / "ev", predictions=pred, references=d / "refs"), "B101_seg.nii.gz"


@row("evaluate", "reference with another origin than the predictions (NIfTI)")
def _(m, d):
    pred = _nifti_predictions(m, d)
    write_array(labels_array(m, "B101", m.test), d / "refs" / "B101_seg.nii.gz", (0.9, 1.1), (40.0, -3.0))
    return evaluate_argv(m, d / "ev", predictions=pred, references=d / "refs"), "B101_seg.nii.gz"


@row("evaluate", "reference 3-D (4 x 32 x 32), predictions 2-D")
def _(m, d):
    a = np.repeat(labels_array(m, "B101", m.test)[None], 4, 0)
    _reference_folder(m, d, lambda r: write_array(a, r / "B101_seg.nii.gz"))
    return evaluate_argv(m, d / "ev", references=d / "refs"), "B101"


@row("evaluate", "a prediction labelmap corrupt (garbage bytes)")
def _(m, d):
    pred = copy_tree(m.seg, d / "pred")
    (pred / "B101" / "refine_labelmap.png").write_bytes(b"garbage")
    return evaluate_argv(m, d / "ev", predictions=pred), "refine_labelmap.png"


@row("evaluate", "segment.yaml of the predictions not YAML")
def _(m, d):
    pred = copy_tree(m.seg, d / "pred")
    (pred / "segment.yaml").write_text("checkpoint: [unclosed\n")
    return evaluate_argv(m, d / "ev", predictions=pred), "segment.yaml"


@row("evaluate", "--config missing")
def _(m, d):
    argv = evaluate_argv(m, d / "ev")
    i = argv.index("--checkpoint")
    return argv[:i] + ["--config", str(d / "none.yaml")] + argv[i + 2:], "none.yaml"


@row("evaluate", "neither --config nor --checkpoint, no segment.yaml")
def _(m, d):
    pred = copy_tree(m.seg, d / "pred")
    (pred / "segment.yaml").unlink()
    argv = evaluate_argv(m, d / "ev", predictions=pred)
    i = argv.index("--checkpoint")
    return argv[:i] + argv[i + 2:], "--config"


@row("evaluate", "predictions --out is the predictions file itself")
def _(m, d):
    (d / "pred").write_text("not a folder")
    return evaluate_argv(m, d / "ev", predictions=d / "pred"), "pred"


@row("evaluate", "--merge 255=a")
def _(m, d):
    return evaluate_argv(m, d / "ev", None, None, "--merge", "255=a"), "--merge"


@row("evaluate", "--merge without '=' (255)")
def _(m, d):
    return evaluate_argv(m, d / "ev", None, None, "--merge", "255"), "--merge"


@row("evaluate", "--merge of undeclared labels 9=3,4")
def _(m, d):
    return evaluate_argv(m, d / "ev", None, None, "--merge", "9=3,4"), "--merge"


@row("evaluate", "--checkpoint truncated (half the bytes)")
def _(m, d):
    bad = d / "half.ckpt"
    bad.write_bytes(m.checkpoint.read_bytes())
    truncate(bad)
    return evaluate_argv(m, d / "ev", checkpoint=bad), "half.ckpt"


@row("evaluate", "--config with an unknown key")
def _(m, d):
    config = tiny_config(d, m.train, data={"labels": {0: "bg", 255: "letter"}, "labls": 1})
    argv = evaluate_argv(m, d / "ev")
    i = argv.index("--checkpoint")
    return argv[:i] + ["--config", str(config)] + argv[i + 2:], "data.labls"


@row("evaluate", "--out an existing file")
def _(m, d):
    (d / "ev").write_text("keep")
    return evaluate_argv(m, d / "ev"), str(d / "ev")


@row("evaluate", "existing --out folder, reference with value 7")
def _(m, d):
    out = copy_tree(m.evaluation, d / "ev")
    a = labels_array(m, "B101", m.test)
    a[a == 255] = 7
    _reference_folder(m, d, lambda r: write_array(a, r / "B101_seg.png"))
    return evaluate_argv(m, out, references=d / "refs"), "B101_seg.png"


@row("evaluate", "predictions of a segment run still in progress (killed)")
def _(m, d):
    pred = copy_tree(m.seg, d / "pred")
    info = yaml.safe_load((pred / "segment.yaml").read_text())
    (pred / "segment.yaml").write_text(yaml.safe_dump(dict(info, status="in_progress")))
    return evaluate_argv(m, d / "ev", predictions=pred), "segment.yaml"


@row("evaluate", "predictions holding a case folder their run did not write")
def _(m, d):
    pred = copy_tree(m.seg, d / "pred")
    copy_tree(pred / "B101", pred / "B999")
    return evaluate_argv(m, d / "ev", predictions=pred), "B999"


@row("evaluate", "--out holds the evaluation of other predictions")
def _(m, d):
    out = copy_tree(m.evaluation, d / "ev")
    return evaluate_argv(m, out, predictions=copy_tree(m.seg, d / "pred")), "info.yaml"


# ------------------------------------------------------------------------------------------ report

def _evaluation_copy(m, d, change=None) -> Path:
    ev = copy_tree(m.evaluation, d / "ev")
    if change:
        change(ev)
    return ev


@row("report", "evaluation folder missing")
def _(m, d):
    return report_argv([d / "none"], d / "rep"), "none"


@row("report", "folder that is not an evaluation (no metrics_per_case.csv)")
def _(m, d):
    (d / "ev").mkdir()
    return report_argv([d / "ev"], d / "rep"), "metrics_per_case.csv"


@row("report", "metrics_per_case.csv empty (0 bytes)")
def _(m, d):
    ev = _evaluation_copy(m, d, lambda e: (e / "metrics_per_case.csv").write_text(""))
    return report_argv([ev], d / "rep"), "metrics_per_case.csv"


@row("report", "metrics_per_case.csv header only")
def _(m, d):
    def header_only(e):
        p = e / "metrics_per_case.csv"
        p.write_text(p.read_text().splitlines()[0] + "\n")
    ev = _evaluation_copy(m, d, header_only)
    return report_argv([ev], d / "rep"), "metrics_per_case.csv"


@row("report", "metrics_per_case.csv with dice = abc")
def _(m, d):
    def bad_dice(e):
        p = e / "metrics_per_case.csv"
        lines = p.read_text().splitlines()
        head = lines[0].split(",")
        cells = lines[1].split(",")
        cells[head.index("dice")] = "abc"
        lines[1] = ",".join(cells)
        p.write_text("\n".join(lines) + "\n")
    ev = _evaluation_copy(m, d, bad_dice)
    return report_argv([ev], d / "rep"), "metrics_per_case.csv"


@row("report", "metrics_per_case.csv without its dice column")
def _(m, d):
    def drop(e):
        import csv
        p = e / "metrics_per_case.csv"
        rows = list(csv.DictReader(p.open()))
        cols = [c for c in rows[0] if c != "dice"]
        p.write_text("\n".join([",".join(cols)] + [",".join(r[c] for c in cols) for r in rows]) + "\n")
    ev = _evaluation_copy(m, d, drop)
    return report_argv([ev], d / "rep"), "metrics_per_case.csv"


@row("report", "metrics_per_case.csv a binary file")
def _(m, d):
    ev = _evaluation_copy(m, d, lambda e: (e / "metrics_per_case.csv").write_bytes(os.urandom(500)))
    return report_argv([ev], d / "rep"), "metrics_per_case.csv"


@row("report", "info.yaml not YAML")
def _(m, d):
    ev = _evaluation_copy(m, d, lambda e: (e / "info.yaml").write_text("model: [unclosed\n"))
    return report_argv([ev], d / "rep"), "info.yaml"


@row("report", "info.yaml a list")
def _(m, d):
    ev = _evaluation_copy(m, d, lambda e: (e / "info.yaml").write_text("- a\n- b\n"))
    return report_argv([ev], d / "rep"), "info.yaml"


@row("report", "transforms_per_case.csv with ic_dsc = high")
def _(m, d):
    def bad(e):
        p = e / "transforms_per_case.csv"
        lines = p.read_text().splitlines()
        head = lines[0].split(",")
        cells = lines[1].split(",")
        cells[head.index("ic_dsc")] = "high"
        lines[1] = ",".join(cells)
        p.write_text("\n".join(lines) + "\n")
    ev = _evaluation_copy(m, d, bad)
    return report_argv([ev], d / "rep"), "transforms_per_case.csv"


@row("report", "evaluation folder is a file")
def _(m, d):
    (d / "ev").write_text("x")
    return report_argv([d / "ev"], d / "rep"), "ev"


@row("report", "metrics_per_case.csv with dice = inf")
def _(m, d):
    def bad_dice(e):
        p = e / "metrics_per_case.csv"
        lines = p.read_text().splitlines()
        head = lines[0].split(",")
        cells = lines[1].split(",")
        cells[head.index("dice")] = "inf"
        lines[1] = ",".join(cells)
        p.write_text("\n".join(lines) + "\n")
    ev = _evaluation_copy(m, d, bad_dice)
    return report_argv([ev], d / "rep"), "metrics_per_case.csv"


@row("report", "quality_control.csv with flagged = maybe")
def _(m, d):
    def bad(e):
        p = e / "quality_control.csv"
        lines = p.read_text().splitlines()
        head = lines[0].split(",")
        cells = lines[1].split(",")
        cells[head.index("flagged")] = "maybe"
        lines[1] = ",".join(cells)
        p.write_text("\n".join(lines) + "\n")
    ev = _evaluation_copy(m, d, bad)
    return report_argv([ev], d / "rep"), "quality_control.csv"


@row("report", "--bootstrap 0")
def _(m, d):
    return report_argv([m.evaluation], d / "rep", "--bootstrap", "0"), "--bootstrap"


@row("report", "--bootstrap -5")
def _(m, d):
    return report_argv([m.evaluation], d / "rep", "--bootstrap", "-5"), "--bootstrap"


@row("report", "--sensitivity folder missing")
def _(m, d):
    return report_argv([m.evaluation], d / "rep", "--sensitivity", str(d / "none")), "none"


@row("report", "--sensitivity folder without a refinement lambda")
def _(m, d):
    def no_lambda(e):
        info = yaml.safe_load((e / "info.yaml").read_text())
        info.pop("refinement", None)
        (e / "info.yaml").write_text(yaml.safe_dump(info))
    ev = _evaluation_copy(m, d, no_lambda)
    return report_argv([m.evaluation], d / "rep", "--sensitivity", str(ev)), "info.yaml"


@row("report", "a reference in info.yaml corrupt (found while drawing the figures)")
def _(m, d):
    (d / "ref.png").write_bytes(b"\x89PNG not really")
    def bad_reference(e):
        info = yaml.safe_load((e / "info.yaml").read_text())
        info["references"] = {case: str(d / "ref.png") for case in info["references"]}
        (e / "info.yaml").write_text(yaml.safe_dump(info))
    ev = _evaluation_copy(m, d, bad_reference)
    return report_argv([ev], d / "rep"), "ref.png"


@row("report", "--out an existing file")
def _(m, d):
    (d / "rep").write_text("keep")
    return report_argv([m.evaluation], d / "rep"), str(d / "rep")


@row("report", "existing --out folder, metrics_per_case.csv empty")
def _(m, d):
    out = d / "rep"
    out.mkdir()
    (out / "report.md").write_text("an older report")
    ev = _evaluation_copy(m, d, lambda e: (e / "metrics_per_case.csv").write_text(""))
    return report_argv([ev], out), "metrics_per_case.csv"


@row("report", "--out holds a report of other evaluations")
def _(m, d):
    out = d / "rep"
    out.mkdir()
    (out / "report.html").write_text("<html>an older report</html>")
    (out / "report.yaml").write_text(yaml.safe_dump({"evaluations": [str(d / "elsewhere")], "sensitivity": []}))
    return report_argv([m.evaluation], out), "report.yaml"


# -------------------------------------------------------------------------------------- correspond

@row("correspond", "points CSV missing")
def _(m, d):
    return correspond_argv(m, d / "o.csv", points=d / "none.csv"), "none.csv"


def _points_csv(text: str) -> Build:
    """A correspond row whose points CSV holds `text`."""
    def build(m, d):
        (d / "p.csv").write_text(text)
        return correspond_argv(m, d / "o.csv", points=d / "p.csv"), "p.csv"
    return build


for _input, _text in (
        ("points CSV empty (0 bytes)", ""),
        ("points CSV with y = abc", "x,y\n1,abc\n"),
        ("points CSV without x,y columns", "name,a,b\np,1,2\n"),
        ("points CSV with a row of 3 fields (header 2)", "x,y\n1,2,3\n"),
        ("points of wrong dimension (x,y,z for 2-D cases)", "x,y,z\n1,2,3\n"),
        ("points CSV with y = inf", "x,y\n1,inf\n"),
        ("points CSV with x = nan", "x,y\nnan,2\n"),
):
    row("correspond", _input)(_points_csv(_text))


@row("correspond", "points CSV a binary file")
def _(m, d):
    (d / "p.csv").write_bytes(b"\xff\xfe\x00\x01" + os.urandom(300))
    return correspond_argv(m, d / "o.csv", points=d / "p.csv"), "p.csv"


@row("correspond", "--from folder missing")
def _(m, d):
    return correspond_argv(m, d / "o.csv", a=d / "none"), "none"


@row("correspond", "--from folder missing its transforms")
def _(m, d):
    (d / "A").mkdir()
    return correspond_argv(m, d / "o.csv", a=d / "A"), "inverse_transform.h5"


@row("correspond", "--to folder missing its forward transform")
def _(m, d):
    b = copy_tree(m.seg / "B102", d / "B")
    (b / "forward_transform.h5").unlink()
    return correspond_argv(m, d / "o.csv", b=b), "forward_transform.h5"


@row("correspond", "--from inverse_transform.h5 truncated (half the bytes)")
def _(m, d):
    a = copy_tree(m.seg / "B101", d / "A")
    truncate(a / "inverse_transform.h5")
    return correspond_argv(m, d / "o.csv", a=a), "inverse_transform.h5"


@row("correspond", "--from inverse_transform.h5 not a transform")
def _(m, d):
    a = copy_tree(m.seg / "B101", d / "A")
    (a / "inverse_transform.h5").write_text("not a transform")
    return correspond_argv(m, d / "o.csv", a=a), "inverse_transform.h5"


@row("correspond", "--from inverse_transform.h5 empty (0 bytes)")
def _(m, d):
    a = copy_tree(m.seg / "B101", d / "A")
    (a / "inverse_transform.h5").write_bytes(b"")
    return correspond_argv(m, d / "o.csv", a=a), "inverse_transform.h5"


@row("correspond", "--labelmap with value 7, --labels 0,255")
def _(m, d):
    a = labels_array(m, "B101", m.test)
    a[a == 255] = 7
    lab = write_array(a, d / "lab.png")
    return correspond_argv(m, d / "o.png", None, None, None, "--labelmap", str(lab), "--labels", "0,255"), "lab.png"


@row("correspond", "--labelmap truncated (half the bytes of a .nii.gz)")
def _(m, d):
    lab = truncate(write_array(labels_array(m, "B101", m.test), d / "lab.nii.gz"))
    return correspond_argv(m, d / "o.nii.gz", None, None, None, "--labelmap", str(lab)), "lab.nii.gz"


@row("correspond", "--labelmap 3-D for 2-D cases")
def _(m, d):
    lab = write_array(np.zeros((4, SIZE, SIZE), np.uint8), d / "lab.nii.gz")
    return correspond_argv(m, d / "o.nii.gz", None, None, None, "--labelmap", str(lab)), "lab.nii.gz"


@row("correspond", "--from inverse_transform.h5 with a damaged header")
def _(m, d):
    a = copy_tree(m.seg / "B101", d / "A")
    p = a / "inverse_transform.h5"
    data = p.read_bytes()
    p.write_bytes(data[:100] + bytes(200) + data[300:])
    return correspond_argv(m, d / "o.csv", a=a), "inverse_transform.h5"


@row("correspond", "--labelmap with a NaN voxel")
def _(m, d):
    a = labels_array(m, "B101", m.test).astype(np.float32)
    a[0, 0] = np.nan
    lab = write_array(a, d / "lab.nii.gz")
    return correspond_argv(m, d / "o.nii.gz", None, None, None, "--labelmap", str(lab)), "lab.nii.gz"


@row("correspond", "--to case whose inverse_displacement.nii.gz is not an image (labelmap)")
def _(m, d):
    b = copy_tree(m.seg / "B102", d / "B")
    (b / "inverse_displacement.nii.gz").write_text("not an image")
    lab = d / "lab.png"
    lab.write_bytes((m.test / "B101_seg.png").read_bytes())
    return correspond_argv(m, d / "o.png", None, b, None, "--labelmap", str(lab)), "inverse_displacement.nii.gz"


@row("correspond", "--labels 0,x")
def _(m, d):
    lab = d / "lab.png"
    lab.write_bytes((m.test / "B101_seg.png").read_bytes())
    return correspond_argv(m, d / "o.png", None, None, None, "--labelmap", str(lab), "--labels", "0,x"), "--labels"


@row("correspond", "--out an existing folder")
def _(m, d):
    (d / "o.csv").mkdir()
    return correspond_argv(m, d / "o.csv"), str(d / "o.csv")


@row("correspond", "--out below a file")
def _(m, d):
    (d / "file").write_text("keep")
    return correspond_argv(m, d / "file" / "o.csv"), str(d / "file")


@row("correspond", "existing --out file, points CSV with y = abc")
def _(m, d):
    (d / "o.csv").write_text("name,x,y\nold,1,2\n")
    (d / "p.csv").write_text("x,y\n1,abc\n")
    return correspond_argv(m, d / "o.csv", points=d / "p.csv"), "p.csv"


# ----------------------------------------------------------------------------------------- harness

@dataclass
class Result:
    argv: list[str]
    name: str                 # what the message must name
    status: int
    stdout: str
    stderr: str
    left: list[str] = field(default_factory=list)  # files created, changed or removed
    fresh_out: bool = True
    fails_alone: tuple[str, ...] | None = None  # the row's (Row.fails_alone)
    out: Path | None = None  # the command's --out

    @property
    def message(self) -> str:
        return self.stderr.strip()


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: folders by existence, files by size, mtime and content digest."""
    out = {}
    if not folder.exists():
        return out
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.join(root, name)] = ("dir",)
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[p] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha1(Path(p).read_bytes()).hexdigest())
    return out


def _difference(before: dict, after: dict, bases: list[Path]) -> list[str]:
    def short(p):
        for b in bases:
            with contextlib.suppress(ValueError):
                return str(Path(p).relative_to(b))
        return p

    left = [f"+{short(p)}" for p in sorted(after.keys() - before.keys())]
    left += [f"~{short(p)}" for p in sorted(p for p in after.keys() & before.keys() if after[p] != before[p])]
    left += [f"-{short(p)}" for p in sorted(before.keys() - after.keys())]
    return left


def _stream_handlers() -> list:
    """The logging handlers that write to a console stream: Lightning's, made with the sys.stderr of
    the moment it was imported (under pytest: pytest's capture, which the descriptors do not see)."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    # exactly StreamHandler: pytest's LogCaptureHandler and file handlers are subclasses
    return list({id(h): h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler}.values())


@contextlib.contextmanager
def _captured():
    """stdout and stderr of this process: Python's, the logging handlers' and the file descriptors'
    (C++ libraries)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
    py = (io.StringIO(), io.StringIO())
    text = {"out": "", "err": ""}
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    handlers = _stream_handlers()
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(py[0] if h.stream in (sys.stdout, sys.__stdout__) else py[1])
    try:
        with contextlib.redirect_stdout(py[0]), contextlib.redirect_stderr(py[1]):
            yield text
    finally:
        for h, stream in zip(handlers, streams):
            h.setStream(stream)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        fd_text = []
        for f in files:
            f.seek(0)
            fd_text.append(f.read().decode("utf-8", "replace"))
            f.close()
        text["out"] = fd_text[0] + py[0].getvalue()
        text["err"] = fd_text[1] + py[1].getvalue()


def run_row(r: Row, m: Material, folder: Path) -> Result:
    """Build row `r` in `folder` and run it as `atlasreg` would, in-process, with `folder` as the
    working directory."""
    from atlasreg.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    argv, name = r.build(m, folder)
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    bases = [folder, m.root]
    before = {**_snapshot(folder), **_snapshot(m.root)}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with _captured() as text, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for category in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", category=category)
            try:
                status = main(argv)
            except SystemExit as e:  # what the shell would see
                status = e.code if isinstance(e.code, int) else 1
            except BaseException:  # a traceback, as Python would print it
                import traceback
                sys.stderr.write(traceback.format_exc())
                status = 1
    finally:
        os.chdir(cwd)
    shown = "".join(f"atlasreg: warning: {w.message}\n" for w in caught)
    after = {**_snapshot(folder), **_snapshot(m.root)}
    return Result(argv, name, status, text["out"], shown + text["err"], _difference(before, after, bases),
                  fresh_out=out is None or str(out) not in {k for k in before}, fails_alone=r.fails_alone,
                  out=None if out is None else folder / out)


def _case_problems(res: Result) -> list[str]:
    """What a row whose bad input fails alone did wrong (empty: status 1; stderr two lines, `atlasreg:
    error: <the row's file>: <problem>` and `atlasreg: error: 1 of <n> cases failed, see <out>/
    segment_manifest.csv`; the manifest records the case as failed with that problem and the good
    inputs as done; the run complete; nothing created or changed but the good cases' folders, the run's
    manifests and a fresh --out; no temporary entry)."""
    from atlasreg.contracts import read_segment_info, read_segment_manifest

    found = []
    if res.status != 1:
        found.append(f"exit status {res.status}")
    inputs = res.argv[1:res.argv.index("--checkpoint")]
    manifest = res.out / "segment_manifest.csv"
    lines = res.stderr.strip().splitlines()
    summary = f"atlasreg: error: 1 of {len(inputs)} cases failed, see {manifest}"
    if len(lines) != 2 or lines[1] != summary:
        found.append(f"stderr is not its line and '{summary}'")
    if not lines or not lines[0].startswith("atlasreg: error: "):
        found.append("no 'atlasreg: error:' line")
    elif res.name not in lines[0]:
        found.append(f"the message does not name {res.name}")
    if "Traceback" in res.stderr or "Traceback" in res.stdout:
        found.append("a traceback")
    if manifest.is_file():
        rows = sorted((r["case"], r["status"], r["error"]) for r in read_segment_manifest(manifest))
        failed = [r for r in rows if r[1] == "failed"]
        if len(failed) != 1 or not lines or failed[0][2] != lines[0][len("atlasreg: error: "):]:
            found.append(f"the manifest does not record the case as failed with its message: {failed}")
        if sorted(r[0] for r in rows if r[1] == "done") != sorted(res.fails_alone):
            found.append(f"the manifest's done cases are not {list(res.fails_alone)}")
        if read_segment_info(res.out).get("status") != "complete":
            found.append("the run is not complete")
    else:
        found.append(f"no {manifest.name}")
    o = res.out.name  # as the row's folder's entries are named in res.left (the rows' --out is <folder>/out)
    allowed = {f"~{o}/segment.yaml", f"~{o}/segment_manifest.csv"}
    if res.fresh_out:
        allowed |= {f"+{o}", f"+{o}/segment.yaml", f"+{o}/segment_manifest.csv"}
    cases = {e[len(o) + 2:].split("/")[0] for e in res.left if e.startswith(f"+{o}/") and e.count("/") >= 1}
    cases -= {"segment.yaml", "segment_manifest.csv"}
    unexpected = [e for e in res.left if e not in allowed and not (e.startswith("+") and e[len(o) + 2:].split("/")[0]
                                                                   in res.fails_alone)]
    if unexpected:
        found.append("files left behind: " + " ".join(unexpected))
    if sorted(cases) != sorted(res.fails_alone):
        found.append(f"case folders written: {sorted(cases)}, expected {list(res.fails_alone)}")
    if res.out.is_dir() and any(p.name.startswith(".") for p in res.out.rglob("*")):
        found.append("a temporary entry left")
    return found


def problems(res: Result) -> list[str]:
    """What the row did wrong (empty: one line, status 2, names its file or key, nothing left; for a
    row whose bad input fails alone, :func:`_case_problems`)."""
    if res.fails_alone is not None:
        return _case_problems(res)
    found = []
    if res.status != 2:
        found.append(f"exit status {res.status}")
    lines = res.stderr.strip().splitlines()
    if len(lines) != 1:
        found.append(f"{len(lines)} lines on stderr")
    if not lines or not lines[-1].startswith("atlasreg: error: "):
        found.append("no 'atlasreg: error:' line")
    elif res.name not in lines[-1]:
        found.append(f"the message does not name {res.name}")
    if "Traceback" in res.stderr or "Traceback" in res.stdout:
        found.append("a traceback")
    if res.left:
        found.append("files left behind: " + " ".join(res.left))
    return found


def left_behind(res: Result) -> str:
    return " ".join(res.left) if res.left else "none"
