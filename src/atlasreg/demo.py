"""The demo: Atlas-ISTN end to end on generated Letter-B data, no external data needed.

Writes under `out/` (the folders' contracts: :mod:`atlasreg.contracts`): data/ (generated train, clean
test and corrupt test pairs), model/ (a training run folder: checkpoints, atlas, TensorBoard logs),
segment/{clean,corrupt}/ (segmentation run folders of `atlasreg segment`), evaluation/{clean,corrupt}/
(evaluation folders: per-case CSV and summary tables), the Markdown summary of both test sets (named
as an evaluation folder's) and report/ (a report folder: tables with paired statistics and figures,
`atlasreg report`).
The schedule is shortened from the paper's (300 epochs on 1000 cases) to run in minutes on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from .contracts import SUMMARY_MD, run_paths

# The config and the steps (torch, SimpleITK) are imported when used: the command line reads
# DEMO_SETTINGS for its --help without them.
DEMO_SETTINGS = {"epochs": 40, "n_train": 300, "n_test": 30}

LETTER_B = {
    "name": "letter_b_demo",
    "data": {"labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
    "model": {"ndim": 2, "size": [64, 64], "spacing": [2.0, 2.0]},
    "training": {"fade_in": {"e0": 5, "tau": 5}},
}


def demo_config(train_folder: str | Path, epochs: int) -> dict:
    """The demo's validated config, training on the Letter-B pairs in `train_folder`; a relative folder
    is resolved against the current working directory, so the checkpoint stores an absolute path."""
    from .config import load_config

    return load_config(None, dict(LETTER_B, data=dict(LETTER_B["data"], train={
        "images": str(train_folder), "image_suffix": "_img", "label_suffix": "_seg"}),
        training=dict(LETTER_B["training"], epochs=epochs)))


def run_demo(out: str | Path = "demo_output", epochs: int | None = None, n_train: int | None = None,
             n_test: int | None = None, progress: bool = True) -> Path:
    """Generate data, train, segment clean and corrupt test images, evaluate; returns the path of the
    Markdown summary of both test sets."""
    from .data.dataset import find_pairs
    from .data.io import write_text
    from .data.letter_b import write_letter_b_dataset
    from .evaluation.evaluate import evaluate_predictions
    from .models.train import load_module, train
    from .report import build_report
    from .segment import segment

    out = Path(out)
    epochs = epochs or DEMO_SETTINGS["epochs"]
    n_train = n_train or DEMO_SETTINGS["n_train"]
    n_test = n_test or DEMO_SETTINGS["n_test"]
    data = out / "data"
    say = print if progress else (lambda *a, **k: None)
    say(f"[1/4] generating Letter-B: {n_train} training, {n_test} clean and {n_test} corrupt test pairs")
    write_letter_b_dataset(data / "train", n_train, seed=0, start_index=1)
    # Test cases: indices after the training ones, so they are new shapes; corrupt = same shapes + clutter.
    write_letter_b_dataset(data / "test_clean", n_test, seed=0, start_index=n_train + 1)
    write_letter_b_dataset(data / "test_corrupt", n_test, seed=0, corrupt=True, start_index=n_train + 1)

    cfg = demo_config(data / "train", epochs)
    say(f"[2/4] training Atlas-ISTN for {epochs} epochs (TensorBoard logs in {run_paths(out / 'model').logs})")
    ckpt = train(cfg, out / "model", resume=True, progress=progress)
    module = load_module(ckpt)
    labels = cfg["data"]["labels"]
    tables = []
    for step, split in ((3, "clean"), (4, "corrupt")):
        say(f"[{step}/4] segmenting and evaluating the {split} test set (ITN, 1-pass, refine)")
        folder = data / f"test_{split}"
        segment(module, [folder], out / "segment" / split, progress=progress, image_suffix="_img")
        refs = {p.name: p.image for p in find_pairs(folder, image_suffix="_seg")}
        info = {"model": cfg["name"], "checkpoint": str(Path(ckpt).resolve()),
                "references": {k: str(Path(v).resolve()) for k, v in refs.items()}}
        _, summary = evaluate_predictions(out / "segment" / split, refs, labels, out / "evaluation" / split,
                                          test_set=split, info=info)
        tables.append(f"## {split} test set\n\n" + Path(summary).read_text())
    text = "# atlasreg demo: Atlas-ISTN on generated Letter-B\n\n" + "\n\n".join(tables)
    summary_path = out / SUMMARY_MD
    write_text(summary_path, text)
    html, _ = build_report([out / "evaluation" / s for s in ("clean", "corrupt")], out / "report",
                           title="atlasreg demo: Atlas-ISTN on generated Letter-B")
    say(text)
    say(f"outputs in {out}; summary table: {summary_path}; report: {html}")
    return summary_path
