"""Tests of atlasreg.models.monitor: what training shows (console, TensorBoard), and that showing it
changes no training number."""

import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from atlasreg.models.monitor import (LossProgressBar, StepLosses, due, enlarge, grey_rgb, label_colours, mosaic,
                                     outlined, outlines, planes, quiet_lightning)


# ---------------------------------------------------------------- helpers of the images
def test_outlines_are_the_inner_rim_of_each_structure():
    labels = torch.zeros(8, 9, dtype=torch.long)
    labels[1:6, 1:5] = 1       # a 5 x 4 block
    labels[2:5, 5:8] = 2       # touching it on its right
    rim = outlines(labels)
    inside = torch.zeros_like(rim)
    inside[2:5, 2:4] = True    # the block's pixels with all four neighbours in the block
    assert torch.equal(rim[1:6, 1:5], ~inside[1:6, 1:5])
    assert not rim[labels == 0].any()
    assert rim[3, 5] and not rim[3, 6] and rim[3, 7]  # structure 2: its column beside 1 and its right edge
    # at the image border the structure continues (a structure filling the image has no outline)
    assert not outlines(torch.ones(4, 4, dtype=torch.long)).any()
    # width 2: two pixels of the block's rim
    assert outlines(labels, 2)[1:6, 1:5].all()


def test_outlined_draws_each_structure_in_its_colour_on_the_grey_image():
    image = torch.linspace(0, 1, 64).reshape(8, 8)
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[2:7, 2:7] = 1
    colours = label_colours(2)
    picture = outlined(image, labels, colours, width=1)
    assert picture.shape == (3, 8, 8) and 0 <= picture.min() and picture.max() <= 1
    rim = outlines(labels)
    assert torch.equal(picture[:, rim], colours[1][:, None].expand(3, int(rim.sum())))
    grey = grey_rgb(image)
    assert torch.equal(picture[:, ~rim], grey[:, ~rim])
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_grey_rgb_stretches_percentiles_and_shows_a_constant_image_black():
    image = torch.arange(101.0).reshape(1, 101)
    grey = grey_rgb(image)
    assert grey[0, 0, 0] == 0 and grey[0, 0, -1] == 1 and grey[0, 0, 50] == pytest.approx(0.5)
    assert torch.equal(grey_rgb(torch.full((3, 3), 7.0)), torch.zeros(3, 3, 3))


def test_label_colours_black_background_and_distinct_structures():
    for n in (2, 4, 11, 41):
        colours = label_colours(n)
        assert colours.shape == (n, 3) and torch.equal(colours[0], torch.zeros(3))
        shown = min(n - 1, 20)
        assert len({tuple(c.tolist()) for c in colours[1:1 + shown]}) == shown  # no repeats up to 20


def test_enlarge_planes_and_mosaic():
    small = torch.arange(6).reshape(2, 3)
    big = enlarge(small, at_least=7)
    assert big.shape == (6, 9) and torch.equal(big[::3, ::3], small)
    assert torch.equal(enlarge(small, at_least=2), small)
    volume = torch.arange(3 * 4 * 5).reshape(3, 4, 5)
    axial, coronal, sagittal = planes(volume)
    assert torch.equal(axial, volume[1]) and torch.equal(coronal, volume[:, 2])
    assert torch.equal(sagittal, volume[:, :, 2])
    assert len(planes(small)) == 1 and planes(small)[0] is small
    a, b = torch.full((3, 2, 3), 0.25), torch.full((3, 4, 1), 0.5)
    out = mosaic([[a, b], [b]], gap=1)
    assert out.shape == (3, 2 * 4 + 1, 2 * 3 + 1)
    assert torch.equal(out[:, :2, :3], a) and torch.equal(out[:, :4, 4:5], b) and torch.equal(out[:, 5:9, :1], b)
    assert (out[:, 4] == 1).all() and (out[:, :, 3] == 1).all() and (out[:, 2:4, :3] == 1).all()  # gaps, padding


