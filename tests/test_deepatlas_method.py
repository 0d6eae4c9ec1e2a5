"""atlasreg.deepatlas.method: the DeepATLAS schedule (Secs. 5.2.3-5.2.6, 5.3.2), its losses and ablations
(Secs. 2.3, 5.1, Table 5), staged training with Lightning, checkpoints and resume."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from atlasreg.config import load_config
from atlasreg.data.case_dataset import CaseDataset
from atlasreg.deepatlas.coordinates import identity_coordinates, resize
from atlasreg.deepatlas.method import (AUTOENCODER, COORDINATES, SEED, WARMUP, DeepAtlasModule, pretrain, schedule,
                                       stage_at, template_grid)
from atlasreg.errors import AtlasregError
from atlasreg.models.registry import load_model
from deepatlas_material import letter_b_images, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return letter_b_images(tmp_path_factory.mktemp("letter_b"), 6)


def test_schedule_is_the_papers():
    """Defaults: the autoencoder's 20,000 steps at 0.005 (5.3.2), then per level 7,500 steps at 0.005
    halved per level, each new head first warmed up; learning rate from 10% to 100% over 500 steps, x0.995
    every 50 (5.2.6). The MSE ablation has no autoencoder."""
    cfg = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"method": "deepatlas"}})
    stages = schedule(cfg)
    assert [(s.kind, s.levels, s.steps, s.lr) for s in stages[:4]] == [
        (AUTOENCODER, 0, 20000, 0.005), (COORDINATES, 1, 7500, 0.005), (WARMUP, 2, 500, 0.0025),
        (COORDINATES, 2, 7500, 0.0025)]
    assert [s.name for s in stages[-2:]] == ["head warm-up 5/5", "stage 5/5"]
    assert stages[-1].lr == 0.005 / 16 and stages[-1].end == 20000 + 5 * 7500 + 4 * 500
    assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
    first = stages[1]
    assert first.learning_rate(first.start) == pytest.approx(0.0005)
    assert first.learning_rate(first.start + 250) == pytest.approx(0.005 * (0.1 + 0.9 * 0.5) * 0.995 ** 5)
    assert first.learning_rate(first.start + 500) == pytest.approx(0.005 * 0.995 ** 10)
    assert stages[0].learning_rate(149) == pytest.approx(0.005 * 0.995 ** 2)
    assert stage_at(stages, 20000) is first and stage_at(stages, 10 ** 9) is stages[-1]
    mse = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"method": "deepatlas"},
                             "deepatlas": {"losses": {"similarity": "mse"}}})
    assert schedule(mse)[0].kind == COORDINATES and DeepAtlasModule(mse).autoencoder is None
    seeded = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"method": "deepatlas"},
                                "deepatlas": {"seed_atlas": "case1", "seed_steps": 300}})
    assert [(s.kind, s.levels, s.steps, s.lr) for s in schedule(seeded)[:3]] == [
        (AUTOENCODER, 0, 20000, 0.005), (SEED, 1, 300, 0.005), (COORDINATES, 1, 7500, 0.005)]


def _dataset(cfg, labelled=False):
    return CaseDataset.from_config(load_config(None, cfg), labelled=labelled)


def test_losses_of_identical_exams_with_identity_maps_and_the_ablations(folders):
    """Two copies of one exam whose coordinate maps are the identity: the implicit warp is the identity
    and its similarity and smoothness are 0; the explicit smoothness is 0 and, with the atlas seeded
    from that exam, the explicit similarity is small. Each ablation of Table 5 leaves out its terms;
    gradients reach the atlas and the network."""
    images, labels = folders
    cfg = load_config(None, tiny_config({"images": str(images)}, seed_atlas="B2"))
    data = CaseDataset.from_config(cfg, labelled=False)
    module = DeepAtlasModule(cfg)
    module.set_training_data(data)
    assert module.seed_atlas() == "B2"
    image, _, _, mask = data[1]
    crops, points = module.seed_crops(6)  # Sec. 5.2.5: crops of the seed case at known positions
    extent = points.amax((2, 3)) - points.amin((2, 3))  # (6, 2): twice the scale s along x and y
    assert crops.shape == (6, 1, 32, 32) and points.abs().max() <= 1.0 + 1e-6
    assert torch.allclose(extent[:, 0], extent[:, 1]) and extent.min() >= 1.0 - 1e-6 and extent.max() <= 2.0 + 1e-6
    whole = DeepAtlasModule(load_config(None, tiny_config({"images": str(images)}, seed_atlas="B2",
                                                          seed_crop_scale=[1.0, 1.0])))
    whole.set_training_data(data)
    whole.seed_atlas()
    crops, points = whole.seed_crops(2)
    assert torch.allclose(points, identity_coordinates((32, 32)).expand(2, -1, -1, -1))
    assert torch.allclose(crops, image[None].expand(2, -1, -1, -1), atol=1e-4)  # the whole seed case
    seeded = module.atlas.tensor.detach()
    assert seeded.shape == (1, 2, 64, 64) and torch.allclose(seeded[:, :1], resize(image[None], (64, 64)))
    x = image[None].expand(2, -1, -1, -1)
    fg = (mask[None] > 0.5).float().expand(2, -1, -1, -1)
    identity = identity_coordinates((32, 32)).expand(2, -1, -1, -1)
    module.net.forward = lambda *args, **kwargs: identity.clone().requires_grad_(True)
    out = module.registration_losses(x, torch.zeros(2, 0, 32, 32), fg)
    assert set(out) == {"explicit_sim", "explicit_smooth", "implicit_sim", "implicit_smooth", "total"}
    assert out["implicit_sim"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["implicit_smooth"].item() == pytest.approx(0.0, abs=1e-9)  # float32 round-off of log det 1
    assert out["explicit_smooth"].item() == pytest.approx(0.0, abs=1e-9)
    # the atlas is the exam resampled twice (onto the atlas grid, then at the exam's voxels): close, not equal
    other = DeepAtlasModule(load_config(None, tiny_config({"images": str(images)}, seed_atlas="B3")))
    other.set_training_data(data)
    other.seed_atlas()
    other.net.forward = module.net.forward
    other.autoencoder.load_state_dict(module.autoencoder.state_dict())
    assert 0.0 < out["explicit_sim"].item() < 0.2 * other.registration_losses(x, x[:, :0], fg)["explicit_sim"].item()
    assert out["total"].item() == pytest.approx(sum(out[k].item() for k in out if k != "total"))

    for losses, keys in (({"implicit": False}, {"explicit_sim", "explicit_smooth"}),
                         ({"explicit": False}, {"implicit_sim", "implicit_smooth"}),
                         ({"similarity": "mse", "gradient_channel": False},
                          {"explicit_sim", "explicit_smooth", "implicit_sim", "implicit_smooth"})):
        torch.manual_seed(0)  # an untrained network whose two maps overlap (else Phi_I has no gradient)
        ablation = DeepAtlasModule(load_config(None, tiny_config({"images": str(images)}, losses=losses)))
        two = torch.stack([data[1][0], data[2][0]])  # two exams (identical ones give Phi_I no gradient)
        terms = ablation.registration_losses(two, two[:, :0], torch.stack([data[1][3], data[2][3]]))
        assert set(terms) == keys | {"total"}
        terms["total"].backward()
        grads = [p.grad for p in ablation.net.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        atlas_grad = ablation.atlas.tensor.grad
        assert (atlas_grad is not None and atlas_grad.abs().sum() > 0) == ("explicit_sim" in keys)
    mse = DeepAtlasModule(load_config(None, tiny_config({"images": str(images)},
                                                        losses={"similarity": "mse", "gradient_channel": False})))
    assert mse.atlas.tensor.shape[1] == 1 and mse.autoencoder is None
    assert mse.similarity(x + 1.0, x, fg).item() == pytest.approx(1.0)  # MSE of a shift by 1


def test_mask_channels_read_the_labels_and_need_them(folders, tmp_path):
    images, labels = folders
    with_labels = tiny_config({"images": str(images), "labels": str(labels)}, losses={"mask_channels": True})
    module = DeepAtlasModule(load_config(None, with_labels))
    assert module.atlas.tensor.shape[1] == 3  # image, gradient, the letter's mask
    data = _dataset(with_labels, labelled=True)
    image, labelmap, _, _ = data[0]
    x = module.exam_channels(image[None], labelmap[None])
    assert torch.equal(x[:, 2:], (labelmap[None, 1:] > 0.5).float())
    no_labels = tiny_config({"images": str(images)}, losses={"mask_channels": True})
    with pytest.raises(AtlasregError, match=r"B1\.png: no labelmap for this image"):
        pretrain(no_labels, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(AtlasregError, match="deepatlas.seed_atlas: case 'B99' is not in the training set"):
        m = DeepAtlasModule(load_config(None, tiny_config({"images": str(images)}, seed_atlas="B99")))
        m.set_training_data(_dataset(tiny_config({"images": str(images)})))
        m.seed_atlas()
    with pytest.raises(AtlasregError, match="atlasreg deepatlas template"):
        module.predict(image[None])


class Recorder(Callback):
    """Per step: the stage, the active heads and which parameter groups the step changed."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), self.before[n])}
        stage = module.stage(self.step)
        self.steps.append((stage, module.net.active_levels, changed, module.step_losses["lr"] / stage.learning_rate(
            self.step), int(module.levels_trained)))


