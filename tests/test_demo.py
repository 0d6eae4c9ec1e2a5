"""The demo end to end on a very short schedule: data, model, outputs, summary and report."""

import torch

from atlasreg.demo import run_demo


def test_demo_writes_outputs_summary_and_report(tmp_path):
    torch.set_num_threads(1)
    summary = run_demo(tmp_path / "demo", epochs=1, n_train=6, n_test=2, progress=False)
    text = summary.read_text()
    assert "## clean test set" in text and "## corrupt test set" in text and "refine" in text
    assert (tmp_path / "demo" / "model" / "model.ckpt").is_file()
    assert len(list((tmp_path / "demo" / "segment" / "corrupt").iterdir())) == 2
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "Refine" in html and "data:image/png;base64," in html
