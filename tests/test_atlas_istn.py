"""The paper's baselines and variants (Sec. 3.2) as configs of one model: U-Net, Independent, VML,
Atlas-ISTN without L_s, Fixed atlas; trained and applied with the same functions."""

import warnings

import lightning as L
import pytest
import torch

from atlasreg.config import load_config
from atlasreg.data.letter_b import write_letter_b_dataset
from atlasreg.models.atlas_istn import AtlasISTNModule, warn_if_svf_constant
from atlasreg.models.registry import build_method
from atlasreg.models.train import load_module, train
from atlasreg.segment import segment


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("variants")
    write_letter_b_dataset(tmp / "train", 4, seed=0, size=32)
    write_letter_b_dataset(tmp / "test", 2, seed=1, start_index=101, size=32, corrupt=True)
    return tmp


def run_variant(data, name, model=None, training=None):
    cfg = load_config(None, {
        "data": {"train": {"images": str(data / "train"), "image_suffix": "_img", "label_suffix": "_seg"},
                 "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
        "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4], **(model or {})},
        "training": {"epochs": 2, "batch_size": 2, "fade_in": None, **(training or {})},
        "refinement": {"iterations": 2, "cases_at_once": 2}})
    ckpt = train(cfg, data / name, resume=False, progress=False)
    module = load_module(ckpt)
    out = segment(module, [data / "test"], data / f"{name}_seg", progress=False, image_suffix="_img")
    return module, {p.name for p in out[0].iterdir()}


def initial_weights(config):
    """The weights train() starts from (it seeds before building the module)."""
    L.seed_everything(int(config["training"]["seed"]), verbose=False)
    return build_method(config).net


def changed(trained, initial):
    return any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))


def test_unet_trains_the_itn_only_and_writes_itn_outputs(data):
    module, files = run_variant(data, "unet", {"method": "unet"})
    start = initial_weights(module.config)
    assert changed(module.net.itn, start.itn) and not changed(module.net.stn, start.stn)
    assert files == {"itn_labelmap.png", "itn_lcc_labelmap.png", "case.yaml"}


def test_independent_refines_an_untrained_stn_towards_a_fixed_case(data):
    module, files = run_variant(data, "independent", {"method": "unet"}, {"fixed_atlas": "B2"})
    assert {"itn_labelmap.png", "itn_lcc_labelmap.png", "onepass_labelmap.png", "refine_labelmap.png",
            "atlas_labelmap.png", "inverse_displacement.nii.gz"} <= files
    start = initial_weights(module.config)
    assert not changed(module.net.stn, start.stn)  # refinement starts from the untrained STN


def test_fixed_atlas_is_the_named_training_case_and_never_changes(data):
    from atlasreg.data.case_dataset import CaseDataset

    module, files = run_variant(data, "fixed", training={"fixed_atlas": "B3"})
    cases = CaseDataset.from_config(module.config, "train")
    assert torch.allclose(module.atlas_labelmap, cases[cases.index_of("B3")][1][None])
    assert "refine_labelmap.png" in files
    # the epoch means of the losses reach TensorBoard once per epoch (2 epochs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (data / "fixed" / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/total", "loss/seg", "loss/a2s", "loss/s2a", "loss/reg", "w", "time/train_s"} <= set(tags)
    assert len(acc.Scalars("loss/total")) == 2


def test_vml_has_no_itn_and_registers_image_to_atlas_image(data):
    module, files = run_variant(data, "vml", {"method": "vml"})
    assert module.net.itn is None
    assert module.net.stn.enc1[0].in_channels == 2  # the image and the atlas image
    assert files == {"onepass_labelmap.png", "atlas_labelmap.png", "deformed_atlas_image.nii.gz",
                     "forward_displacement.nii.gz", "inverse_displacement.nii.gz", "forward_transform.h5",
                     "inverse_transform.h5", "case.yaml", "transform_metrics.csv"}
    assert bool(module.atlas_ready)


