"""Experiment configuration: one YAML per experiment, merged over the defaults, validated against a
typed schema at load, stored in every checkpoint.

Every key, with its type, range and default, is in `SCHEMA` below; `DEFAULTS` is derived from it.
Sections: `name`; `data` (`train`, `validation`: data splits; `labels`; `spacing`); `model`;
`training` (with `fade_in` and `augmentation`); `refinement`; and `deepatlas`, the section of one
method (`model.method: deepatlas`), present in that method's configs only (a field with `method`). A data split is
`{images, labels, csv, image_suffix, label_suffix, cases}` (see `data.dataset.find_pairs` and
`select_cases`).

Loading (`load_config`): a YAML file, read after the chain of files its top-level `base:` names (a
variant states only what it changes), merged over `DEFAULTS`, then `overrides` (`--set`), then
`validate`. The result is a plain nested dict (`cfg["training"]["lambda"]`), complete and normalised:
integers given for numbers become floats (1 -> 1.0), label values become ints, paths absolute strings.

Paths: `images`, `labels` and `csv` of a data split are relative to the folder of the YAML file that
states them (through `base:` chains too); paths in `overrides` (`--set`) or in a dict built in code are
relative to the current working directory. The validated config holds them absolute, so the config
that `atlasreg train` writes into its run folder (:mod:`atlasreg.contracts`) and the checkpoint do too.

Errors: every problem raises one `ConfigError` (an `AtlasregError`) line naming the full key and, for a
value stated in a file, that file, e.g.
`configs/x.yaml: training.batch_size: expected an integer >= 1, got 0`.
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import AtlasregError

# ---------------------------------------------------------------- choices

#: STN variants `model.stn_variant` accepts (the same tuple as `nets.stn.VARIANTS`; a test keeps them equal).
STN_VARIANTS = ("affine_svf", "svf", "affine")
#: STN nonlinearities `model.stn_activation` accepts (the keys of `nets.stn.ACTIVATIONS`; a test keeps them equal).
STN_ACTIVATIONS = ("relu", "leaky_relu")
ORIENTATION_SEARCH = ("none", "in_plane", "in_plane_flips", "axes")  # atlasreg.data.placement (not imported: torch-free)
CENTRES = ("image", "foreground", "labels")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")

#: Data splits a config may name under `data`.
SPLITS = ("train", "validation")

#: Keys of a data split that hold paths (resolved against the folder of the file that states them).
PATH_KEYS = ("images", "labels", "csv")


def known_methods() -> tuple[str, ...]:
    """Names `model.method` accepts: the methods in the registry (:mod:`atlasreg.models.registry`),
    e.g. atlas_istn (Atlas-ISTN, Eq. 14), unet (the ITN alone, L_s only), vml (the STN alone on the
    image and the atlas image)."""
    from .models.registry import known_methods as registered

    return registered()


class ConfigError(AtlasregError):
    """A config value that breaks the schema. `key`: the full dotted key ('training.batch_size');
    `problem`: what is wrong ('expected an integer >= 1, got 0'); `path`: the file that states it, or None."""

    def __init__(self, key: str, problem: str, path: object | None = None):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}" if key else problem, path)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(key, f"expected {what}, got {_show(value)}")


# ---------------------------------------------------------------- value types
# Each type is a callable (value, key) -> normalised value that raises ConfigError naming `key`.

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Int:
    """An integer (bools are not integers) in [min, max]."""

    min: int | None = None
    max: int | None = None

    @property
    def what(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        return "an integer" + (f" >= {self.min}" if self.min is not None else "")

    def __call__(self, value, key):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
                self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise _expected(key, self.what, value)
        return int(value)


@dataclass(frozen=True)
class Float:
    """A finite number in [min, max] (`open_min`: > min), returned as float. Integers are accepted
    (1 -> 1.0), bools are not; a string that spells a number is accepted because YAML 1.1 (PyYAML)
    reads `1e-3` (no dot) as a string."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False

    @property
    def what(self) -> str:
        if self.min is not None and self.max is not None:
            return f"a number in {'(' if self.open_min else '['}{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f"a number {'>' if self.open_min else '>='} {self.min:g}"
        return "a finite number"

    def __call__(self, value, key):
        x = value
        if isinstance(x, str) and _NUMBER.fullmatch(x.strip()):
            x = float(x)
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            raise _expected(key, self.what, value)
        x = float(x)
        if self.min is not None and (x < self.min or (self.open_min and x == self.min)):
            raise _expected(key, self.what, value)
        if self.max is not None and x > self.max:
            raise _expected(key, self.what, value)
        return x


@dataclass(frozen=True)
class Bool:
    what = "true or false"

    def __call__(self, value, key):
        if not isinstance(value, bool):
            raise _expected(key, self.what, value)
        return value


@dataclass(frozen=True)
class Str:
    """A string (`empty`: may be ''); `names`: integers are accepted and made strings (case names)."""

    empty: bool = False
    names: bool = False

    @property
    def what(self) -> str:
        return "a string" if self.empty else "a non-empty string"

    def __call__(self, value, key):
        if self.names and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or (not self.empty and not value.strip()):
            raise _expected(key, self.what, value)
        return value


