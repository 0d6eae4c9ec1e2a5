"""atlasreg.contracts: every reader gives back what its writer wrote; malformed files give one
AtlasregError naming the file."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import yaml

from atlasreg import contracts as c
from atlasreg.errors import AtlasregError


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def _same_rows(read: list[dict], written: list[dict]) -> None:
    assert len(read) == len(written)
    for r, w in zip(read, written):
        assert list(r) == list(w)
        for key in w:
            assert _same(r[key], w[key]), (key, r[key], w[key])


# --------------------------------------------------------------------------------------------------
# names and paths


def test_names_are_distinct_and_paths_are_built_from_them(tmp_path):
    assert len(set(c.FILE_NAMES)) == len(c.FILE_NAMES) and len(set(c.FOLDER_NAMES)) == len(c.FOLDER_NAMES)
    run = c.run_paths(tmp_path)
    assert run.root == tmp_path and run.config.name == c.RUN_CONFIG
    assert run.last_checkpoint == tmp_path / c.CHECKPOINT_DIR / c.LAST_CHECKPOINT
    assert run.final_checkpoint.name == c.FINAL_CHECKPOINT
    assert (run.atlas.name, run.atlas_initial.name, run.logs.name, run.cache.name) == \
        (c.ATLAS_DIR, c.INITIAL_ATLAS_DIR, c.LOG_DIR, c.CACHE_DIR)
    atlas = c.atlas_paths(run.atlas)
    assert (atlas.labelmap.parent, atlas.labelmap.name, atlas.probabilities.name, atlas.image.name) == \
        (run.atlas, c.ATLAS_LABELMAP, c.ATLAS_PROBABILITIES, c.ATLAS_IMAGE)
    ev = c.evaluation_paths(tmp_path)
    assert [p.name for p in (ev.metrics_per_case, ev.summary_csv, ev.summary_md, ev.info, ev.transforms_per_case,
                             ev.quality_control)] == [c.METRICS_PER_CASE, c.SUMMARY_CSV, c.SUMMARY_MD,
                                                      c.EVALUATION_INFO, c.TRANSFORMS_PER_CASE, c.QUALITY_CONTROL]
    assert c.TRANSFORMS_PER_CASE_COLUMNS == ("case", *c.TRANSFORM_METRIC_COLUMNS)
    assert set(c.TRANSFORM_OUTPUTS) <= set(c.LABELMAP_OUTPUTS)


@pytest.mark.parametrize("image, ext", [("a/B1_img.png", ".png"), ("x/CT.NII.GZ", ".nii.gz"), ("v.nrrd", ".nrrd"),
                                        ("", ".nii.gz"), (None, ".nii.gz"), (Path("d.x/s.mha"), ".mha"),
                                        ("photo.JPG", ".png"), ("x.jpeg", ".png")])
def test_labelmap_extension_is_the_input_extension(image, ext):
    assert c.labelmap_extension(image) == ext


@pytest.mark.parametrize("image", ["scans/pt01", "a/IM0001.dcm", "a/X.DICOM", "a/1.2.840.113619.2.55.3",
                                   Path("CT_1.5mm")])
def test_labelmap_extension_of_a_dicom_series_is_nifti(image):
    """A DICOM folder, a .dcm file, a file named by its UID: the labelmaps are NIfTI (.nii.gz)."""
    assert c.labelmap_extension(image) == ".nii.gz"


def test_find_labelmap_prefers_the_given_extension(tmp_path):
    assert c.find_labelmap(tmp_path, "itn") is None
    png = c.case_labelmap_path(tmp_path, "itn", ".png")
    nii = c.case_labelmap_path(tmp_path, "itn", ".nii.gz")
    assert png.parent == tmp_path and png.name.startswith("itn") and png.name.endswith(".png")
    png.write_bytes(b"")
    assert c.find_labelmap(tmp_path, "itn", prefer=".nii.gz") == png
    nii.write_bytes(b"")
    assert c.find_labelmap(tmp_path, "itn") == png  # LABELMAP_EXTENSIONS order
    assert c.find_labelmap(tmp_path, "itn", prefer=".nii.gz") == nii
    assert c.find_labelmap(tmp_path, "refine") is None


# --------------------------------------------------------------------------------------------------
# YAML files


def test_case_info_round_trip(tmp_path):
    image = tmp_path / "in" / "B1_img.png"
    path = c.write_case_info(tmp_path, image)
    assert path == tmp_path / c.CASE_INFO
    assert c.read_case_info(tmp_path) == {"image": image.resolve()}
    c.write_case_info(tmp_path, "")  # an image given in memory
    assert c.read_case_info(tmp_path) == {"image": None}
    assert c.read_case_info(tmp_path / "none") is None


def test_segment_info_round_trip(tmp_path):
    refinement = {"iterations": 50, "lr": 0.001, "beta": 1.0, "gamma": 1.0, "lambda": 0.126, "cases_at_once": 8}
    c.write_segment_info(tmp_path, "model/m.ckpt", refinement, "ab12", c.IN_PROGRESS, ["B2", "B10", "B1"])
    info = c.read_segment_info(tmp_path)
    assert info == {"checkpoint": str(Path("model/m.ckpt").resolve()), "checkpoint_sha256": "ab12",
                    "refinement": refinement, "status": "in_progress", "cases": ["B1", "B10", "B2"]}
    assert list(info) == ["checkpoint", "checkpoint_sha256", "refinement", "status", "cases"]
    c.write_segment_info(tmp_path, "model/m.ckpt", refinement)
    assert c.read_segment_info(tmp_path)["status"] == c.COMPLETE
    with pytest.raises(ValueError, match="status"):
        c.write_segment_info(tmp_path, "model/m.ckpt", refinement, status="done")
    assert c.read_segment_info(tmp_path / "none") == {}


def test_evaluation_info_round_trip(tmp_path):
    info = {"model": "m", "test_set": "clean", "merge": {255: [1, 2]}, "labels": {0: "background", 255: "λ"},
            "n_cases": 3, "refinement": {"lambda": 0.126}}
    c.write_evaluation_info(tmp_path, info)
    assert c.read_evaluation_info(tmp_path) == info
    assert list(c.read_evaluation_info(tmp_path)) == list(info)
    assert c.read_evaluation_info(tmp_path / "none") == {}


def test_run_config_is_read_as_train_writes_it(tmp_path):
    config = {"name": "acdc", "data": {"labels": {0: "background", 1: "RV"}, "spacing": [1.5, 1.5, 8.0]},
              "model": {"ndim": 3}}
    c.run_paths(tmp_path).config.write_text(yaml.safe_dump(config, sort_keys=False))  # as models/train.py
    assert c.read_run_config(tmp_path) == config
    assert c.read_run_config(tmp_path / "none") == {}


@pytest.mark.parametrize("reader, name", [(c.read_case_info, c.CASE_INFO), (c.read_segment_info, c.SEGMENT_INFO),
                                          (c.read_evaluation_info, c.EVALUATION_INFO),
                                          (c.read_run_config, c.RUN_CONFIG)])
@pytest.mark.parametrize("text, problem", [("a: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping"),
                                           (b"\xff\xfe: 1", "not valid YAML")])
def test_malformed_yaml_names_the_file(tmp_path, reader, name, text, problem):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(AtlasregError, match=problem) as info:
        reader(tmp_path)
    assert info.value.path == str(path) and "\n" not in str(info.value)


def test_case_info_image_must_be_a_path(tmp_path):
    (tmp_path / c.CASE_INFO).write_text("image: [1, 2]\n")
    with pytest.raises(AtlasregError, match="not a path") as info:
        c.read_case_info(tmp_path)
    assert info.value.path == str(tmp_path / c.CASE_INFO)


# --------------------------------------------------------------------------------------------------
# CSV files


def test_transform_metrics_round_trip(tmp_path):
    metrics = {"onepass": {"mice_mm": 0.1 + 0.2, "mice_voxels": 1e-17, "ic_dsc": math.nan,
                           "nonpositive_jacobian_fraction": 0.0, "std_log_jacobian": 0.0123456789012345},
               "refine": {"mice_mm": 2.5, "mice_voxels": 1.25, "ic_dsc": 0.99,
                          "nonpositive_jacobian_fraction": 1 / 3}}  # std_log_jacobian missing: empty, NaN
    path = c.write_transform_metrics(tmp_path, metrics)
    assert path == tmp_path / c.TRANSFORM_METRICS
    assert path.read_text().splitlines()[0] == ",".join(c.TRANSFORM_METRIC_COLUMNS)
    expected = [{"method": m, **{k: v.get(k, math.nan) for k in c.TRANSFORM_METRIC_COLUMNS[1:]}}
                for m, v in metrics.items()]
    _same_rows(c.read_transform_metrics(path), expected)


def _evaluation_rows():
    per_case = [{"case": "B1", "method": m, "label": 255, "structure": "letter", "dice": 0.9 - i / 7,
                 "hd": math.nan if m == "atlas" else 1.5 * i, "hd95": 0.1 * i, "hd95_avg": 0.05 * i, "asd": 1 / 3, "components": 1 + i,
                 "holes": i % 2, "reference_components": 1, "reference_holes": 0}
                for i, m in enumerate(c.LABELMAP_OUTPUTS)]
    summary = [{"method": "itn", "label": 255, "structure": "letter", "n": 1, "dice_mean": 0.9, "dice_std": 0.0}]
    transforms = [{"case": "B1", "method": "refine", "mice_mm": 0.25, "mice_voxels": 0.125, "ic_dsc": 0.995,
                   "nonpositive_jacobian_fraction": 0.0, "std_log_jacobian": math.nan}]
    quality = [{"case": "B1", "dice_itn_refine": 0.8, "itn_outside_refine": 0.05, "qc_score": 0.2,
                "refine_dice": 0.75, "flagged": True},
               {"case": "B2", "dice_itn_refine": math.nan, "itn_outside_refine": math.nan, "qc_score": math.nan,
                "refine_dice": 0.7, "flagged": False}]
    return per_case, summary, transforms, quality


def test_evaluation_folder_round_trip(tmp_path):
    per_case, summary, transforms, quality = _evaluation_rows()
    info = {"model": "m", "labels": {0: "background", 255: "letter"}}
    paths = c.write_evaluation(tmp_path / "ev", per_case, summary, transforms, quality, info, "# table\n")
    assert paths == c.evaluation_paths(tmp_path / "ev")
    _same_rows(c.read_metrics_per_case(tmp_path / "ev"), per_case)
    _same_rows(c.read_transforms_per_case(tmp_path / "ev"), transforms)
    _same_rows(c.read_quality_control(tmp_path / "ev"), quality)
    assert c.read_evaluation_info(tmp_path / "ev") == info
    assert paths.summary_md.read_text() == "# table\n"
    assert paths.summary_csv.read_text().splitlines()[0] == ",".join(c.SUMMARY_COLUMNS)
    assert paths.summary_csv.read_text().splitlines()[1].startswith("itn,255,letter,1,0.9,0.0,,")
    # Without quality rows, a stale quality file goes and the reader gives no rows; no transforms: header only.
    c.write_evaluation(tmp_path / "ev", per_case, summary, [], [], info, "# table\n")
    assert not paths.quality_control.exists() and c.read_quality_control(tmp_path / "ev") == []
    assert c.read_transforms_per_case(tmp_path / "ev") == []
    assert paths.transforms_per_case.read_text() == ",".join(c.TRANSFORMS_PER_CASE_COLUMNS) + "\n"
    assert not list((tmp_path / "ev").glob(".*"))  # no temporary files left


def test_transforms_per_case_keeps_extra_numeric_columns(tmp_path):
    (tmp_path / c.TRANSFORMS_PER_CASE).write_text("case,method,mice_mm,extra\nB1,refine,0.5,\n")
    assert c.read_transforms_per_case(tmp_path) == [{"case": "B1", "method": "refine", "mice_mm": 0.5,
                                                     "extra": pytest.approx(math.nan, nan_ok=True)}]


def test_metrics_per_case_written_before_hd95_avg_existed_read_it_as_nan(tmp_path):
    header = [col for col in c.PER_CASE_COLUMNS if col != "hd95_avg"]
    (tmp_path / c.METRICS_PER_CASE).write_text(",".join(header) + "\nB1,itn,255,letter,0.9,1.0,1.0,0.5,1,0,1,0\n")
    row, = c.read_metrics_per_case(tmp_path)
    assert math.isnan(row["hd95_avg"]) and row["hd95"] == 1.0 and row["asd"] == 0.5


def test_not_an_evaluation_folder(tmp_path):
    with pytest.raises(AtlasregError, match=f"no {c.METRICS_PER_CASE}") as info:
        c.read_metrics_per_case(tmp_path)
    assert info.value.path == str(tmp_path)


_HEADER = {c.METRICS_PER_CASE: ",".join(c.PER_CASE_COLUMNS), c.QUALITY_CONTROL: ",".join(c.QUALITY_COLUMNS),
           c.TRANSFORMS_PER_CASE: ",".join(c.TRANSFORMS_PER_CASE_COLUMNS),
           c.TRANSFORM_METRICS: ",".join(c.TRANSFORM_METRIC_COLUMNS)}
_GOOD = {c.METRICS_PER_CASE: "B1,itn,255,letter,0.9,1.0,1.0,0.75,0.5,1,0,1,0",
         c.QUALITY_CONTROL: "B1,0.9,0.1,0.1,0.8,True",
         c.TRANSFORMS_PER_CASE: "B1,refine,0.1,0.2,0.9,0.0,0.01",
         c.TRANSFORM_METRICS: "refine,0.1,0.2,0.9,0.0,0.01"}
_READERS = {c.METRICS_PER_CASE: c.read_metrics_per_case, c.QUALITY_CONTROL: c.read_quality_control,
            c.TRANSFORMS_PER_CASE: c.read_transforms_per_case,
            c.TRANSFORM_METRICS: lambda folder: c.read_transform_metrics(folder / c.TRANSFORM_METRICS)}


@pytest.mark.parametrize("name", list(_READERS))
def test_malformed_csv_names_the_file(tmp_path, name):
    path = tmp_path / name
    read = _READERS[name]
    path.write_text(_HEADER[name] + "\n" + _GOOD[name] + "\n")
    assert len(read(tmp_path)) == 1
    # a non-numeric value in the last column (a float, int or bool column in every file)
    bad = _GOOD[name].rsplit(",", 1)[0] + ",x"
    path.write_text(_HEADER[name] + "\n" + _GOOD[name] + "\n" + bad + "\n")
    with pytest.raises(AtlasregError, match="line 3: .* = 'x'") as info:
        read(tmp_path)
    assert info.value.path == str(path) and "\n" not in str(info.value)
    # a missing column (the second: a required one in every file)
    header = _HEADER[name].split(",")
    path.write_text(",".join(header[:1] + header[2:]) + "\n")
    with pytest.raises(AtlasregError, match="lacks the column") as info:
        read(tmp_path)
    assert info.value.path == str(path)
    # not UTF-8 text
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AtlasregError, match="cannot read") as info:
        read(tmp_path)
    assert info.value.path == str(path)


def test_integer_columns_reject_fractions(tmp_path):
    row = _GOOD[c.METRICS_PER_CASE].replace(",1,0,1,0", ",1.5,0,1,0")
    (tmp_path / c.METRICS_PER_CASE).write_text(_HEADER[c.METRICS_PER_CASE] + "\n" + row + "\n")
    with pytest.raises(AtlasregError, match="components = '1.5' is not an integer"):
        c.read_metrics_per_case(tmp_path)


# --------------------------------------------------------------------------------------------------
# one place: no other module spells a name or a column tuple

SRC = Path(__file__).resolve().parents[1] / "src" / "atlasreg"
CONTRACTS = SRC / "contracts.py"


def _name_patterns() -> list[re.Pattern]:
    """What spelling a contract name looks like in source text (code, docstrings and comments)."""
    patterns = [re.compile(re.escape(name)) for name in c.FILE_NAMES]
    ext = "|".join(re.escape(e) for e in c.LABELMAP_EXTENSIONS)
    patterns.append(re.compile(rf"{c.LABELMAP_SUFFIX}(\{{|{ext})"))  # f"{name}_labelmap{ext}", "itn_labelmap.png"
    for folder in c.FOLDER_NAMES:  # as a path part: out / "logs", "atlas/...", `cache/`, name="logs"
        f = re.escape(folder)
        quoted = rf"""|["'`]{f}["'`]""" if "_" in folder else ""  # not a word of prose, key or output name
        patterns.append(re.compile(rf"""/\s*["']{f}["']|["'`]{f}/|\b{f}/\w|name\s*=\s*["']{f}["']{quoted}"""))
    return patterns


def _hits(text: str) -> list[tuple[int, str]]:
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for p in _name_patterns() for m in p.finditer(text)]


