"""Tests of atlasreg.models.train: its helpers, and the numbers of training with workers and the case cache."""

from types import SimpleNamespace

from atlasreg.models.train import EpochTimer


def _end_epoch(metrics: dict, capsys) -> str:
    timer = EpochTimer(verbose=True)
    module = SimpleNamespace(atlas_update_seconds=0.5, log=lambda *a, **k: None, epoch_losses=lambda: metrics)
    trainer = SimpleNamespace(current_epoch=3, is_global_zero=True)
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


def _tiny_run_config(tmp_path, epochs: int):
    """A Letter-B config (7 cases of 32x32, 16x16 model grid) with augmentation and fade-in on, so a
    resume must restore every random state; written to a YAML file."""
    import yaml

    from atlasreg.data.letter_b import write_letter_b_dataset

    write_letter_b_dataset(tmp_path / "train", 7, seed=0, size=32)
    cfg = {"data": {"train": {"images": str(tmp_path / "train"), "image_suffix": "_img", "label_suffix": "_seg"},
                    "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
           "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4]},
           "training": {"epochs": epochs, "batch_size": 3, "atlas_batch_size": 4, "threads": 1,
                        "fade_in": {"e0": 1, "tau": 1}, "affine_start_epoch": 1,
                        "augmentation": {"enabled": True}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_command(config, out, *extra):
    import sys
    from pathlib import Path

    import atlasreg

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(atlasreg.__file__).parents[1])}
    return [sys.executable, "-m", "atlasreg.cli", "train", str(config), "--out", str(out), "--quiet", *extra], env


def _scalars(run):
    """{tag: [(step, value), ...]} of the TensorBoard log of a training run folder (asserting it is one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted((run / "logs").iterdir())
    assert [v.name for v in versions] == ["version_0"], versions
    acc = EventAccumulator(str(versions[0]))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith("time/")}


def _equal(a, b) -> bool:
    """Deep equality of checkpoint contents (tensors bit for bit)."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Issue 14 item 3: a run killed with SIGKILL after epoch 1 and resumed ends with the same weights,
    atlas, optimiser state and random states as an uninterrupted run, and the same losses in one
    TensorBoard log (the killed run's events after its last checkpoint are purged)."""
    import signal
    import subprocess

    import torch

    config = _tiny_run_config(tmp_path, epochs=5)
    cmd, env = _train_command(config, tmp_path / "whole")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)

    cmd, env = _train_command(config, tmp_path / "killed")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("epoch    1"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model.ckpt").exists()
    resumed = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "resuming from" in resumed.stdout

    whole = torch.load(tmp_path / "whole" / "model.ckpt", weights_only=False)
    again = torch.load(tmp_path / "killed" / "model.ckpt", weights_only=False)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "atlasreg_random_states", "epoch", "global_step"):
        assert _equal(whole[key], again[key]), key
    assert whole["state_dict"]["atlas_labelmap"].std() > 0  # the atlas is in the compared state
    assert _scalars(tmp_path / "killed") == _scalars(tmp_path / "whole")


def test_resume_with_another_config_is_refused(tmp_path):
    """Issue 14 item 3: `train` into a folder holding a run compares the configs: another lambda is a
    one-line error naming the key and both values, and nothing in the folder changes; more epochs
    continue the run; --force-new starts over (no older checkpoint, log or atlas survives)."""
    import subprocess

    config = _tiny_run_config(tmp_path, epochs=1)
    out = tmp_path / "run"
    cmd, env = _train_command(config, out)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if "cache" not in p.parts}

    changed = subprocess.run(cmd + ["--set", "training.lambda=0.5"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"atlasreg: error: {out / 'config.yaml'}: ")
    assert "training.lambda: " in lines[0] and "-> 0.5" in lines[0] and "--force-new" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if "cache" not in p.parts} == before

    longer = subprocess.run(cmd + ["--epochs", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0 and "resuming from" in longer.stdout
    assert "epoch    1" in longer.stdout and "epoch    0" not in longer.stdout

    fresh = subprocess.run(cmd + ["--set", "training.lambda=0.5", "--force-new"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout and "epoch    0" in fresh.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch0000.ckpt", "last.ckpt"]
    assert "lambda: 0.5" in (out / "config.yaml").read_text()


def test_what_training_shows_may_change_on_resume(tmp_path):
    """The validation and image settings change no training number, so a run resumes with other
    values of them, and a run stored before they existed resumes; another lambda is still refused."""
    import pytest
    import yaml

    from atlasreg.config import load_config
    from atlasreg.errors import AtlasregError
    from atlasreg.models.train import _check_resumable

    base = {"data": {"labels": {0: "bg", 1: "fg"}}}
    stored = yaml.safe_load(yaml.safe_dump(load_config(None, base)))
    for key in ("validation_every", "refine_validation_every", "refine_validation_cases", "images_every",
                "validation_cases"):
        del stored["training"][key]  # a run of the code before these keys
    shown = {"validation_every": 1, "refine_validation_every": 0, "refine_validation_cases": 2,
             "images_every": 3, "validation_cases": 0}
    _check_resumable(stored, load_config(None, {**base, "training": shown}), tmp_path)
    with pytest.raises(AtlasregError, match=r"training\.lambda: 0\.126 -> 0\.5"):
        _check_resumable(stored, load_config(None, {**base, "training": {**shown, "lambda": 0.5}}), tmp_path)


def test_a_run_stored_before_a_new_setting_resumes_only_at_its_default(tmp_path):
    """A setting a newer atlasreg added (model.stn_activation, refinement.structures) is missing from
    an older run's config.yaml: at its default value the run is the same and resumes; at another value
    it is another run, refused with the key named."""
    import pytest
    import yaml

    from atlasreg.config import load_config
    from atlasreg.errors import AtlasregError
    from atlasreg.models.train import _check_resumable

    base = {"data": {"labels": {0: "bg", 1: "fg"}}}
    stored = yaml.safe_load(yaml.safe_dump(load_config(None, base)))
    del stored["model"]["stn_activation"], stored["refinement"]["structures"]
    _check_resumable(stored, load_config(None, base), tmp_path)
    with pytest.raises(AtlasregError, match=r"model\.stn_activation: <unset> -> leaky_relu"):
        _check_resumable(stored, load_config(None, {**base, "model": {"stn_activation": "leaky_relu"}}), tmp_path)


def test_a_method_with_a_training_run_of_its_own_is_trained_by_it(tmp_path):
    """`train` runs the training run of a method that has its own (DeepATLAS: its staged schedule in
    steps, `Method.training_run`), with the same run folder; it trains in one process."""
    import pytest
    import torch

    from atlasreg.contracts import run_paths
    from atlasreg.errors import AtlasregError
    from atlasreg.models.train import train
    from deepatlas_material import letter_b_images, tiny_config

    torch.set_num_threads(1)
    images, _ = letter_b_images(tmp_path / "data", 3)
    config = tiny_config({"images": str(images)}, batch_size=3, channels=[4, 8], autoencoder={"steps": 1},
                         steps_per_level=1, head_warmup_steps=1)
    final = train(config, tmp_path / "run", progress=False)
    state = torch.load(final, weights_only=False)
    assert state["atlasreg"]["method"] == "deepatlas" and state["global_step"] == 4
    assert state["deepatlas"]["stage"] == "stage 2/2" and run_paths(tmp_path / "run").config.is_file()
    with pytest.raises(AtlasregError, match=r"model.method deepatlas trains in one process \(--devices 1"):
        train(config, tmp_path / "other", devices=2)
    assert not (tmp_path / "other").exists()
