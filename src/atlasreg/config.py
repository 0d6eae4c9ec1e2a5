"""Experiment configuration: one YAML per experiment, merged over defaults, stored in every checkpoint.

Paths in the `data` section are relative to the working directory (or absolute).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import AtlasregError

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "data": {
        "train": None,        # {images, labels?, csv?, image_suffix?, label_suffix?, cases?}
        "validation": None,   # same keys; never used for training
        "labels": {0: "background"},  # declared label list: value -> name (value order = channels)
        "spacing": None,      # spacing (ITK order) for formats that store none (PNG, JPEG, BMP, TIFF)
        "num_workers": 0,     # DataLoader worker processes reading training cases (0: in the main process)
        "cache": True,        # cache preprocessed training cases on disk ($ATLASREG_CACHE or <out>/cache)
    },
    "model": {
        "method": "atlas_istn",      # atlas_istn | unet (ITN alone) | vml (STN on image + atlas image)
        "ndim": 2,
        "size": [64, 64],            # model grid, array order
        "spacing": [2.0, 2.0],       # model grid spacing, ITK order, world units
        "itn_channels": [8, 16, 32, 64],
        "stn_channels": [16, 16, 32],
        "stn_variant": "affine_svf",  # affine_svf | svf | affine
        "integration_steps": 6,
    },
    "training": {
        "epochs": 300,
        "batch_size": 10,
        "lr": 1.0e-3,
        "lr_halving_epochs": 300,
        "seg_weight": 1.0,           # weight of L_s in Eq. 14 (0: the paper's Atlas-ISTN without L_s)
        "fixed_atlas": None,         # case name: a fixed training-case atlas, never updated ('Fixed')
        "lambda": 0.126,             # world-unit weight; = 500 of the reference (see losses.regularisers)
        "fade_in": {"e0": 25, "tau": 25},  # w = 1 / (1 + exp(-(epoch - e0) / tau)) (Eq. 24); null: w = 1
        "affine_start_epoch": 0,     # alternative to fade-in: identity affine before this epoch
        "atlas_eta": 0.01,
        "atlas_batch_size": 25,        # cases per forward pass of the atlas update (peak memory)
        "augmentation": {"enabled": False, "translation_voxels": 8, "rotation_degrees": 15,
                         "scale": [0.9, 1.1], "probability": 1.0},
        "seed": 0,
        "threads": None,
    },
    "refinement": {
        "iterations": 50,
        "lr": 1.0e-3,
        "beta": 1.0,     # weight of L*_a2s (Eq. 17)
        "gamma": 0.0,    # weight of L*_s2a (Eq. 18)
        "lambda": 0.126,
        "cases_at_once": 16,
    },
}


def _merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in out:
            raise AtlasregError(f"unknown config key '{where}{key}'")
        if isinstance(out[key], dict) and isinstance(value, dict) and key not in ("labels",):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def validate(cfg: dict) -> dict:
    """Check and normalise a merged config; raises AtlasregError with the offending key."""
    labels = cfg["data"]["labels"]
    if not isinstance(labels, dict) or len(labels) < 2:
        raise AtlasregError("data.labels must map at least two label values (background first) to names")
    cfg["data"]["labels"] = {int(k): str(v) for k, v in labels.items()}
    m = cfg["model"]
    if m["ndim"] not in (2, 3) or len(m["size"]) != m["ndim"] or len(m["spacing"]) != m["ndim"]:
        raise AtlasregError("model.size and model.spacing need model.ndim (2 or 3) entries")
    if m["method"] not in ("atlas_istn", "unet", "vml"):
        raise AtlasregError(f"model.method must be atlas_istn, unet or vml, got {m['method']!r}")
    if any(int(s) % 8 for s in m["size"]):
        raise AtlasregError(f"model.size {m['size']} must be divisible by 8")
    return cfg


def _read_with_bases(path: Path, seen: list[Path]) -> dict:
    """A YAML config as a dict; a top-level `base: other.yaml` (relative to this file) is read first and
    this file's keys are merged over it, so a variant config names only what it changes."""
    if not path.is_file():
        raise AtlasregError("config file not found", path)
    if path.resolve() in seen:
        raise AtlasregError("config bases form a cycle", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise AtlasregError(f"invalid YAML: {str(e).splitlines()[0]}", path) from None
    if not isinstance(data, dict):
        raise AtlasregError("a config must be a YAML mapping", path)
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_with_bases(path.parent / base, [*seen, path.resolve()])
    return _merge_free(merged, data)


def _merge_free(base: dict, override: dict) -> dict:
    """Recursive dict merge without key checks (the merge over DEFAULTS checks the keys)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict) and key != "labels":
            out[key] = _merge_free(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config, merge it over DEFAULTS and `overrides`; raises AtlasregError naming the file."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = _merge(cfg, _read_with_bases(Path(path), []))
    if overrides:
        cfg = _merge(cfg, overrides)
    return validate(cfg)


def parse_set(items: list[str]) -> dict:
    """`--set training.epochs=5` style overrides -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise AtlasregError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
