"""Configs: merge over the defaults, `base:` inheritance, clear errors, every shipped config loads."""

from pathlib import Path

import pytest

from atlasreg.config import load_config
from atlasreg.errors import AtlasregError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg["data"]["labels"][0] == "background" and cfg["data"]["train"]


def test_base_config_is_merged_under_the_variant(tmp_path):
    (tmp_path / "main.yaml").write_text("name: main\ndata: {labels: {0: bg, 1: fg}}\n"
                                        "training: {epochs: 7, lambda: 0.5}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "variant.yaml").write_text("base: ../main.yaml\nname: variant\ntraining: {epochs: 3}\n")
    cfg = load_config(tmp_path / "sub" / "variant.yaml")
    assert cfg["name"] == "variant" and cfg["training"]["epochs"] == 3 and cfg["training"]["lambda"] == 0.5
    assert cfg["data"]["labels"] == {0: "bg", 1: "fg"}


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(AtlasregError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(AtlasregError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("data: {labels: {0: bg, 1: fg}}\ntraining: {epoch: 3}\n")
    with pytest.raises(AtlasregError, match="training.epoch"):
        load_config(tmp_path / "d.yaml")
