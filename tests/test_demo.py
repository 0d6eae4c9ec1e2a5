"""The demo end to end on a very short schedule (1 epoch, so the numbers are those of an untrained model:
how well it learns is tests/test_learning.py's job): data, model, outputs, summary and report, and the
numbers of its evaluation tables (columns: atlasreg.evaluation.evaluate): every case and method has
rows, values are finite and in range (NaN distances only for an empty structure, with a warning), and
summary.csv and summary.md hold the means of the per-case rows."""

import csv
import math
import re
import warnings

import numpy as np
import SimpleITK as sitk
import torch

from atlasreg.demo import run_demo
from atlasreg.evaluation.evaluate import METHODS

N_TRAIN, N_TEST = 6, 2
CASES = [f"B{i}" for i in range(N_TRAIN + 1, N_TRAIN + N_TEST + 1)]  # the demo's test cases
DISTANCES = ("hd", "hd95", "hd95_avg", "asd")


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(mean, std, digits):  # a 'mean ± std' cell of summary.md
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _check_split(out, split, empty_warnings):
    ev, seg = out / "evaluation" / split, out / "segment" / split
    rows = _read_csv(ev / "metrics_per_case.csv")
    assert sorted((r["case"], r["method"]) for r in rows) == sorted((c, m) for c in CASES for m in METHODS)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0, r
        assert all(int(r[k]) >= 0 for k in ("components", "holes", "reference_components", "reference_holes"))
        hd, hd95, hd95_avg, asd = (float(r[k]) for k in DISTANCES)
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(seg / r["case"] / f"{r['method']}_labelmap.png")))
        if (prediction == int(r["label"])).any():  # the references are never empty
            assert 0.0 <= hd95 <= hd and 0.0 <= asd <= hd and math.isfinite(hd), r
        else:
            assert math.isnan(hd) and math.isnan(hd95) and math.isnan(asd) and float(r["dice"]) == 0.0, r
            assert (r["case"], r["method"]) in empty_warnings, r

    summary = _read_csv(ev / "summary.csv")
    assert sorted(s["method"] for s in summary) == sorted(METHODS)
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in (ev / "summary.md").read_text().splitlines()
             if line.startswith("| ") and line.count("|") == 13 and line.split("|")[1].strip() in METHODS}
    for s in summary:
        group = [r for r in rows if r["method"] == s["method"] and r["label"] == s["label"]]
        assert int(s["n"]) == len(group) == N_TEST
        cells = [s["structure"], s["n"]]
        for name, digits in (("dice", 3), ("hd", 2), ("hd95", 2), ("hd95_avg", 2), ("asd", 2)):
            values = np.array([float(r[name]) for r in group])
            mean, std = (np.nan, np.nan) if np.isnan(values).all() else (np.nanmean(values), np.nanstd(values))
            np.testing.assert_allclose([float(s[f"{name}_mean"]), float(s[f"{name}_std"])], [mean, std],
                                       rtol=1e-12, equal_nan=True)
            cells.append(_cell(mean, std, digits))
        components = np.array([int(r["components"]) for r in group])
        topology = [(r["components"], r["holes"]) == (r["reference_components"], r["reference_holes"])
                    for r in group]
        numbers = [components.mean(), np.mean(components == 1), np.mean([int(r["holes"]) for r in group]),
                   np.mean(topology)]
        np.testing.assert_allclose([float(s[k]) for k in ("components_mean", "single_component_fraction",
                                                          "holes_mean", "same_topology_fraction")], numbers)
        cells.extend(f"{v:.2f}" for v in numbers)
        assert table[s["method"]] == cells, s["method"]

    transforms = _read_csv(ev / "transforms_per_case.csv")
    assert sorted((t["case"], t["method"]) for t in transforms) == sorted(
        (c, m) for c in CASES for m in ("onepass", "refine"))
    for t in transforms:
        values = {k: float(v) for k, v in t.items() if k not in ("case", "method")}
        assert all(math.isfinite(v) and v >= 0 for v in values.values()), t
        assert values["ic_dsc"] <= 1 and values["nonpositive_jacobian_fraction"] <= 1, t
    quality = _read_csv(ev / "quality_control.csv")
    assert sorted(q["case"] for q in quality) == CASES
    assert all(0 <= float(q["qc_score"]) <= 1 and 0 <= float(q["refine_dice"]) <= 1 for q in quality)


def test_demo_writes_outputs_summary_and_report(tmp_path):
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_demo(tmp_path / "demo", epochs=1, n_train=N_TRAIN, n_test=N_TEST, progress=False)
    text = summary.read_text()
    assert "## clean test set" in text and "## corrupt test set" in text and "refine" in text
    assert (tmp_path / "demo" / "model" / "model.ckpt").is_file()
    assert len(list((tmp_path / "demo" / "segment" / "corrupt").iterdir())) == 2
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "Refine" in html and "data:image/png;base64," in html

    empty = {m.groups() for w in caught
             for m in [re.match(r"case '(.+)', method '(.+)': label \d+ is empty", str(w.message))] if m}
    for split in ("clean", "corrupt"):
        assert (tmp_path / "demo" / "evaluation" / split / "summary.md").read_text() in text
        _check_split(tmp_path / "demo", split, empty)