def test_due_every_n_epochs_and_after_the_last():
    assert [e for e in range(12) if due(5, e, 12)] == [4, 9, 11]
    assert [e for e in range(10) if due(5, e, 10)] == [4, 9]
    assert not any(due(0, e, 10) for e in range(10))
    assert [e for e in range(3) if due(25, e, 3)] == [2]


# ---------------------------------------------------------------- console
def test_quiet_lightning_holds_back_banners_and_unactionable_warnings_only_inside():
    lightning_log = logging.getLogger("lightning.pytorch")
    before = lightning_log.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            assert lightning_log.getEffectiveLevel() == logging.WARNING
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`.")
            warnings.warn("a warning the user can act on")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
    assert [str(w.message) for w in caught] == ["a warning the user can act on",
                                                "`isinstance(treespec, LeafSpec)` is deprecated, use ..."]
    assert lightning_log.level == before


def test_progress_bar_shows_the_running_losses_the_method_has_on_stderr(capsys):
    bar = LossProgressBar()
    full = SimpleNamespace(epoch_losses=lambda: {"loss/total": 0.25, "loss/seg": 0.125, "loss/a2s": 0.1,
                                                 "loss/reg": 0.0012, "w": 0.5})
    assert bar.get_metrics(None, full) == {"loss": "0.2500", "seg": "0.1250", "reg": "1.20e-03"}
    unet = SimpleNamespace(epoch_losses=lambda: {"loss/total": 0.5, "loss/seg": 0.5})
    assert bar.get_metrics(None, unet) == {"loss": "0.5000", "seg": "0.5000"}
    assert bar.get_metrics(None, SimpleNamespace(epoch_losses=dict)) == {}
    bar._trainer = SimpleNamespace()  # the bar reads only its own settings when made
    capsys.readouterr()
    tqdm_bar = bar.init_train_tqdm()
    tqdm_bar.set_postfix(bar.get_metrics(None, full))
    tqdm_bar.close()
    shown = capsys.readouterr()
    assert shown.out == "" and "loss=0.2500, seg=0.1250, reg=1.20e-03" in shown.err


def test_step_losses_writes_the_losses_of_every_nth_step_at_its_index():
    written = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: written.append((step, metrics)))
    module = SimpleNamespace(step_losses={"loss/total": torch.tensor(0.5), "loss/seg": torch.tensor(0.25), "w": 1.0})
    callback = StepLosses()
    for global_step, every in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 2)):
        callback.on_train_batch_end(SimpleNamespace(global_step=global_step, log_every_n_steps=every, logger=logger),
                                    module, None, None, 0)
    assert [s for s, _ in written] == [0, 1, 2, 4]
    assert written[0][1] == {"loss_step/total": 0.5, "loss_step/seg": 0.25}


# ---------------------------------------------------------------- training with the validation pass
def _config(tmp_path, validation: bool) -> dict:
    """The SIGKILL test's tiny Letter-B run (augmentation and fade-in on, so every random state counts),
    3 epochs, with a validation split and every monitor due at every epoch or every other one."""
    from atlasreg.config import load_config

    data = {"train": {"images": str(tmp_path / "train"), "image_suffix": "_img", "label_suffix": "_seg"},
            "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]}
    if validation:
        data["validation"] = {"images": str(tmp_path / "val"), "image_suffix": "_img", "label_suffix": "_seg"}
    return load_config(None, {
        "data": data,
        "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4]},
        "training": {"epochs": 3, "batch_size": 3, "atlas_batch_size": 4, "threads": 1,
                     "fade_in": {"e0": 1, "tau": 1}, "affine_start_epoch": 1, "augmentation": {"enabled": True},
                     "validation_every": 1, "refine_validation_every": 2, "refine_validation_cases": 2,
                     "images_every": 2, "validation_cases": 2},
        "refinement": {"iterations": 3, "cases_at_once": 2}})


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    return scalars, images


def test_validation_pass_logs_metrics_and_images_and_changes_no_training_number(tmp_path):
    """Issue 13 item 2: with a validation split the TensorBoard log holds Dice and HD95 of ITN, 1-pass
    and refine, the learning rate, the losses of every step and images; the run's weights, optimiser,
    atlas, random states and losses are bit for bit those of the same run without validation; and the
    last epoch's 1-pass Dice is the one the final checkpoint gives on the validation cases."""
    from lightning.pytorch.callbacks import Callback

    from atlasreg.data.case_dataset import CaseDataset
    from atlasreg.data.letter_b import write_letter_b_dataset
    from atlasreg.evaluation.metrics import batch_dice_hd95
    from atlasreg.models.monitor import segmentations
    from atlasreg.models.train import load_module, train
    from test_train import _equal

    torch.set_num_threads(1)
    write_letter_b_dataset(tmp_path / "train", 7, seed=0, size=32)
    write_letter_b_dataset(tmp_path / "val", 3, seed=1, start_index=101, size=32)

    def run(name, validation):
        losses = []

        class Record(Callback):
            def on_train_epoch_end(self, trainer, module):
                losses.append(module.epoch_losses())

        ckpt = train(_config(tmp_path, validation), tmp_path / name, resume=False, progress=False,
                     callbacks=[Record()])
        return losses, torch.load(ckpt, weights_only=False)

    plain_losses, plain = run("plain", False)
    losses, checked = run("validated", True)
    assert losses == plain_losses and len(losses) == 3
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "atlasreg_random_states", "global_step"):
        assert _equal(checked[key], plain[key]), key

    scalars, images = _events(tmp_path / "validated")
    plain_scalars, plain_images = _events(tmp_path / "plain")
    # every training scalar is the same, and only the validation adds some
    shared = {t: v for t, v in scalars.items() if not t.startswith(("val/", "time/"))}
    assert shared == {t: v for t, v in plain_scalars.items() if not t.startswith("time/")}
    ends = [2, 5, 8]  # 7 cases in batches of 3: the last step of each epoch
    assert [s for s, _ in scalars["loss_step/total"]] == list(range(9))
    assert {"loss_step/seg", "loss_step/a2s", "loss_step/s2a", "loss_step/reg"} <= set(scalars)
    assert [s for s, _ in scalars["loss/total"]] == ends
    assert [s for s, _ in scalars["lr-Adam"]] == [0, 3, 6] and scalars["lr-Adam"][0][1] == pytest.approx(1e-3)
    for output in ("itn", "onepass"):
        assert [s for s, _ in scalars[f"val/dice_{output}"]] == ends
        assert all(0 <= v <= 1 for _, v in scalars[f"val/dice_{output}"])
    assert [s for s, _ in scalars["val/dice_refine"]] == [5, 8]  # every other epoch and the last
    assert all(v > 0 for _, v in scalars["val/hd95_onepass"] + scalars["val/hd95_refine"])
    assert [s for s, _ in scalars["time/validation_s"]] == ends
    assert set(images) == {"atlas_image", "atlas_labelmap", "validation/B101", "validation/B102"}
    assert [s for s, _, _ in images["validation/B101"]] == [5, 8]
    assert images["validation/B101"][0][1:] == (3 * 256 + 2 * 2, 256)  # reference, ITN, 1-pass; 16 px x 16
    assert set(plain_images) == {"atlas_image", "atlas_labelmap"}  # no validation split: the atlas only

    # the last pass measured the model the final checkpoint holds (the atlas after the last update)
    module = load_module(tmp_path / "validated" / "model.ckpt")
    cases = CaseDataset.from_config(module.config, "validation")
    images_ = torch.stack([cases[i][0] for i in range(len(cases))])
    reference = torch.stack([cases[i][1] for i in range(len(cases))]).argmax(1)
    for output, labels in segmentations(module, images_).items():
        dice, _ = batch_dice_hd95(labels, reference, 2, module.config["model"]["spacing"])
        assert scalars[f"val/dice_{output}"][-1][1] == pytest.approx(float(dice.mean()), abs=1e-6), output
    assert not math.isnan(scalars["val/dice_itn"][-1][1])