@pytest.fixture(scope="module")
def staged_run(folders, tmp_path_factory):
    images, _ = folders
    config = tiny_config({"images": str(images)}, augmentation=True, seed_atlas="B1", seed_steps=2)
    recorder = Recorder()
    out = tmp_path_factory.mktemp("staged") / "run"
    final = pretrain(config, out, progress=False, callbacks=[recorder])
    return config, out, final, recorder


def test_staged_training_switches_heads_one_at_a_time(staged_run):
    """5.3.2, 5.2.5 then 5.2.3 on six unlabelled 32 x 32 Letter-B images: the autoencoder's steps change
    the autoencoder alone; the seed crops only the first level's parameters; a head warm-up only the new
    level's (its head, gate and decoder block) with the coarser heads active; a stage changes the
    network and the atlas, never the frozen autoencoder, with one more head each time."""
    config, out, final, recorder = staged_run
    module = DeepAtlasModule(load_config(None, config))
    names = dict((id(p), n) for n, p in module.named_parameters())
    net = {n for n in names.values() if n.startswith("net.")}
    kinds = [(s.kind, s.levels) for s, *_ in recorder.steps]
    assert kinds == [(AUTOENCODER, 0)] * 2 + [(SEED, 1)] * 2 + [(COORDINATES, 1)] * 2 + [(WARMUP, 2)] * 2 + \
        [(COORDINATES, 2)] * 2 + [(WARMUP, 3)] * 2 + [(COORDINATES, 3)] * 2
    for stage, active, changed, lr_ratio, trained in recorder.steps:
        assert lr_ratio == pytest.approx(1.0)  # the schedule's learning rate at that step
        if stage.kind == AUTOENCODER:
            assert changed and all(n.startswith("autoencoder.") for n in changed) and trained == 0
        elif stage.kind in (SEED, WARMUP):  # the first level's parameters, or the new level's
            module.net.active_levels = stage.levels
            level = {names[id(p)] for p in module.net.level_parameters()}
            assert active == stage.levels and changed and changed <= level
            assert trained == stage.levels - 1
            assert any(".gates." in n or ".heads." in n for n in changed)
        else:
            assert active == stage.levels == trained
            assert "atlas.tensor" in changed and changed & net
            assert not any(n.startswith("autoencoder.") for n in changed)