def _column_tuples(tree: ast.AST) -> list[tuple[int, tuple]]:
    """(line, value) of every tuple or list literal of strings equal to a contract column tuple or to
    one without its first (key) column."""
    targets = {t for cols in c.COLUMN_TUPLES for t in (cols, cols[1:])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            value = tuple(e.value for e in node.elts)
            if value in targets:
                found.append((node.lineno, value))
    return found


def test_the_scanner_finds_what_it_looks_for():
    text = CONTRACTS.read_text()
    for name in (*c.FILE_NAMES, c.INITIAL_ATLAS_DIR):
        assert name in text
    planted = ('p = out / "checkpoints" / "last.ckpt"\nq = case / f"{name}_labelmap{ext}"\n'
               'TensorBoardLogger(d, name="logs")\nr = "itn_labelmap.nii.gz"\ns = "see `atlas/`"\n'
               't = run / "atlas_initial"\nu = "`atlas_initial`"\n')
    assert sorted(line for line, _ in _hits(planted)) == [1, 1, 2, 3, 4, 5, 6, 7]
    assert _column_tuples(ast.parse(f"X = {c.QUALITY_COLUMNS!r}\nY = {list(c.PER_CASE_COLUMNS[1:])!r}")) == \
        [(1, c.QUALITY_COLUMNS), (2, c.PER_CASE_COLUMNS[1:])]
    # Prose and other strings are not names: the word 'atlas', the config key 'cache', an output name.
    assert _hits('"""the atlas, its logs and checkpoints"""\ncfg["cache"]\nout = "atlas"\npaths.atlas_initial\n') == []


def test_no_module_but_contracts_spells_a_file_name_or_a_column_tuple():
    sources = sorted(p for p in SRC.rglob("*.py") if p != CONTRACTS)
    assert len(sources) > 40
    problems = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(SRC.parent)
        problems += [f"{rel}:{line}: {what!r}" for line, what in _hits(text)]
        problems += [f"{rel}:{line}: column tuple {value}" for line, value in _column_tuples(ast.parse(text))]
    assert not problems, "spelled outside atlasreg/contracts.py (import the name from there):\n" + "\n".join(problems)


def test_lightning_names_the_checkpoints_as_the_contract_says():
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION == c.LAST_CHECKPOINT
    assert c.EPOCH_CHECKPOINT.format(epoch=7) == "epoch0007"


# --------------------------------------------------------------------------------------------------
# segmentation run: case manifest and parts (issue 16 item 3)


def test_the_case_manifest_reads_back_whole_rows_and_ignores_an_unfinished_last_line(tmp_path):
    path = c.segment_manifest_path(tmp_path)
    assert path.name == c.SEGMENT_MANIFEST
    c.start_segment_manifest(path, [{"case": "B1", "image": "/d/B1.png", "status": c.SKIPPED, "seconds": 0.0}])
    c.append_segment_manifest(path, [
        {"case": "B2", "image": "/d/B,2.png", "status": c.FAILED, "seconds": 0.25,
         "error": '/d/B,2.png: cannot read\n"image"'},
        {"case": "B3", "image": "/d/B3.png", "status": c.DONE, "seconds": 1.5}])
    expected = [{"case": "B1", "image": "/d/B1.png", "status": "skipped", "seconds": 0.0, "error": ""},
                {"case": "B2", "image": "/d/B,2.png", "status": "failed", "seconds": 0.25,
                 "error": '/d/B,2.png: cannot read "image"'},
                {"case": "B3", "image": "/d/B3.png", "status": "done", "seconds": 1.5, "error": ""}]
    assert c.read_segment_manifest(path) == expected
    assert path.read_text().splitlines()[0] == ",".join(c.SEGMENT_MANIFEST_COLUMNS)
    with open(path, "a") as f:  # a row cut by a power loss
        f.write("B4,/d/B4.png,do")
    assert c.read_segment_manifest(path) == expected
    path.write_text("case,image,status,seconds,error\nB1,/d/B1.png,lost,0,\n")
    with pytest.raises(AtlasregError, match=r"segment_manifest.csv: line 2: status = 'lost' is not done"):
        c.read_segment_manifest(path)
    assert c.segment_manifest_path(tmp_path, 1, 3).name == "segment_manifest.part-1-of-3.csv"
    with pytest.raises(ValueError):
        c.segment_manifest_path(tmp_path, 3, 3)


def test_a_run_of_parts_is_complete_when_every_part_is(tmp_path):
    c.write_segment_info(tmp_path, tmp_path / "m.ckpt", {"iterations": 1}, "ab", c.COMPLETE, ["B1"])
    assert "parts" not in c.read_segment_info(tmp_path) and c.segment_run_status(tmp_path) == (c.COMPLETE, [])
    c.write_segment_info(tmp_path, tmp_path / "m.ckpt", {"iterations": 1}, "ab", c.COMPLETE, ["B1"], parts=3)
    assert c.read_segment_info(tmp_path)["parts"] == 3
    assert c.segment_run_status(tmp_path) == (c.IN_PROGRESS, [0, 1, 2])  # the stored status is a hint
    for part in (0, 2):
        c.write_segment_part_info(tmp_path, part, 3, c.COMPLETE)
    c.write_segment_part_info(tmp_path, 1, 3, c.IN_PROGRESS)
    assert c.segment_run_status(tmp_path) == (c.IN_PROGRESS, [1])
    c.write_segment_part_info(tmp_path, 1, 3, c.COMPLETE)
    assert c.segment_run_status(tmp_path) == (c.COMPLETE, [])
    assert c.segment_part_info_path(tmp_path, 1, 3).name == "segment.part-1-of-3.yaml"
    c.segment_part_info_path(tmp_path, 1, 3).write_text("[")
    with pytest.raises(AtlasregError, match=r"segment.part-1-of-3.yaml: segmentation part status is not valid YAML"):
        c.segment_run_status(tmp_path)