def test_atlas_istn_without_segmentation_loss_still_trains_the_itn_through_the_stn(data):
    module, files = run_variant(data, "no_ls", training={"seg_weight": 0.0})
    start = initial_weights(module.config)
    assert changed(module.net.itn, start.itn) and changed(module.net.stn, start.stn)
    assert "refine_labelmap.png" in files and "itn_lcc_labelmap.png" in files


def test_without_the_stn_gradient_the_itn_learns_from_l_s_alone(data):
    module, files = run_variant(data, "detached", training={"seg_weight": 0.0, "stn_gradient_to_itn": False})
    start = initial_weights(module.config)
    assert not changed(module.net.itn, start.itn) and changed(module.net.stn, start.stn)
    assert "refine_labelmap.png" in files


def test_without_the_stn_gradient_the_itn_is_the_unet_of_the_same_seed(data):
    """training.stn_gradient_to_itn false: the ITN is trained as the U-Net baseline (same weights, same
    seed), so the Atlas-ISTN outputs are compared with its own ITN = the U-Net."""
    detached, _ = run_variant(data, "detached_ls", training={"stn_gradient_to_itn": False})
    unet, _ = run_variant(data, "unet_same_seed", {"method": "unet"})
    joint, _ = run_variant(data, "joint_ls")
    assert all(torch.equal(a, b) for a, b in zip(detached.net.itn.parameters(), unet.net.itn.parameters()))
    assert changed(joint.net.itn, unet.net.itn)  # with the paper's joint training the ITN differs


@pytest.mark.parametrize("variant", ["svf", "affine"])
def test_stn_ablations_train_segment_and_refine(data, variant):
    module, files = run_variant(data, variant, {"stn_variant": variant})
    assert module.net.stn.has_affine == (variant == "affine")
    assert {"onepass_labelmap.png", "refine_labelmap.png", "itn_labelmap.png"} <= files


def test_unknown_method_and_fixed_case_are_clear_errors(data):
    from atlasreg.errors import AtlasregError

    with pytest.raises(AtlasregError, match="model.method"):
        load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"method": "voxelmorph"}})
    with pytest.raises(AtlasregError, match="B999"):
        run_variant(data, "bad_fixed", training={"fixed_atlas": "B999"})


def test_epoch_losses_are_batch_size_weighted_means_reset_every_epoch():
    module = AtlasISTNModule(load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}},
                                                "model": {"size": [16, 16]}}))
    module.on_train_epoch_start()
    module._accumulate({"loss/total": torch.tensor(1.0), "w": 0.5}, 10)
    module._accumulate({"loss/total": torch.tensor(4.0), "w": 0.5}, 5)
    assert module.epoch_losses() == pytest.approx({"loss/total": 2.0, "w": 0.5})
    module.on_train_epoch_start()
    module._accumulate({"loss/seg": torch.tensor(3.0, requires_grad=True) * 1}, 2)
    assert module.epoch_losses() == {"loss/seg": 3.0}


def test_a_constant_svf_is_reported_with_the_fix_and_a_living_one_is_not():
    relu = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"size": [16, 16]}})
    leaky = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}},
                               "model": {"size": [16, 16], "stn_activation": "leaky_relu"}})
    with pytest.warns(UserWarning, match="SVF is constant.*stn_activation: leaky_relu"):
        assert warn_if_svf_constant({"loss/reg": 1.0e-8}, relu)
    with pytest.warns(UserWarning, match="SVF is constant") as caught:
        assert warn_if_svf_constant({"loss/reg": 0.0}, leaky)
    assert "leaky_relu" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_svf_constant({"loss/reg": 5.0e-4}, relu)
        assert not warn_if_svf_constant({"loss/seg": 0.1}, relu)  # the U-Net has no L_reg


