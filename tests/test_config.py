"""Configs: merge over the defaults, `base:` inheritance, typed validation with one-line errors naming
the key (and the file), data paths relative to the file that states them, every shipped config loads."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from atlasreg.cli import main
from atlasreg.config import (DEFAULTS, STN_ACTIVATIONS, STN_VARIANTS, ConfigError, known_methods, load_config, parse_set,
                             validate)
from atlasreg.data.cases import pairs_from_spec
from atlasreg.data.letter_b import write_letter_b_dataset
from atlasreg.errors import AtlasregError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SHARED = REPO.parent / "shared"  # the data sets live beside the repository
LABELS = {"data": {"labels": {0: "bg", 1: "fg"}}}
needs_shared_data = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"no data sets at {SHARED}")


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def load_with(*items):
    """A config with two labels and the `--set` style `items` over it."""
    overrides = parse_set(items)
    overrides["data"] = {**LABELS["data"], **overrides.get("data", {})}
    return load_config(None, overrides)


# ---------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg["data"]["labels"][0] == "background" and cfg["data"]["train"]
    for split in ("train", "validation"):
        for key in ("images", "labels", "csv"):
            value = (cfg["data"][split] or {}).get(key)
            assert value is None or os.path.isabs(value), (split, key, value)


@needs_shared_data
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_names_existing_data(path):
    cfg = load_config(path)
    for split in ("train", "validation"):
        spec = cfg["data"][split]
        if spec is None:
            continue
        for key in ("images", "labels", "csv"):
            if spec[key] is not None:
                assert Path(spec[key]).exists(), f"{path.name}: data.{split}.{key} = {spec[key]} does not exist"


@needs_shared_data
def test_readme_train_example_resolves_from_any_folder(tmp_path, monkeypatch):
    """`atlasreg train configs/letter_b.yaml` reads the same data from the repository root and from
    elsewhere: the data path is relative to the config file, not to the working directory."""
    found = []
    for cwd in (REPO, tmp_path):
        monkeypatch.chdir(cwd)
        config = os.path.relpath(REPO / "configs" / "letter_b.yaml", cwd)
        cfg = load_config(config)
        images = Path(cfg["data"]["train"]["images"])
        assert images == SHARED / "data" / "letter-b" / "clean" and images.is_dir()
        found.append([p.name for p in pairs_from_spec(cfg["data"]["train"])])
    assert found[0] == found[1] and len(found[0]) == 900 and found[0][0] == "B1"


def test_known_choices_match_the_code_that_builds_them():
    from atlasreg.nets.stn import ACTIVATIONS, VARIANTS

    assert known_methods() == ("atlas_istn", "unet", "vml", "deepatlas")
    assert STN_VARIANTS == VARIANTS
    assert STN_ACTIVATIONS == tuple(ACTIVATIONS)


# ---------------------------------------------------------------- merging and bases

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


def test_validated_config_is_complete_normalised_and_stable():
    given = {"data": {"labels": {"0": "bg", 1: 2}, "spacing": [1, 1]},
             "training": {"lr": 1, "fade_in": {"e0": 5}, "fixed_atlas": 7}}
    cfg = validate(given)
    assert set(cfg) == set(DEFAULTS) and set(cfg["training"]) == set(DEFAULTS["training"])
    assert cfg["data"]["labels"] == {0: "bg", 1: "2"}                      # values int, names str
    assert cfg["training"]["lr"] == 1.0 and isinstance(cfg["training"]["lr"], float)  # 1 -> 1.0
    assert cfg["data"]["spacing"] == [1.0, 1.0] and isinstance(cfg["data"]["spacing"][0], float)
    assert cfg["training"]["fade_in"] == {"e0": 5.0, "tau": 25.0}          # missing key from its default
    assert cfg["training"]["fixed_atlas"] == "7"                           # a case name
    assert given["training"] == {"lr": 1, "fade_in": {"e0": 5}, "fixed_atlas": 7}  # argument unchanged
    assert validate(cfg) == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg                       # plain, storable


def test_numbers_yaml_reads_as_strings_are_accepted():
    """PyYAML (YAML 1.1) reads `1e-3` without a dot as a string."""
    assert load_with("training.lr=1e-3")["training"]["lr"] == 1e-3
    assert load_with("refinement.lambda=2E-1")["refinement"]["lambda"] == 0.2


def test_null_only_where_documented():
    cfg = load_with("training.fade_in=null", "training.fixed_atlas=null", "training.threads=null",
                    "data.spacing=null", "data.validation=null", "data.train=null")
    assert cfg["training"]["fade_in"] is None and cfg["data"]["train"] is None
    for item, key in (("training.lambda=null", "training.lambda"), ("model.size=null", "model.size"),
                      ("training.augmentation=null", "training.augmentation"), ("name=null", "name")):
        with pytest.raises(ConfigError) as e:
            load_with(item)
        assert one_line(e).startswith(f"{key}: expected ") and e.value.key == key


# ---------------------------------------------------------------- one class of error per test

def test_unknown_key_names_the_full_key_and_the_file_that_states_it(tmp_path):
    (tmp_path / "main.yaml").write_text("data: {labels: {0: bg, 1: fg}}\nmodel: {sise: [64, 64]}\n")
    (tmp_path / "variant.yaml").write_text("base: main.yaml\ntraining: {epochs: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "variant.yaml")
    assert one_line(e) == f"{tmp_path / 'main.yaml'}: model.sise: unknown key (did you mean model.size?)"
    for item, key in (("training.fade_in.e1=3", "training.fade_in.e1"), ("data.train.image=x", "data.train.image"),
                      ("training.augmentation.probabilty=0.5", "training.augmentation.probabilty"),
                      ("refine.lr=0.1", "refine")):
        with pytest.raises(ConfigError) as e:
            load_with(item)
        assert e.value.key == key and one_line(e).startswith(f"{key}: unknown key")


@pytest.mark.parametrize("item, key, what", [
    ("training.epochs=abc", "training.epochs", "expected an integer >= 1, got 'abc'"),
    ("training.epochs=2.5", "training.epochs", "expected an integer >= 1, got 2.5"),
    ("training.epochs=true", "training.epochs", "expected an integer >= 1, got True"),  # bools are not ints
    ("training.lr=fast", "training.lr", "expected a number > 0, got 'fast'"),
    ("training.lambda=abc", "training.lambda", "expected a number >= 0, got 'abc'"),
    ("refinement.beta=.nan", "refinement.beta", "expected a number >= 0, got nan"),
    ("training.augmentation.enabled=1", "training.augmentation.enabled", "expected true or false, got 1"),
    ("model.size=[64, x]", "model.size[1]", "expected an integer >= 1, got 'x'"),
    ("model.itn_channels=8", "model.itn_channels", "expected a list of 1 or more"),
    ("training.fade_in=25", "training.fade_in", "expected a mapping or null, got 25"),
    ("training=5", "training", "expected a mapping, got 5"),
    ("data.labels=[bg, fg]", "data.labels", "expected a mapping of at least two label values"),
    ("data.labels={0: bg, x: fg}", "data.labels", "label value 'x' is not an integer"),
    ("data.train.images=5", "data.train.images", "expected a path (string) or null, got 5"),
    ("data.train.cases=3.5", "data.train.cases", "expected null, a range such as 'B1-B900'"),
])
def test_wrong_type_names_the_key(item, key, what):
    with pytest.raises(ConfigError) as e:
        load_with(item)
    assert e.value.key == key and one_line(e).startswith(f"{key}: {what}")


@pytest.mark.parametrize("item, key, what", [
    ("training.batch_size=0", "training.batch_size", "expected an integer >= 1, got 0"),
    ("training.epochs=-1", "training.epochs", "expected an integer >= 1, got -1"),
    ("training.lr=0", "training.lr", "expected a number > 0, got 0"),
    ("refinement.lr=-1.0e-3", "refinement.lr", "expected a number > 0, got -0.001"),
    ("training.atlas_eta=1.5", "training.atlas_eta", "expected a number in [0, 1], got 1.5"),
    ("training.atlas_eta=-0.1", "training.atlas_eta", "expected a number in [0, 1], got -0.1"),
    ("model.integration_steps=-1", "model.integration_steps", "expected an integer >= 0, got -1"),
    ("training.lambda=-0.1", "training.lambda", "expected a number >= 0, got -0.1"),
    ("refinement.lambda=-1", "refinement.lambda", "expected a number >= 0, got -1"),
    ("training.fade_in.tau=0", "training.fade_in.tau", "expected a number > 0, got 0"),
    ("training.augmentation.scale=[1.1, 0.9]", "training.augmentation.scale", "expected [lo, hi] with 0 < lo <= hi"),
    ("model.ndim=4", "model.ndim", "expected an integer in [2, 3], got 4"),
    ("model.size=[60, 64]", "model.size", "expected entries divisible by 8, got [60, 64]"),
    ("model.itn_channels=[4, 4, 4, 4, 4, 4, 4, 4]", "model.size", "expected entries divisible by 128 (ITN with 8"),
    ("model.size=[64, 64, 64]", "model.size", "expected 2 entries (model.ndim is 2), got [64, 64, 64]"),
    ("model.spacing=[2.0]", "model.spacing", "expected 2 entries (model.ndim is 2), got [2.0]"),
    ("data.spacing=[1, 1, 1]", "data.spacing", "expected 2 entries (model.ndim is 2)"),
    ("model.stn_channels=[16, 16]", "model.stn_channels", "expected a list of 3 (an integer >= 1), got [16, 16]"),
    ("data.train.cases={fraction: [0.8, 0.2]}", "data.train.cases.fraction", "expected [a, b] with 0 <= a < b <= 1"),
    ("data.train.cases={seed: 1}", "data.train.cases.fraction", "missing"),
    ("data.labels={0: bg, '0': fg}", "data.labels", "label value 0 is given twice"),
])
def test_out_of_range_names_the_key(item, key, what):
    with pytest.raises(ConfigError) as e:
        load_with("data.train.images=x", item)  # a split with its images, so that only `item` is wrong
    assert e.value.key == key and one_line(e).startswith(f"{key}: {what}")


@pytest.mark.parametrize("item, key, choices", [
    ("model.stn_variant=foo", "model.stn_variant", "affine_svf, svf, affine"),
    ("model.method=bar", "model.method", "atlas_istn, unet, vml, deepatlas"),
])
def test_bad_choice_names_the_key_and_the_choices(item, key, choices):
    with pytest.raises(ConfigError) as e:
        load_with(item)
    assert one_line(e) == f"{key}: expected one of {choices}, got '{item.split('=')[1]}'"


def test_method_choices_come_from_known_methods(monkeypatch):
    import atlasreg.config as config

    monkeypatch.setattr(config, "known_methods", lambda: ("atlas_istn", "unet", "vml", "deepatlas"))
    assert load_with("model.method=deepatlas")["model"]["method"] == "deepatlas"


def test_data_split_needs_exactly_one_source():
    with pytest.raises(ConfigError, match=r"^data.train: needs images \(a folder\) or csv"):
        load_with("data.train.cases=B1-B9")
    with pytest.raises(ConfigError, match=r"^data.validation: give either csv"):
        load_with("data.validation.csv=cases.csv", "data.validation.images=folder")


def test_error_in_a_file_names_the_file_and_from_overrides_only_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {labels: {0: bg, 1: fg}}\ntraining: {batch_size: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert one_line(e) == f"{tmp_path / 'c.yaml'}: training.batch_size: expected an integer >= 1, got 0"
    (tmp_path / "ok.yaml").write_text("data: {labels: {0: bg, 1: fg}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "ok.yaml", parse_set(["training.batch_size=0"]))
    assert one_line(e) == "training.batch_size: expected an integer >= 1, got 0"
    # A key no file states but that fails because of one that a file does: the loaded file is named.
    (tmp_path / "3d.yaml").write_text("data: {labels: {0: bg, 1: fg}}\nmodel: {ndim: 3}\n")
    with pytest.raises(ConfigError, match=r"3d.yaml: model.size: expected 3 entries"):
        load_config(tmp_path / "3d.yaml")


def test_parse_set_errors_name_the_item():
    assert parse_set(["training.epochs=5", "training.fade_in={e0: 5, tau: 5}", "data.spacing=[1, 1]"]) == {
        "training": {"epochs": 5, "fade_in": {"e0": 5, "tau": 5}}, "data": {"spacing": [1, 1]}}
    with pytest.raises(AtlasregError, match="expects KEY=VALUE.*'training.epochs'"):
        parse_set(["training.epochs"])
    with pytest.raises(AtlasregError, match="expects KEY=VALUE.*'training..epochs=3'"):
        parse_set(["training..epochs=3"])
    with pytest.raises(AtlasregError, match="^--set training.epochs: invalid YAML value"):
        parse_set(["training.epochs=[3"])
    with pytest.raises(AtlasregError, match="^--set training.lr.x: training.lr is also set to a value"):
        parse_set(["training.lr=1", "training.lr.x=2"])


# ---------------------------------------------------------------- paths

def test_relative_paths_resolve_against_the_file_that_states_them(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    (exp / "variants").mkdir(parents=True)
    (exp / "main.yaml").write_text(
        "data:\n  labels: {0: bg, 1: fg}\n  train: {images: data/images, labels: data/labels}\n"
        "  validation: {csv: ../lists/val.csv}\n")
    (exp / "variants" / "v.yaml").write_text(
        "base: ../main.yaml\ndata:\n  train: {cases: B1-B9}\n  validation: {csv: val.csv}\n")
    monkeypatch.chdir(tmp_path)  # not the folder of either file
    cfg = load_config("exp/variants/v.yaml")
    train, val = cfg["data"]["train"], cfg["data"]["validation"]
    assert train["images"] == str(exp / "data" / "images") and train["labels"] == str(exp / "data" / "labels")
    assert train["cases"] == "B1-B9"                       # merged over the base's split
    assert val["csv"] == str(exp / "variants" / "val.csv")  # the variant states it: its own folder
    assert load_config(exp / "main.yaml")["data"]["validation"]["csv"] == str(tmp_path / "lists" / "val.csv")
    (exp / "abs.yaml").write_text(f"data: {{labels: {{0: bg, 1: fg}}, train: {{images: {tmp_path / 'x'}}}}}\n")
    assert load_config(exp / "abs.yaml")["data"]["train"]["images"] == str(tmp_path / "x")


def test_paths_from_overrides_and_code_resolve_against_the_working_directory(tmp_path, monkeypatch):
    from atlasreg.demo import demo_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text("data: {labels: {0: bg, 1: fg}, train: {images: here}}\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config("../configs/c.yaml", parse_set(["data.validation.images=val", "data.train.labels=../labs"]))
    assert cfg["data"]["train"]["images"] == str(tmp_path / "configs" / "here")   # from the file
    assert cfg["data"]["validation"]["images"] == str(tmp_path / "work" / "val")  # from --set
    assert cfg["data"]["train"]["labels"] == str(tmp_path / "labs")
    assert load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}, "train": {"images": Path("d")}}})[
        "data"]["train"]["images"] == str(tmp_path / "work" / "d")
    assert demo_config(Path("out") / "data" / "train", 3)["data"]["train"]["images"] == str(
        tmp_path / "work" / "out" / "data" / "train")


# ---------------------------------------------------------------- train: the command and the function

TINY = {"name": "tiny", "data": {"labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0],
                                 "train": {"images": "data", "image_suffix": "_img", "label_suffix": "_seg"}},
        "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4]},
        "training": {"epochs": 1, "batch_size": 2, "fade_in": None, "atlas_batch_size": 4}}


def test_train_from_another_folder_reads_data_beside_the_config_and_stores_absolute_paths(
        tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    exp = tmp_path / "exp"
    write_letter_b_dataset(exp / "data", 4, seed=0, size=32)
    (exp / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "../exp/tiny.yaml", "--out", "run", "--quiet"]) == 0, capsys.readouterr().err
    run = tmp_path / "elsewhere" / "run"
    written = yaml.safe_load((run / "config.yaml").read_text())
    stored = torch.load(run / "model.ckpt", weights_only=False)["hyper_parameters"]["config"]
    assert written["data"]["train"]["images"] == stored["data"]["train"]["images"] == str(exp / "data")


def test_train_with_a_bad_set_value_fails_in_one_line_and_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    code = main(["train", str(tmp_path / "tiny.yaml"), "--out", str(out), "--set", "training.batch_size=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "atlasreg: error: training.batch_size: expected an integer >= 1, got 0"
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "training.epochs=abc"], "training.epochs: expected an integer >= 1, got 'abc'"),
    (["--set", "training.epochs=-1"], "training.epochs: expected an integer >= 1, got -1"),
    (["--epochs", "-1"], "training.epochs: expected an integer >= 1, got -1"),
    (["--epochs", "0"], "training.epochs: expected an integer >= 1, got 0"),
    (["--set", "training.batch_size=0"], "training.batch_size: expected an integer >= 1, got 0"),
    (["--set", "training.batch_size=2.5"], "training.batch_size: expected an integer >= 1, got 2.5"),
    (["--set", "training.lr=fast"], "training.lr: expected a number > 0, got 'fast'"),
    (["--set", "training.lr=0"], "training.lr: expected a number > 0, got 0"),
    (["--set", "training.lambda=abc"], "training.lambda: expected a number >= 0, got 'abc'"),
    (["--set", "training.lambda=-0.1"], "training.lambda: expected a number >= 0, got -0.1"),
    (["--set", "training.lambda=.nan"], "training.lambda: expected a number >= 0, got nan"),
    (["--set", "training.seed=true"], "training.seed: expected an integer >= 0, got True"),
    (["--set", "refinement.iterations=-5"], "refinement.iterations: expected an integer >= 0, got -5"),
    (["--set", "training.epochs"], "--set expects KEY=VALUE"),
])
def test_train_with_a_bad_value_fails_in_one_line_and_leaves_nothing(tmp_path, capsys, argv, message):
    # issue 14: --set training.epochs=abc, batch_size=0, lr=fast, lambda=abc gave tracebacks and left
    # files behind; epochs=-1 trained forever.
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    code = main(["train", str(tmp_path / "tiny.yaml"), "--out", str(out), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("atlasreg: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_train_validates_before_it_creates_its_folder(tmp_path):
    from atlasreg.models.train import train

    cfg = load_config(None, {**TINY, "training": {**TINY["training"], "batch_size": 2}})
    with pytest.raises(ConfigError, match="^training.batch_size: expected an integer >= 1, got 0"):
        train({**cfg, "training": {**cfg["training"], "batch_size": 0}}, tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="^data.train: missing"):
        train({**cfg, "data": {**cfg["data"], "train": None}}, tmp_path / "b", progress=False)
    with pytest.raises(AtlasregError, match="images folder not found"):  # data read before the folder is made
        train(cfg, tmp_path / "c", progress=False)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the section of one method


def test_the_deepatlas_section_is_in_deepatlas_configs_only_with_the_papers_defaults():
    """`deepatlas` is filled with its defaults (Chang, Secs. 5.2.1-5.3.2) when model.method is deepatlas
    and absent from every other method's config (their runs and checkpoints are unchanged); given with
    another method it is an error naming the section."""
    assert "deepatlas" not in load_with() and "deepatlas" not in DEFAULTS
    cfg = load_with("model.method=deepatlas")
    d = cfg["deepatlas"]
    assert (d["channels"], d["steps_per_level"], d["lr"], d["lr_level_factor"], d["lr_decay"], d["lr_decay_every"],
            d["lr_warmup_steps"], d["atlas_factor"]) == ([8, 16, 32, 64, 128], 7500, 0.005, 0.5, 0.995, 50, 500, 2)
    assert d["autoencoder"] == {"steps": 20000, "lr": 0.005, "heads": 2}
    assert d["losses"]["implicit_steps"] == 20 and d["losses"]["similarity"] == "features"
    assert d["losses"]["implicit_gradient"] == "last" and d["seed_steps"] == 0 and d["seed_crop_scale"] == [0.5, 1.0]
    assert d["foreground"] == {"threshold": None, "sigma": 0.7}
    assert validate(cfg) == cfg
    with pytest.raises(ConfigError) as e:
        load_with("deepatlas.lr=0.1")
    assert one_line(e) == "deepatlas: settings of model.method deepatlas, but model.method is atlas_istn"


@pytest.mark.parametrize("items, message", [
    (("deepatlas.losses.explicit=false", "deepatlas.losses.implicit=false"),
     "deepatlas.losses: needs explicit or implicit (or both): without a warp there is no loss"),
    (("training.batch_size=1",), "training.batch_size: expected >= 2 with deepatlas.losses.implicit (the implicit "
                                 "warp pairs the exams of a batch), got 1"),
    (("model.size=[16, 16]", "deepatlas.channels=[4, 4, 4, 4, 4]"),
     "deepatlas.channels: 4 downsamplings leave [1, 1] voxels of model.size [16, 16] at the deepest level; each "
     "axis needs >= 2 (fewer levels)"),
    (("deepatlas.losses.similarity=ssd",), "deepatlas.losses.similarity: expected one of features, mse, got 'ssd'"),
    (("deepatlas.losses.simlarity=mse",), "deepatlas.losses.simlarity: unknown key (did you mean "
                                          "deepatlas.losses.similarity?)"),
    (("deepatlas.lr_decay=1.5",), "deepatlas.lr_decay: expected a number in (0, 1], got 1.5"),
    (("deepatlas.seed_steps=100",), "deepatlas.seed_steps: expected 0 without deepatlas.seed_atlas (the crops are "
                                    "the seed case's), got 100"),
    (("deepatlas.seed_crop_scale=[0.9, 0.5]",), "deepatlas.seed_crop_scale: expected [lo, hi] with 0 < lo <= hi <= 1, "
                                                 "got [0.9, 0.5]"),
])
def test_deepatlas_settings_are_checked_with_the_keys_they_involve(items, message):
    with pytest.raises(ConfigError) as e:
        load_with("model.method=deepatlas", *items)
    assert one_line(e) == message


def test_deepatlas_without_the_implicit_warp_trains_on_batches_of_one():
    cfg = load_with("model.method=deepatlas", "training.batch_size=1", "deepatlas.losses.implicit=false")
    assert cfg["training"]["batch_size"] == 1 and cfg["deepatlas"]["losses"]["explicit"]