@dataclass(frozen=True)
class Choice:
    """One of `choices()` (a function, so that a registry can supply them)."""

    choices: Callable[[], tuple[str, ...]]

    @property
    def what(self) -> str:
        return "one of " + ", ".join(self.choices())

    def __call__(self, value, key):
        if not isinstance(value, str) or value not in self.choices():
            raise _expected(key, self.what, value)
        return value


@dataclass(frozen=True)
class PathValue:
    """A file or folder path (string or os.PathLike), returned as an absolute normalised string; a
    relative one is resolved against the current working directory (paths stated in files were made
    absolute against the file's folder when it was read)."""

    what = "a path (string)"

    def __call__(self, value, key):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise _expected(key, self.what, value)
        return os.path.abspath(os.path.expanduser(value))


@dataclass(frozen=True)
class ListOf:
    """A list of `item`s: exactly `length` of them, or at least `min_length`."""

    item: Any
    length: int | None = None
    min_length: int = 0

    @property
    def what(self) -> str:
        if self.length is not None:
            return f"a list of {self.length} ({self.item.what})"
        if self.min_length:
            return f"a list of {self.min_length} or more ({self.item.what})"
        return f"a list ({self.item.what})"

    def __call__(self, value, key):
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length) \
                or len(value) < self.min_length:
            raise _expected(key, self.what, value)
        return [self.item(v, f"{key}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Optional:
    """`inner` or None (null)."""

    inner: Any

    @property
    def what(self) -> str:
        return f"{self.inner.what} or null"

    def __call__(self, value, key):
        if value is None:
            return None
        try:
            return self.inner(value, key)
        except ConfigError as e:  # say that null is allowed too
            if e.key != key or not e.problem.startswith(f"expected {self.inner.what}, got"):
                raise
            raise _expected(key, self.what, value) from None


@dataclass(frozen=True)
class NumberOrList:
    """A number (`item`) or a non-empty list of them (one per axis; the length is checked where the
    dimensionality is known)."""

    item: Any

    @property
    def what(self) -> str:
        return f"{self.item.what}, or a list of them"

    def __call__(self, value, key):
        if isinstance(value, (list, tuple)):
            return ListOf(self.item, min_length=1)(value, key)
        try:
            return self.item(value, key)
        except ConfigError:
            raise _expected(key, self.what, value) from None


REQUIRED = object()  # the default of a key that must be given


@dataclass(frozen=True)
class Field:
    """One key of a section: its type, its default (None for a Section: its own defaults) and what
    it means."""

    type: Any
    default: Any = None
    doc: str = ""
    #: The name of the method (``model.method``) this section belongs to, or None for a key of every
    #: config: such a section is filled with its defaults when the config trains that method and left
    #: out of every other config (so their runs and checkpoints are unchanged by it); given with another
    #: method it is an error.
    method: str | None = None
    #: A check of the whole validated config when this key is present, ``f(cfg)`` raising ConfigError:
    #: for the settings of a method's section that involve other sections (see `_check_across`).
    across: Callable | None = None

    def default_value(self, key: str):
        if self.default is REQUIRED:
            raise ConfigError(key, "missing (this key is required)")
        return _defaults(self.type) if isinstance(self.type, Section) else copy.deepcopy(self.default)


def _unknown_key(key: str, name: str, known) -> ConfigError:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    hint = f"did you mean {key}.{close[0]}?" if close else "known keys: " + ", ".join(known)
    return ConfigError(f"{key}.{name}" if key else str(name), f"unknown key ({hint})")


@dataclass(frozen=True)
class Section:
    """A mapping with known keys: unknown keys are errors, missing ones take their default.
    `check`: an optional function (normalised section, key) -> section for checks across keys."""

    fields: Mapping[str, Field]
    check: Callable | None = None
    what = "a mapping"

    def check_keys(self, value, key) -> None:
        """Raise for the first unknown key in `value` and the sections below it (so that a misspelt
        key is reported before the problems it causes, such as a required key missing)."""
        if not isinstance(value, Mapping):
            return
        for name, v in value.items():
            if name not in self.fields:
                raise _unknown_key(key, name, list(self.fields))
            inner = self.fields[name].type
            inner = inner.inner if isinstance(inner, Optional) else inner
            if isinstance(inner, Section):
                inner.check_keys(v, f"{key}.{name}" if key else name)

    def __call__(self, value, key):
        if not isinstance(value, Mapping):
            raise _expected(key, self.what, value)
        self.check_keys(value, key)
        where = f"{key}." if key else ""
        out = {}
        for name, f in self.fields.items():
            if f.method is not None and name not in value:
                continue  # a method's own section: filled in by _check_across for that method only
            out[name] = f.type(value[name] if name in value else f.default_value(where + name), where + name)
        return self.check(out, key) if self.check else out


@dataclass(frozen=True)
class Labels:
    """The declared labels: a mapping label value (integer) -> name, at least two, background first;
    the channels of the one-hot labelmaps follow this order."""

    what = "a mapping of at least two label values to names (background first), e.g. {0: background, 1: liver}"

    def __call__(self, value, key):
        if not isinstance(value, Mapping) or len(value) < 2:
            raise _expected(key, self.what, value)
        out: dict[int, str] = {}
        for k, v in value.items():
            if isinstance(k, str) and re.fullmatch(r"\s*[-+]?\d+\s*", k):
                k = int(k)
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise ConfigError(key, f"label value {_show(k)} is not an integer")
            if int(k) in out:
                raise ConfigError(key, f"label value {int(k)} is given twice")
            out[int(k)] = Str(names=True)(v, f"{key}.{k}")
        return out


@dataclass(frozen=True)
class Cases:
    """The cases of a split (`data.dataset.select_cases`): null (all), a range 'B1-B900' or one name,
    a non-empty list of names, or {fraction: [a, b], seed: s} with 0 <= a < b <= 1 and s >= 0."""

    what = "null, a range such as 'B1-B900', a list of case names or {fraction: [a, b], seed: s}"

    def __call__(self, value, key):
        if value is None:
            return None
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, (list, tuple)) and value:
            return [Str(names=True)(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return FRACTION(value, key)
        raise _expected(key, self.what, value)


def _check_fraction(sel: dict, key: str) -> dict:
    a, b = sel["fraction"]
    if not a < b:
        raise ConfigError(f"{key}.fraction", f"expected [a, b] with 0 <= a < b <= 1, got {sel['fraction']}")
    return sel


FRACTION = Section({
    "fraction": Field(ListOf(Float(0.0, 1.0), length=2), REQUIRED, "[a, b]: the slice of the shuffled cases"),
    "seed": Field(Int(0), 0, "seed of the shuffle"),
    "group": Field(Optional(Str()), None, "regular expression: cases whose names give the same match stay on "
                   "one side (e.g. '^patient\\d+': both frames of a patient)"),
}, check=_check_fraction)


def _check_split(spec: dict, key: str) -> dict:
    if spec["csv"] is not None and (spec["images"] is not None or spec["labels"] is not None):
        raise ConfigError(key, "give either csv (a file naming the images and labelmaps) or images/labels "
                          "folders, not both")
    if spec["csv"] is None and spec["images"] is None:
        raise ConfigError(key, "needs images (a folder) or csv (a file)")
    return spec


SPLIT = Section({
    "images": Field(Optional(PathValue()), None, "folder of images (and labelmaps, told apart by suffixes)"),
    "labels": Field(Optional(PathValue()), None, "folder of labelmaps paired with the images by case name"),
    "csv": Field(Optional(PathValue()), None, "CSV with columns image[, label][, name] (instead of folders)"),
    "image_suffix": Field(Str(empty=True), "", "file names <case><image_suffix>.<ext>, e.g. _img"),
    "label_suffix": Field(Str(empty=True), "", "file names <case><label_suffix>.<ext>, e.g. _seg"),
    "cases": Field(Cases(), None, "which cases (see data.dataset.select_cases)"),
}, check=_check_split)


def _check_augmentation(aug: dict, key: str) -> dict:
    lo, hi = aug["scale"]
    if lo > hi:
        raise ConfigError(f"{key}.scale", f"expected [lo, hi] with 0 < lo <= hi, got {aug['scale']}")
    return aug


#: Similarities of the DeepATLAS loss (`deepatlas.losses.similarity`): NCC of the pretrained
#: autoencoder's features (Eq. 9) or the MSE of the images (the ablation of Sec. 5.4.3).
DEEPATLAS_SIMILARITIES = ("features", "mse")


def _check_deepatlas_losses(losses: dict, key: str) -> dict:
    if not (losses["explicit"] or losses["implicit"]):
        raise ConfigError(key, "needs explicit or implicit (or both): without a warp there is no loss")
    return losses


#: The section of ``model.method: deepatlas`` (DeepATLAS, issue 15; :mod:`atlasreg.deepatlas.method`).
#: Paper defaults (Chang, Secs. 5.2.1-5.2.7, 5.3.2) where the paper gives them.
DEEPATLAS = Section({
    "channels": Field(ListOf(Int(1), min_length=2), [8, 16, 32, 64, 128],
                      "features per resolution level 0..L of the coordinate network and the autoencoder "
                      "(L = len - 1 downsamplings; Sec. 5.2.1)"),
    "head_channels": Field(Int(1), 32, "fixed depth of the head feature maps f_l (Sec. 2.2.1; not given)"),
    "norm_groups": Field(Int(1), 8, "group-normalisation groups (gcd with each channel count)"),
    "atlas_factor": Field(Int(1), 2, "the atlas X (and the templates) at this many times the model grid per axis "
                          "(Sec. 5.1.2: 2)"),
    "seed_atlas": Field(Optional(Str(names=True)), None, "training case whose image seeds the atlas (Secs. 5.1.2, "
                        "5.2.5); null: a constant atlas"),
    "seed_steps": Field(Int(0), 0, "steps of the supervised pretraining of the coarsest head on random crops of the "
                        "seed_atlas case, whose locations are known (Sec. 5.2.5); 0: none"),
    "seed_crop_scale": Field(ListOf(Float(0.0, 1.0, open_min=True), length=2), [0.5, 1.0],
                             "[lo, hi]: a crop's size as a fraction of the seed case's extent, drawn uniformly"),
    "autoencoder": Field(Section({
        "steps": Field(Int(0), 20000, "steps of the feature autoencoder, trained first (Sec. 5.3.2)"),
        "lr": Field(Float(0.0, open_min=True), 5.0e-3, "its Adam learning rate (decayed like deepatlas.lr)"),
        "heads": Field(Int(1), 2, "reconstruction heads = feature levels of Eq. 9 (full and half resolution)"),
    }), doc="the multi-resolution autoencoder whose features the similarity compares (Sec. 5.3)"),
    "steps_per_level": Field(Int(1), 7500, "steps of each stage of the staged optimisation (Sec. 5.2.6)"),
    "head_warmup_steps": Field(Int(0), 500, "steps of a new head's warm-up before its stage (Sec. 5.2.3; not given)"),
    "lr": Field(Float(0.0, open_min=True), 5.0e-3, "Adam learning rate of the first stage (Sec. 5.2.6)"),
    "lr_level_factor": Field(Float(0.0, 1.0, open_min=True), 0.5, "learning rate factor from one stage to the next"),
    "lr_decay": Field(Float(0.0, 1.0, open_min=True), 0.995, "learning rate factor every lr_decay_every steps"),
    "lr_decay_every": Field(Int(1), 50, "steps"),
    "lr_warmup_steps": Field(Int(0), 500, "linear warm-up from 10% to 100% at the start of each stage (steps)"),
    "losses": Field(Section({
        "explicit": Field(Bool(), True, "the explicit warp of the atlas to each exam (Eqs. 3, 8, 13)"),
        "implicit": Field(Bool(), True, "the implicit warp between the exams of a batch (Eqs. 1, 4-7, 12)"),
        "similarity": Field(Choice(lambda: DEEPATLAS_SIMILARITIES), "features", "features (NCC of the autoencoder's "
                            "features, Eq. 9) | mse (the ablation of Sec. 5.4.3; no autoencoder)"),
        "gradient_channel": Field(Bool(), True, "auxiliary Prewitt gradient channel, MSE (Sec. 5.1.5)"),
        "mask_channels": Field(Bool(), False, "auxiliary mask channels of the labels (Sec. 5.1.5): every training "
                               "case then needs its labelmap"),
        "auxiliary_weight": Field(Float(0.0), 1.0, "weight of the auxiliary channels' MSE"),
        "smoothness_weight": Field(Float(0.0), 1.0, "weight of the smoothness loss of Eq. 11"),
        "implicit_steps": Field(Int(1), 20, "recursive updates of the implicit warp (Sec. 5.1.1: 20)"),
        "implicit_gradient": Field(Choice(lambda: ("last", "unrolled")), "last", "last: differentiate the last "
                                   "update at the fixed point | unrolled: every update (atlasreg.deepatlas.warps)"),
    }, check=_check_deepatlas_losses), doc="what the loss holds (the ablations of Table 5 are settings)"),
    "foreground": Field(Section({
        "threshold": Field(Optional(Float()), None, "foreground above this normalised intensity (Sec. 5.5.3: the "
                           "training masks of 5.1.6); null: the scan's field of view only"),
        "sigma": Field(Float(0.0), 0.7, "Gaussian blur before the threshold, model voxels (Sec. 5.5.3)"),
    }), doc="training masks (Secs. 5.1.6, 5.5.3)"),
    "checkpoint_every": Field(Int(1), 100, "steps between checkpoints (a run resumes from the last one)"),
    "template_smoothness": Field(Float(0.0, open_min=True), 1.0e-3, "membrane weight of the template fit (Eq. 14; "
                                 "atlasreg.deepatlas.template)"),
})


SCHEMA = Section({
    "name": Field(Str(), "experiment", "experiment name (checkpoint, report)"),
    "data": Field(Section({
        "train": Field(Optional(SPLIT), None, "the training split (needed by `atlasreg train`)"),
        "validation": Field(Optional(SPLIT), None, "a split never used for training"),
        "labels": Field(Labels(), REQUIRED, "declared label list: value -> name (value order = channels)"),
        "spacing": Field(Optional(ListOf(Float(0.0, open_min=True))), None,
                         "spacing (ITK order, world units) for files that store none: PNG, JPEG, BMP, TIFF, and "
                         "headers with unit spacing and identity direction (NIfTI whose pixdim was lost)"),
        "preprocessing": Field(Section({
            "orientation": Field(Str(), "native", "model axes: 'native' (the file's) or a code such as 'RAS' "
                                 "(volumes reoriented from their header's direction)"),
            "orientation_search": Field(Choice(lambda: ORIENTATION_SEARCH), "none",
                                        "none | in_plane (4 rotations about z) | in_plane_flips (8) | axes: flips and "
                                        "axis swaps tried per case against a "
                                        "reference labelmap (training: the first training case; test: the atlas)"),
            "reference": Field(Optional(PathValue()), None, "labelmap of the training-time orientation reference "
                               "(null: the first training case)"),
            "centre": Field(Choice(lambda: CENTRES), "image", "image | foreground | labels (training: the labelmap's "
                            "foreground; test: a first ITN pass)"),
            "localisation_passes": Field(Int(1, 10), 3, "test time, centre 'labels' or a search: at most this many "
                                         "ITN passes, each re-centred on the last (stops when the centre moves "
                                         "less than a voxel)"),
            "intensity": Field(Choice(lambda: INTENSITY), "zscore", "zscore | zscore_foreground | rescale"),
            "clip_range": Field(Optional(ListOf(Float(), length=2)), None, "[lo, hi] raw intensities (CT window)"),
            "clip_percentiles": Field(Optional(ListOf(Float(0.0, 100.0), length=2)), None,
                                      "[lo, hi] percentiles of the image (MRI)"),
            "foreground_threshold": Field(Float(), 0.0, "raw intensity above which a voxel is foreground"),
            "pad_value": Field(Optional(Float()), None, "raw intensity outside the scan (null: the image minimum)"),
        }), doc="volumes: orientation, placement of the model grid, intensity normalisation"),
        "num_workers": Field(Int(0), 0, "DataLoader worker processes reading training cases (0: in the main "
                             "process)"),
        "cache": Field(Bool(), True, "cache preprocessed training cases on disk ($ATLASREG_CACHE or <out>/cache)"),
    })),
    "model": Field(Section({
        "method": Field(Choice(lambda: known_methods()), "atlas_istn",
                        "atlas_istn | unet (ITN alone) | vml (STN on image + atlas image) | deepatlas (self-supervised "
                        "coordinates, `atlasreg deepatlas`)"),
        "ndim": Field(Int(2, 3), 2, "2 or 3"),
        "size": Field(ListOf(Int(1), min_length=1), [64, 64], "model grid, array order; divisible by 8"),
        "spacing": Field(ListOf(Float(0.0, open_min=True), min_length=1), [2.0, 2.0],
                         "model grid spacing, ITK order, world units"),
        "itn_channels": Field(ListOf(Int(1), min_length=1), [8, 16, 32, 64], "ITN features per scale"),
        "stn_channels": Field(ListOf(Int(1), length=3), [16, 16, 32], "STN features at 1/2, 1/4, 1/8"),
        "stn_variant": Field(Choice(lambda: STN_VARIANTS), "affine_svf", "affine_svf | svf | affine"),
        "stn_activation": Field(Choice(lambda: STN_ACTIVATIONS), "relu",
                                "relu (the paper's) | leaky_relu (slope 0.2: the SVF decoder cannot die)"),
        "integration_steps": Field(Int(0), 6, "scaling and squaring steps of the SVF"),
        "stn_max_rotation": Field(Float(0.0, 180.0, open_min=True), 45.0,
                                  "bound of each rotation angle of the STN's affine part, degrees (the paper's "
                                  "pi/4 = 45); larger where scans differ more in orientation"),
    })),
    "training": Field(Section({
        "epochs": Field(Int(1), 300),
        "batch_size": Field(Int(1), 10),
        "lr": Field(Float(0.0, open_min=True), 1.0e-3, "Adam learning rate"),
        "lr_halving_epochs": Field(Float(0.0, open_min=True), 300, "the learning rate halves every so many epochs"),
        "seg_weight": Field(Float(0.0), 1.0, "weight of L_s in Eq. 14 (0: the paper's Atlas-ISTN without L_s)"),
        "stn_gradient_to_itn": Field(Bool(), True, "the deformation losses also train the ITN through the STN's "
                                     "input (the paper's, Sec. 2.4); false: the STN reads the ITN logits detached and "
                                     "the ITN learns from L_s alone, as the U-Net (competing gradients, Sec. 3.3)"),
        "dice_weight": Field(Float(0.0), 0.0, "soft-Dice term added to L_s (0: the paper's MSE alone; for many small "
                             "structures)"),
        "ce_weight": Field(Float(0.0), 0.0, "cross-entropy term added to L_s (0: none; with dice_weight, nnU-Net's "
                           "Dice + CE: the soft Dice alone vanishes where the MSE made every voxel background)"),
        "fixed_atlas": Field(Optional(Str(names=True)), None,
                             "case name: a fixed training-case atlas, never updated ('Fixed')"),
        "lambda": Field(Float(0.0), 0.126, "world-unit weight; = 500 of the reference (see losses.regularisers)"),
        "fade_in": Field(Optional(Section({
            "e0": Field(Float(), 25, "epoch at which w = 1/2"),
            "tau": Field(Float(0.0, open_min=True), 25, "epochs"),
        })), {"e0": 25, "tau": 25}, "w = 1 / (1 + exp(-(epoch - e0) / tau)) (Eq. 24); null: w = 1"),
        "affine_start_epoch": Field(Int(0), 0, "alternative to fade-in: identity affine before this epoch"),
        "atlas_eta": Field(Float(0.0, 1.0), 0.01, "atlas update rate eta (Eq. 15)"),
        "unbiased_weight": Field(Float(0.0), 0.0, "unbiased atlas: weight of the penalty on the running mean of "
                                 "the velocity fields (mm^2; 0: off; WBIR 2022 fetal atlas)"),
        "unbiased_momentum": Field(Float(0.0, 1.0, open_min=True), 0.1, "update rate of that running mean"),
        "atlas_batch_size": Field(Int(1), 25, "cases per forward pass of the atlas update (peak memory)"),
        "augmentation": Field(Section({
            "enabled": Field(Bool(), False),
            "translation_voxels": Field(NumberOrList(Float(0.0)), 8, "model-grid voxels: one range, or one "
                                        "per array axis"),
            "rotation_degrees": Field(NumberOrList(Float(0.0)), 15, "degrees: one range (3D: about every "
                                      "axis), or in 3D one per array axis (z, y, x): [45, 0, 0] turns in-plane"),
            "scale": Field(ListOf(Float(0.0, open_min=True), length=2), [0.9, 1.1], "[lo, hi]"),
            "probability": Field(Float(0.0, 1.0), 1.0),
        }, check=_check_augmentation), doc="spatial augmentation (Sec. 3.2), MONAI RandAffine"),
        "seed": Field(Int(0), 0),
        "threads": Field(Optional(Int(1)), None, "torch threads; null: torch's default"),
        "precision": Field(Choice(lambda: PRECISIONS), "32-true", "Lightning precision: 32-true, or automatic "
                           "mixed precision 16-mixed / bf16-mixed (GPU)"),
        # What training shows (models/monitor.py): none of these changes a training number.
        "validation_every": Field(Int(0), 5, "epochs between validation passes (Dice, HD95 of ITN and 1-pass on "
                                  "data.validation, TensorBoard), and the last epoch; 0: none"),
        "refine_validation_every": Field(Int(0), 25, "epochs between validation passes that also refine "
                                         "(refine_validation_cases cases), and the last epoch; 0: none"),
        "refine_validation_cases": Field(Int(1), 8, "validation cases refined in those passes (the first ones; "
                                         "refinement takes K forward-backward passes per case)"),
        "images_every": Field(Int(0), 10, "epochs between TensorBoard images (atlas, validation overlays), and "
                              "the last epoch; 0: none"),
        "validation_cases": Field(Int(0), 4, "validation cases drawn as overlays (the first ones)"),
    })),
    "refinement": Field(Section({
        "iterations": Field(Int(0), 50, "test-time refinement iterations K"),
        "lr": Field(Float(0.0, open_min=True), 1.0e-3),
        "beta": Field(Float(0.0), 1.0, "weight of L*_a2s (Eq. 17)"),
        "gamma": Field(Float(0.0), 0.0, "weight of L*_s2a (Eq. 18)"),
        "lambda": Field(Float(0.0), 0.126),
        "cases_at_once": Field(Int(1), 16, "cases refined together, each with its own STN copy"),
        "image_similarity": Field(Optional(Choice(lambda: IMAGE_SIMILARITIES)), None,
                                  "null, or lncc | mind | ngf | mi | mse: also fit the deformed atlas image to the "
                                  "image (issue 12 item 7)"),
        "image_weight": Field(Float(0.0), 1.0, "weight of the image term when image_similarity is set"),
        "target": Field(Choice(lambda: REFINEMENT_TARGETS), "logits",
                        "what the deformed atlas labelmap is fitted to: logits (the paper's Eq. 17, the ITN "
                        "logits) or labelmap (the one-hot of the ITN's argmax; see models/refine.py)"),
        "structures": Field(Choice(lambda: REFINEMENT_STRUCTURES), "all",
                            "which structures L*_a2s / L*_s2a count: all (the paper's) or segmented (only those "
                            "the ITN's argmax holds in the case; a structure the ITN missed then follows its "
                            "neighbours instead of being squeezed out; see models/refine.py)"),
        "label_loss": Field(Choice(lambda: LABEL_LOSSES), "mse",
                            "how L*_a2s / L*_s2a compare the deformed atlas labelmap with the ITN's output: mse "
                            "(the paper's Eqs. 17-18, a mean over voxels, so a structure weighs by its volume) or "
                            "dice (1 - soft Dice per structure, every structure weighing the same; lambda then "
                            "weighs against a loss of another scale, see models/refine.py)"),
        "atlas_topology": Field(Choice(lambda: ATLAS_TOPOLOGIES), "none",
                                "none (the paper's: the atlas labelmap as built, Eq. 15) or connected (one connected "
                                "component per structure: the refinement fits and the outputs warp the one-hot of the "
                                "repaired atlas labelmap, and output labelmaps have resampling gaps closed; see "
                                "atlas_topology.py)"),
    })),
    "deepatlas": Field(DEEPATLAS, None, "DeepATLAS: network, schedule and losses (model.method deepatlas only)",
                       method="deepatlas", across=lambda cfg: _check_deepatlas(cfg)),
})


INTENSITY = ("zscore", "zscore_foreground", "rescale")

#: Targets of the refinement (atlasreg.models.refine.refinement_target).
REFINEMENT_TARGETS = ("logits", "labelmap")

#: Structures the refinement's label terms count (atlasreg.models.refine.segmented_structures).
REFINEMENT_STRUCTURES = ("all", "segmented")

#: Label terms of the refinement (atlasreg.losses.label_mse, atlasreg.losses.label_dice).
LABEL_LOSSES = ("mse", "dice")

#: The atlas labelmap the refinement fits and the outputs warp (atlasreg.atlas_topology.fitted_atlas).
ATLAS_TOPOLOGIES = ("none", "connected")

#: Image similarities of the image-based refinement (atlasreg.losses.similarity.SIMILARITIES).
IMAGE_SIMILARITIES = ("lncc", "mind", "ngf", "mi", "mse")


def _check_across(cfg: dict) -> dict:
    """Checks that involve several keys: lengths that follow model.ndim, and model.size divisible by
    8 (the STN's three stride-2 levels) and by 2^(len(itn_channels) - 1) (the ITN's)."""
    m = cfg["model"]
    ndim = m["ndim"]
    for key, value in (("model.size", m["size"]), ("model.spacing", m["spacing"]),
                       ("data.spacing", cfg["data"]["spacing"])):
        if value is not None and len(value) != ndim:
            raise ConfigError(key, f"expected {ndim} entries (model.ndim is {ndim}), got {value}")
    itn = 2 ** (len(m["itn_channels"]) - 1)
    step = max(8, itn)
    if any(s % step for s in m["size"]):
        why = "8" if step == 8 else f"{step} (ITN with {len(m['itn_channels'])} scales)"
        raise ConfigError("model.size", f"expected entries divisible by {why}, got {m['size']}")
    for name, f in SCHEMA.fields.items():  # the sections of one method: its config only, complete
        if f.method is None:
            continue
        if m["method"] == f.method and name not in cfg:
            cfg[name] = f.type({}, name)
        elif m["method"] != f.method and name in cfg:
            raise ConfigError(name, f"settings of model.method {f.method}, but model.method is {m['method']}")
    for name, f in SCHEMA.fields.items():
        if f.across is not None and name in cfg:
            f.across(cfg)
    return cfg


def _check_deepatlas(cfg: dict) -> None:
    """The DeepATLAS settings that involve other sections: the implicit warp pairs the exams of a
    batch, and the deepest level of the network needs 2 voxels per axis."""
    d = cfg["deepatlas"]
    if d["seed_steps"] and d["seed_atlas"] is None:
        raise ConfigError("deepatlas.seed_steps", f"expected 0 without deepatlas.seed_atlas (the crops are the seed "
                          f"case's), got {d['seed_steps']}")
    lo, hi = d["seed_crop_scale"]
    if lo > hi:
        raise ConfigError("deepatlas.seed_crop_scale", f"expected [lo, hi] with 0 < lo <= hi <= 1, got {[lo, hi]}")
    if d["losses"]["implicit"] and cfg["training"]["batch_size"] < 2:
        raise ConfigError("training.batch_size", "expected >= 2 with deepatlas.losses.implicit (the implicit warp "
                          f"pairs the exams of a batch), got {cfg['training']['batch_size']}")
    levels = len(d["channels"]) - 1
    deepest = list(cfg["model"]["size"])
    for _ in range(levels):
        deepest = [(n + 1) // 2 for n in deepest]
    if min(deepest) < 2:
        raise ConfigError("deepatlas.channels", f"{levels} downsamplings leave {deepest} voxels of model.size "
                          f"{cfg['model']['size']} at the deepest level; each axis needs >= 2 (fewer levels)")


def _defaults(section: Section) -> dict:
    return {k: f.default_value(k) for k, f in section.fields.items()
            if f.default is not REQUIRED and f.method is None}


#: The complete default config (from SCHEMA).
DEFAULTS: dict[str, Any] = _defaults(SCHEMA)


def validate(cfg: dict) -> dict:
    """Check a config against `SCHEMA` and return it complete and normalised as a new plain dict
    (the argument is not changed): missing keys take their defaults, integers given for numbers
    become floats, label values ints, data paths absolute (relative ones against the current working
    directory). Validating a validated config returns an equal one.

    Raises ConfigError (an AtlasregError) naming the full key: unknown key, wrong type, value out of
    range, unknown choice (model.method, model.stn_variant), list of the wrong length."""
    return _check_across(SCHEMA(cfg, ""))


def validate_section(section: str, values: Mapping, base: Mapping | None = None) -> dict:
    """One top-level section (e.g. 'refinement') of `base` (a validated config's section; default:
    DEFAULTS) with `values` merged over it, validated against its schema: the overrides of a command
    (`segment --iterations`, the Python API's refinement settings) are checked as the config's own
    values are. Returns the complete section, normalised.

    Raises ConfigError naming the full key ('refinement.lr: expected a number > 0, got 0') for an
    unknown section or key, a wrong type or a value out of range."""
    if section not in SCHEMA.fields or not isinstance(SCHEMA.fields[section].type, Section):
        raise ConfigError(section, "unknown config section")
    if not isinstance(values, Mapping):
        raise _expected(section, "a mapping", values)
    merged = _merge(dict(DEFAULTS[section] if base is None else base), values)
    return SCHEMA.fields[section].type(merged, section)


# ---------------------------------------------------------------- reading files


def _stated_keys(data: Mapping, prefix: tuple = ()):
    """Every dotted key path a (nested) mapping states, intermediate ones included."""
    for k, v in data.items():
        yield prefix + (str(k),)
        if isinstance(v, Mapping):
            yield from _stated_keys(v, prefix + (str(k),))


def _resolve_paths(data: dict, folder: Path) -> dict:
    """Make the relative `images`/`labels`/`csv` of the data splits in one file's mapping absolute
    against `folder` (the file's own). Values of the wrong type are left for `validate` to report."""
    section = data.get("data")
    if not isinstance(section, dict):
        return data
    for split in SPLITS:
        spec = section.get(split)
        if not isinstance(spec, dict):
            continue
        for key in PATH_KEYS:
            value = spec.get(key)
            if isinstance(value, (str, os.PathLike)) and os.fspath(value).strip():
                spec[key] = os.path.abspath(os.path.join(folder, os.path.expanduser(os.fspath(value))))
    pre = section.get("preprocessing")
    if isinstance(pre, dict) and isinstance(pre.get("reference"), str) and pre["reference"].strip():
        pre["reference"] = os.path.abspath(os.path.join(folder, os.path.expanduser(pre["reference"])))
    return data


def _read_with_bases(path: Path, seen: list[Path]) -> tuple[dict, dict]:
    """A YAML config as a dict; a top-level `base: other.yaml` (relative to this file) is read first and
    this file's keys are merged over it, so a variant config names only what it changes. Data paths are
    made absolute against the folder of the file that states them. Also returns, for every key path
    stated, the file that stated it last."""
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
    data = _resolve_paths(data, path.parent)
    base = data.pop("base", None)
    origins = {k: path for k in _stated_keys(data)}
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base.strip():
        raise ConfigError("base", f"expected a file name, got {_show(base)}", path)
    merged, base_origins = _read_with_bases(path.parent / base, [*seen, path.resolve()])
    return _merge(merged, data), {**base_origins, **origins}


def _merge(base: dict, override: Mapping) -> dict:
    """Recursive dict merge (`data.labels` and non-mapping values are replaced, not merged); the keys
    are checked by `validate`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(out.get(key), dict) and isinstance(value, Mapping) and key != "labels":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _origin(key: str, origins: dict, default: Path | None) -> Path | None:
    """The file that stated `key` (or the nearest enclosing key); `default` when none did."""
    parts = tuple(re.sub(r"\[\d+\]$", "", p) for p in key.split("."))
    for n in range(len(parts), 0, -1):
        if parts[:n] in origins:
            return origins[parts[:n]]
    return default


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config (and its `base:` chain), merge it over DEFAULTS and `overrides` (e.g. from
    `parse_set`), and validate it (see the module docstring for paths). Returns a plain nested dict.

    Raises AtlasregError: missing file, invalid YAML, a cycle of bases; ConfigError (an AtlasregError)
    naming the key, and the file when the value was stated in one, for every schema violation."""
    cfg = copy.deepcopy(DEFAULTS)
    origins: dict = {}
    top = None
    if path is not None:
        top = Path(path)
        stated, origins = _read_with_bases(top, [])
        cfg = _merge(cfg, stated)
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError("", f"overrides: expected a mapping, got {_show(overrides)}")
        cfg = _merge(cfg, overrides)
        origins.update({k: None for k in _stated_keys(overrides)})
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(e.key, e.problem, _origin(e.key, origins, top)) from None


def parse_set(items: list[str] | None) -> dict:
    """`--set training.epochs=5` style overrides -> nested dict {"training": {"epochs": 5}}; values are
    parsed as YAML (`null`, `[64, 64]`, `{e0: 5, tau: 5}`). A later item for the same key wins.
    Raises AtlasregError naming the item for a missing '=', an empty key part or invalid YAML; types
    and ranges are checked by `validate`."""
    out: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(p.strip() for p in parts):
            raise AtlasregError(f"--set expects KEY=VALUE with a dotted key, e.g. training.epochs=5; got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise AtlasregError(f"--set {key}: invalid YAML value {text!r}: {str(e).splitlines()[0]}") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise AtlasregError(f"--set {key}: {'.'.join(parts[:i + 1])} is also set to a value")
        node[parts[-1]] = value
    return out


def differences(stored: Mapping, requested: Mapping, prefix: str = "") -> list[str]:
    """The dotted keys at which two configs differ, each as ``'key: stored -> requested'`` (a key
    missing on one side shows as ``<unset>``), in the order of `requested`."""
    out = []
    for key in [*requested, *(k for k in stored if k not in requested)]:
        a, b = stored.get(key, "<unset>"), requested.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a} -> {b}")
    return out