def test_deformation_losses_are_eqs_11_to_13_on_the_foreground_channels():
    from atlasreg.losses import diffusion_regulariser, label_mse
    from atlasreg.models.atlas_istn import deformation_losses
    from atlasreg.spatial.grid import Grid
    from atlasreg.spatial.transforms import compose_transform, warp

    torch.manual_seed(0)
    size = (16, 16)
    grid = Grid.centred(size, (2.0, 2.0))
    tr = compose_transform(0.5 * torch.randn(2, 2, 8, 8), None, None, grid, 4)
    labelmap = torch.softmax(torch.randn(2, 3, *size), 1)
    atlas = torch.softmax(torch.randn(1, 3, *size), 1)
    out = deformation_losses(tr, labelmap, atlas, reduction="per_case")
    full_atlas = atlas.expand(2, -1, -1, -1)
    a2s = label_mse(warp(full_atlas, tr.inverse_points(), grid), labelmap, True, "per_case")
    s2a = label_mse(warp(labelmap, tr.forward_points(), grid), full_atlas, True, "per_case")
    assert torch.allclose(out["a2s"], a2s) and torch.allclose(out["s2a"], s2a)
    u_half = tr.svf.displacement_on_svf_grid
    assert torch.allclose(out["reg"], diffusion_regulariser(u_half, grid.downsample(2).spacing, "per_case"))
    assert (out["a2s"] > 0).all() and (out["reg"] > 0).all()


def test_train_releases_the_training_data_when_it_returns(data):
    """Lightning leaves the module reachable from every callback, and the module reaches the trainer
    and the training data. train() must release the data (the data set, its loader and the batches)
    even while the caller keeps its callbacks, without waiting for a garbage collection (it raised the
    peak memory of train + segment)."""
    import gc
    import weakref

    from lightning.pytorch.callbacks import Callback

    refs = []

    class Watch(Callback):
        def on_fit_start(self, trainer, pl_module):
            refs.append(weakref.ref(pl_module.train_data))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                refs.extend(weakref.ref(t) for t in (batch[0], batch[1], trainer.train_dataloader))

    cfg = load_config(None, {
        "data": {"train": {"images": str(data / "train"), "image_suffix": "_img", "label_suffix": "_seg"},
                 "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
        "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4]},
        "training": {"epochs": 1, "batch_size": 2, "fade_in": None}})
    gc.disable()  # only train() itself may collect
    try:
        train(cfg, data / "release", resume=False, progress=False, callbacks=[Watch()])
        assert len(refs) == 4 and all(r() is None for r in refs)
    finally:
        gc.enable()


def test_unbiased_atlas_penalty_keeps_a_running_mean_of_the_velocities(data):
    """Issue 12 item 6: with training.unbiased_weight the module keeps the running mean of the
    predicted SVFs (m_t = 0.9 m_{t-1} + 0.1 mean(v)) and penalises mean(m_t^2); the mean is a checkpointed
    buffer of the trained model; without the option the module has no such buffer (older checkpoints
    load unchanged)."""
    module, _ = run_variant(data, "unbiased", training={"unbiased_weight": 10.0})
    assert module.velocity_mean.shape == (1, 2, 8, 8) and float(module.velocity_mean.abs().max()) > 0
    plain, _ = run_variant(data, "plain_no_unbiased")
    assert not hasattr(plain, "velocity_mean")

    fresh = build_method(module.config)
    v = torch.randn(3, 2, 8, 8, requires_grad=True)
    penalty = fresh._unbiased_penalty(v, 0.1)
    expected = 0.1 * v.detach().mean(0, keepdim=True)
    assert torch.allclose(fresh.velocity_mean, expected) and abs(float(penalty) - float(expected.pow(2).mean())) < 1e-7
    penalty.backward()
    # d mean(m^2) / dv_i = 2 m * 0.1 / N / numel(m)
    assert torch.allclose(v.grad, (2 * expected * 0.1 / 3 / expected.numel()).expand(3, -1, -1, -1), atol=1e-9)
    second = fresh._unbiased_penalty(torch.zeros(3, 2, 8, 8), 0.1)
    assert torch.allclose(fresh.velocity_mean, 0.9 * expected) and float(second) < float(penalty)
