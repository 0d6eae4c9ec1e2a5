"""Tests of atlasreg.models.train helpers that need no training run."""

from types import SimpleNamespace

from atlasreg.models.train import EpochTimer


def _end_epoch(metrics: dict, capsys) -> str:
    timer = EpochTimer(verbose=True)
    module = SimpleNamespace(atlas_update_seconds=0.5, log=lambda *a, **k: None, epoch_losses=lambda: metrics)
    trainer = SimpleNamespace(current_epoch=3)
    timer.on_train_epoch_start(trainer, module)
    timer.on_train_batch_end(trainer, module, None, None, 0)
    timer.on_train_epoch_end(trainer, module)
    assert len(timer.times) == 1 and timer.times[0][1] == 0.5
    return capsys.readouterr().out


def test_epoch_line_shows_only_the_losses_the_method_has(capsys):
    unet = _end_epoch({"loss/total": 0.25, "loss/seg": 0.25}, capsys)
    assert unet.startswith("epoch    3  loss 0.2500  seg 0.2500  train ")
    assert "a2s" not in unet and "nan" not in unet and unet.rstrip().endswith("atlas 0.5s")
    full = _end_epoch({"loss/total": 0.3, "loss/seg": 0.1, "loss/a2s": 0.1, "loss/s2a": 0.05,
                       "loss/reg": 0.002, "w": 0.5}, capsys)
    assert "a2s 0.1000  s2a 0.0500  reg 2.00e-03  w 0.500" in full