def test_the_checkpoint_holds_config_atlas_and_stage(staged_run):
    config, out, final, _ = staged_run
    state = torch.load(final, weights_only=False)
    assert state["deepatlas"] == {"stage": "stage 3/3", "kind": COORDINATES, "levels": 3, "levels_trained": 3,
                                  "step": 14, "total_steps": 14}
    assert state["atlasreg"]["method"] == "deepatlas"
    assert state["hyper_parameters"]["config"] == load_config(None, config)
    module = load_model(final)
    assert isinstance(module, DeepAtlasModule) and module.active_levels == 3
    assert torch.equal(module.atlas.tensor, state["state_dict"]["atlas.tensor"])
    c = module.coordinates(torch.zeros(1, 1, 32, 32))
    assert c.shape == (1, 2, 32, 32) and c.abs().max() <= 1.0
    import SimpleITK as sitk

    from atlasreg.contracts import atlas_paths, run_paths

    atlas = sitk.ReadImage(str(atlas_paths(run_paths(out).atlas).image))
    grid = template_grid(load_config(None, config))
    assert atlas.GetSize() == (64, 64) and atlas.GetSpacing() == pytest.approx(grid.spacing)
    assert grid.spacing == pytest.approx((31 / 63, 31 / 63))  # corner voxel centres on the model grid's
    assert torch.allclose(torch.from_numpy(sitk.GetArrayFromImage(atlas)), module.atlas.tensor[0, 0].detach())


class Interrupt(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 7:
            raise RuntimeError("interrupted")


def test_a_run_resumed_mid_epoch_ends_as_the_uninterrupted_run(staged_run, tmp_path, capsys):
    """Killed after step 7 (checkpoint at step 5, in the middle of an epoch of two batches), resumed:
    the same weights, atlas and optimiser state as the run never interrupted (augmentation on)."""
    config, _, final, _ = staged_run
    with pytest.raises(RuntimeError, match="interrupted"):
        pretrain(config, tmp_path / "run", progress=False, callbacks=[Interrupt()])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    resumed = pretrain(config, tmp_path / "run", progress=False)
    assert "resuming from" in capsys.readouterr().out
    a, b = torch.load(resumed, weights_only=False), torch.load(final, weights_only=False)
    assert a["global_step"] == b["global_step"] == 14
    for key in b["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer_states"][1]["state"][0].values(),
                                                  b["optimizer_states"][1]["state"][0].values()))
    with pytest.raises(AtlasregError, match=r"config\.yaml: holds a run trained with another config "
                                            r"\(deepatlas\.steps_per_level: 2 -> 3\)"):
        pretrain({**config, "deepatlas": {**config["deepatlas"], "steps_per_level": 3}}, tmp_path / "run",
                 progress=False)
    assert not math.isnan(float(a["state_dict"]["atlas.tensor"].sum()))
