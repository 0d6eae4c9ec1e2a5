"""The method registry: built-in methods, plug-in methods, and checkpoints that load without the
experiment's config."""

import shutil

import pytest
import torch

from atlasreg.config import load_config
from atlasreg.data.letter_b import write_letter_b_dataset
from atlasreg.errors import AtlasregError
from atlasreg.models.atlas_istn import AtlasISTNModule, UNetModule, VMLModule
from atlasreg.models.registry import (
    CHECKPOINT_KEY, Method, build_method, get_method, known_methods, load_model, register,
)
from atlasreg.models.train import train
from atlasreg.report.results import column_name, model_label


def tiny(method="atlas_istn", **training):
    return load_config(None, {
        "data": {"labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0]},
        "model": {"method": method, "size": [16, 16], "spacing": [2.0, 2.0], "itn_channels": [4, 8, 8, 8],
                  "stn_channels": [4, 4, 8]}, "training": {"epochs": 1, "batch_size": 4, **training}})


def test_builtin_methods_are_registered_and_selected_by_config():
    assert {"atlas_istn", "unet", "vml"} <= set(known_methods())
    assert type(build_method(tiny())) is AtlasISTNModule
    assert type(build_method(tiny("unet"))) is UNetModule
    vml = build_method(tiny("vml"))
    assert type(vml) is VMLModule and vml.net.itn is None and not vml.refines()
    with pytest.raises(AtlasregError, match="atlas_istn"):
        get_method("voxelmorph")


def test_a_new_method_plugs_in_through_the_registry():
    @register("toy_identity", "Toy")
    class Toy(AtlasISTNModule):
        """Atlas-ISTN that never registers: only its ITN output is a prediction."""

        def registers(self):
            return False

    try:
        assert "toy_identity" in known_methods()
        cfg = tiny("toy_identity")  # the config validator asks the registry
        module = build_method(cfg)
        assert isinstance(module, Toy) and isinstance(module, Method)
        out = module.predict(torch.randn(2, 1, 16, 16))
        assert out["transforms"] == {} and out["itn"].shape == (2, 2, 16, 16)
        assert module.refine(None, out) is None
        with pytest.raises(ValueError, match="already registered"):
            register("toy_identity", "Other")(type("Other", (AtlasISTNModule,), {}))
    finally:
        from atlasreg.models import registry
        registry._REGISTRY.pop("toy_identity", None)


@pytest.mark.parametrize("method", ["unet", "vml"])
def test_checkpoint_records_its_method_and_loads_without_the_config(method, tmp_path):
    torch.set_num_threads(1)
    write_letter_b_dataset(tmp_path / "data", 4, seed=0, size=32)
    cfg = tiny(method, fixed_atlas="B1" if method == "unet" else None)
    cfg["data"]["train"] = {"images": str(tmp_path / "data"), "image_suffix": "_img", "label_suffix": "_seg"}
    ckpt = train(cfg, tmp_path / "run", progress=False)
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    shutil.rmtree(tmp_path / "run")  # no config.yaml, no data folder next to it
    shutil.rmtree(tmp_path / "data")
    state = torch.load(moved, weights_only=False)
    assert state[CHECKPOINT_KEY]["method"] == method
    module = load_model(moved)
    assert type(module) is get_method(method) and not module.training
    out = module.predict(torch.randn(1, 1, 16, 16))
    assert ("itn" in out) == (method == "unet") and ("onepass" in out["transforms"])


def test_report_names_come_from_the_registry():
    assert model_label({"method": "unet"}) == "U-Net" and model_label({"method": "vml"}) == "VML"
    assert model_label({"method": "atlas_istn", "fixed_atlas": "B1"}) == "Fixed"
    assert column_name({"method": "unet"}, "refine") == "Independent"
    assert column_name({"method": "vml"}, "onepass") == "VML" and column_name({"method": "vml"}, "itn") is None
    assert column_name({"method": "atlas_istn", "seg_weight": 0.0}, "refine") is None
    assert column_name({}, "refine") == "Refine"


def test_load_model_names_a_bad_file(tmp_path):
    with pytest.raises(AtlasregError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AtlasregError, match="bad.ckpt"):
        load_model(bad)
