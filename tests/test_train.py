"""Tests of atlasreg.models.train: its helpers, and the numbers of training with workers and the case cache."""

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


def test_same_seed_same_numbers_with_workers_and_cache(tmp_path):
    """Training reads its cases through a DataLoader: workers and the case cache change neither the
    batches nor any number (epoch losses, weights and atlas after 2 epochs)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from atlasreg.config import load_config
    from atlasreg.data.letter_b import write_letter_b_dataset
    from atlasreg.models.train import train

    torch.set_num_threads(1)
    write_letter_b_dataset(tmp_path / "train", 7, seed=0, size=32)

    def run(name, data):
        losses = []

        class Record(Callback):
            def on_train_epoch_end(self, trainer, module):
                losses.append(module.epoch_losses())

        cfg = load_config(None, {
            "data": {"train": {"images": str(tmp_path / "train"), "image_suffix": "_img", "label_suffix": "_seg"},
                     "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0], **data},
            "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4]},
            "training": {"epochs": 2, "batch_size": 3, "atlas_batch_size": 4, "fade_in": None,
                         "augmentation": {"enabled": False}}})
        ckpt = train(cfg, tmp_path / name, resume=False, progress=False, callbacks=[Record()])
        return losses, torch.load(ckpt, weights_only=False)["state_dict"]

    ref_losses, ref_state = run("plain", {"cache": False})
    assert len(ref_losses) == 2 and not (tmp_path / "plain" / "cache").exists()
    for name, data in (("cache", {"cache": True}), ("workers", {"cache": True, "num_workers": 1})):
        losses, state = run(name, data)
        assert losses == ref_losses, name
        assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state), name
    assert len(list((tmp_path / "cache" / "cache").rglob("*.f32"))) == 7


def test_bad_num_workers_is_a_clear_error(tmp_path):
    import pytest

    from atlasreg.config import load_config
    from atlasreg.errors import AtlasregError

    with pytest.raises(AtlasregError, match=r"^data.num_workers: expected an integer >= 0, got -1$"):
        load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}, "num_workers": -1}})
    assert not (tmp_path / "run").exists()
