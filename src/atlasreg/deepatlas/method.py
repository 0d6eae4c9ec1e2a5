"""DeepATLAS training (Chang, "DeepATLAS: One-Shot Localization for Biomedical Data", Secs. 2.3, 5.1,
5.2.3-5.2.6, 5.3.2): the registered method ``deepatlas`` (a Lightning module) and its training run
:func:`pretrain` (``atlasreg deepatlas pretrain``; ``atlasreg train`` with ``model.method: deepatlas``).

Data: the cases of ``data.train`` through atlasreg's data path (:class:`~atlasreg.data.case_dataset.CaseDataset`,
:class:`~atlasreg.data.cases.Preprocessing`: each image normalised and resampled onto the model grid
``model.size`` x ``model.spacing`` placed on it, with its field-of-view mask), *without labels*
unless ``deepatlas.losses.mask_channels`` asks for them; ``training.batch_size``, ``training.seed``,
``training.augmentation`` (MONAI RandAffine; the paper's is scaling 0.7-1.3, rotation +-0.5 rad,
translation +-8 voxels, Sec. 5.5.2), ``training.threads`` apply; everything else is in the
``deepatlas`` section of the config (:data:`atlasreg.config.DEEPATLAS`).

Schedule (:func:`schedule`; one global step counter, so a checkpoint's step says where it is):

1. *Autoencoder* (Sec. 5.3.2): ``deepatlas.autoencoder.steps`` steps of the multi-resolution
   autoencoder's reconstruction loss, Adam at ``autoencoder.lr`` decayed by ``lr_decay`` every
   ``lr_decay_every`` steps. Frozen afterwards (it defines the similarity). None with
   ``losses.similarity: mse``.
2. *Seed crops* (Sec. 5.2.5, optional: ``seed_steps``, with ``seed_atlas``): the coarsest head (the
   parameters of the first level: encoder, its head, the shared head) trained in a supervised way on
   random crops of the seed case, whose locations are known: a crop is the seed image sampled at
   ``p = s u + t`` (u the identity map, s drawn uniformly from ``seed_crop_scale``, t uniformly such that
   the crop lies inside the image), resampled onto the model grid, and its target coordinate map is p:
   the seed case's own positions, the coordinates of the atlas seeded from it. This starts the
   coordinate maps valid (unfolded): from a random network the implicit warp of two folded maps gives
   gradients that keep them folded (a 64 x 64 chest run: half the voxels folded after 100 steps
   without this stage, none with it). MSE in normalised units squared, at the first stage's rate.
3. *Staged coarse-to-fine optimisation* (Sec. 5.2.3), for k = 1 .. L + 1 active heads (the coarsest
   first): for k >= 2 first the *head warm-up* (``head_warmup_steps`` steps of
   :meth:`~atlasreg.deepatlas.network.CoordinateNet.head_warmup_loss` over the new level's parameters
   only, every other weight frozen), then ``steps_per_level`` steps of the DeepATLAS loss over the whole
   network and the atlas, at the learning rate ``lr * lr_level_factor^(k-1)`` (Sec. 5.2.6: 0.005, halved
   per resolution), grown linearly from 10% to 100% over the stage's first ``lr_warmup_steps`` steps
   and decayed by ``lr_decay`` every ``lr_decay_every`` steps.

Loss of a batch of N exams x_n (N, 1, *S) with coordinate maps c_n = F(x_n) (N, D, *S), foreground
masks m_n (the field of view, times the training mask of Sec. 5.5.3 when
``foreground.threshold`` is set), auxiliary channels x'_n (image, Prewitt gradient, masks of the
labels when ``mask_channels``; Sec. 5.1.5) and the learnable atlas X' (same channels, Sec. 5.1.2)::

    explicit  (Eqs. 3, 8, 13):  L_sim(X' o c_n, x'_n; m_n) + w_s L_smooth(c_n; m_n)
    implicit  (Eqs. 1, 4-7, 12): L_sim(x'_p o Phi_I, x'_q; m_q o_p) + w_s L_smooth(Phi_I; m_q o_p)
              for the pairs (p, q) = (n + 1 mod N, n) of the batch, Phi_I = c_q o c_p^-1 by
              implicit_warp (``implicit_steps`` recursive updates, differentiated at the last one by
              default, ``implicit_gradient``), o_p = the overlap mask times m_p o Phi_I

``L_sim``: feature NCC of Eq. 9 on channel 0 (the frozen autoencoder's features) plus
``auxiliary_weight`` times the MSE of the other channels; with ``similarity: mse`` the MSE of the image
instead of the features (ablation, Sec. 5.4.3). ``L_smooth``: Eq. 11
(:func:`~atlasreg.deepatlas.losses.smoothness_loss`).
``losses.explicit: false`` / ``losses.implicit: false`` are the other ablations of Table 5.

Checkpoints (Lightning, atomic): the config (hyper-parameters), the weights of the network, the
autoencoder and the atlas, the optimisers, the random states, the number of trained levels (a buffer,
so :func:`~atlasreg.models.registry.load_model` restores the heads to use) and under the key
``deepatlas`` the stage (:meth:`DeepAtlasModule.on_save_checkpoint`).

Choices where the paper is silent or ambiguous:

* *Pairs of the implicit warp*: each exam of a batch is aligned to its neighbour (the batch rolled by
  one), so every exam is fixed once and moving once; a batch of one exam has no implicit term.
* *The learning-rate decay* restarts with each stage (its step count is the stage's); the head
  warm-up runs at the stage's peak learning rate without warm-up or decay (the paper gives neither).
* *Optimisers*: one Adam for the autoencoder, one for the head warm-ups and one for the DeepATLAS loss
  (network and atlas), each keeping its moments across stages.
* *Units of the foreground threshold*: the normalised intensities the network sees (the paper's -900 HU
  is in raw CT units before its clipping).
* *Atlas initialisation*: a constant 0 (the normalised images' mean), or the seed case's channels
  resampled onto the atlas grid (as seen through the identity map, the target of the seed crops).
* *Seed crops* (Sec. 5.2.5: "random crops ... from the single template exam"): isotropic, axis-aligned
  crops (a uniform scale and shift, no rotation), resampled linearly onto the model grid; a batch of
  ``training.batch_size`` crops per step, the step's training batch unused. Optional in the paper, but
  without it the implicit warp of an untrained network's folded maps does not train here (module
  docstring, stage 2).
* *Learning rate and batch size*: the paper's rate 0.005 is for batches of 64; for smaller batches the
  config should scale it (configs/deepatlas_chest.yaml: 5e-4 for 8).
"""

from __future__ import annotations

import gc
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from ..errors import AtlasregError
from ..models.registry import Method, register
from .autoencoder import FeatureAutoencoder
from .coordinates import sample_at
from .losses import (DeepAtlasSimilarity, auxiliary_channels, foreground_mask, similarity_loss, smoothness_loss)
from .network import CoordinateNet
from .warps import Atlas, implicit_warp, overlap_mask

__all__ = ["Stage", "schedule", "stage_at", "template_grid", "DeepAtlasModule", "pretrain"]

#: Kinds of stages of :func:`schedule`.
AUTOENCODER, SEED, WARMUP, COORDINATES = "autoencoder", "seed crops", "warm-up", "coordinates"


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: `kind` (:data:`AUTOENCODER`, :data:`WARMUP`, :data:`COORDINATES`),
    `levels` the active heads of the coordinate network (0 for the autoencoder; :data:`SEED` trains the
    first), its first global
    step `start`, its `steps`, its peak learning rate `lr`, linear warm-up over `warmup` steps, decay
    by `decay` every `decay_every` steps (counted from the stage's start)."""

    kind: str
    levels: int
    start: int
    steps: int
    lr: float
    warmup: int = 0
    decay: float = 1.0
    decay_every: int = 1
    of_levels: int = 0

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def name(self) -> str:
        if self.kind in (AUTOENCODER, SEED):
            return self.kind
        return f"{'head warm-up' if self.kind == WARMUP else 'stage'} {self.levels}/{self.of_levels}"

    def learning_rate(self, step: int) -> float:
        """The learning rate at global step `step` of this stage (Sec. 5.2.6): ``lr`` decayed by
        ``decay`` every ``decay_every`` steps, times ``0.1 + 0.9 i / warmup`` during the first
        ``warmup`` steps i of the stage."""
        i = max(0, int(step) - self.start)
        lr = self.lr * self.decay ** (i // self.decay_every)
        if i < self.warmup:
            lr *= 0.1 + 0.9 * i / self.warmup
        return lr


def schedule(config: dict) -> list[Stage]:
    """The stages of a DeepATLAS run from a validated config (module docstring), in order, without the
    stages of zero steps. Their steps add up to the run's total number of steps."""
    d = config["deepatlas"]
    levels = len(d["channels"])
    stages: list[Stage] = []
    start = 0

    def add(kind, k, steps, lr, warmup=0, decay=1.0, every=1):
        nonlocal start
        if steps > 0:
            stages.append(Stage(kind, k, start, int(steps), float(lr), int(warmup), float(decay), int(every), levels))
            start += int(steps)

    if d["losses"]["similarity"] == "features":
        add(AUTOENCODER, 0, d["autoencoder"]["steps"], d["autoencoder"]["lr"], 0, d["lr_decay"], d["lr_decay_every"])
    add(SEED, 1, d["seed_steps"], d["lr"])
    for k in range(1, levels + 1):
        lr = d["lr"] * d["lr_level_factor"] ** (k - 1)
        if k >= 2:
            add(WARMUP, k, d["head_warmup_steps"], lr)
        add(COORDINATES, k, d["steps_per_level"], lr, d["lr_warmup_steps"], d["lr_decay"], d["lr_decay_every"])
    return stages


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage global step `step` belongs to (the last stage for a step at or beyond the end)."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def template_grid(config: dict):
    """The grid of the atlas X and of the templates (:class:`~atlasreg.spatial.grid.Grid`, centred):
    ``atlas_factor`` times the model grid per axis over the model grid's corner-to-corner extent
    (corner-aligned coordinates: its first and last voxel centres are the model grid's), so the
    template coordinate -1 / +1 lies at the model grid's first / last voxel centre."""
    from ..spatial.grid import Grid

    size = [int(config["deepatlas"]["atlas_factor"]) * int(n) for n in config["model"]["size"]]
    spacing = [(n - 1) * s / (m - 1) for n, s, m in zip(reversed(config["model"]["size"]), config["model"]["spacing"],
                                                          reversed(size))]
    return Grid.centred(size, spacing)


@register("deepatlas", "DeepATLAS")
class DeepAtlasModule(Method):
    """DeepATLAS as a Lightning module (module docstring): the coordinate network ``net``
    (:class:`~atlasreg.deepatlas.network.CoordinateNet`), the feature ``autoencoder``
    (:class:`~atlasreg.deepatlas.autoencoder.FeatureAutoencoder`, None with ``similarity: mse``) and the
    learnable ``atlas`` (:class:`~atlasreg.deepatlas.warps.Atlas`, on :func:`template_grid`: channel 0
    the image, then the gradient and mask channels that ``losses`` asks for). Manual optimisation: each
    training step runs the stage of the schedule its global step is in (:func:`schedule`).

    config: the method's arguments (:meth:`arguments_from_config`): name, data (labels, spacing,
    preprocessing, splits for provenance), model (ndim, size, spacing), training (batch_size, seed,
    augmentation) and deepatlas. Raises ValueError for a config the networks cannot be built from."""

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        self.automatic_optimization = False
        d, m = config["deepatlas"], config["model"]
        ndim = int(m["ndim"])
        self.net = CoordinateNet(ndim, 1, d["channels"], d["head_channels"], d["norm_groups"])
        losses = d["losses"]
        self.autoencoder = (FeatureAutoencoder(ndim, 1, d["channels"], d["autoencoder"]["heads"], 1, d["norm_groups"])
                            if losses["similarity"] == "features" else None)
        self.masks = bool(losses["mask_channels"])
        channels = 1 + int(bool(losses["gradient_channel"])) + (len(config["data"]["labels"]) - 1 if self.masks else 0)
        self.atlas = Atlas.for_exams(m["size"], channels, int(d["atlas_factor"]))
        #: active heads of the latest coordinate stage begun (0: none yet); restored with the weights
        self.register_buffer("levels_trained", torch.zeros((), dtype=torch.long))
        #: the seed case's image (1, 1, *S) for the seed crops (Sec. 5.2.5), checkpointed with the rest
        self.register_buffer("seed_image", torch.zeros(1, 1, *m["size"]))
        self.stages = schedule(config)
        self._mse = DeepAtlasSimilarity(None, float(losses["auxiliary_weight"]), feature_mse=True)
        self.train_data: Dataset | None = None
        self._augment = None
        self._frozen_for: int | None = None
        self._level_params: dict[int, set[int]] = {}
        #: the values of the latest training step ('loss/total', 'loss/explicit_sim', ...; floats)
        self.step_losses: dict = {}
        self.atlas_update_seconds = 0.0

    # ---------------------------------------------------------------- Method protocol
    @classmethod
    def arguments_from_config(cls, config: dict) -> dict:
        keys = ("name", "data", "model", "training", "deepatlas")
        return {k: config[k] for k in keys if k in config}

    @property
    def total_steps(self) -> int:
        """Steps of the whole schedule."""
        return self.stages[-1].end

    @property
    def active_levels(self) -> int:
        """Heads a prediction uses: those trained so far (at least the coarsest)."""
        return max(1, int(self.levels_trained))

    def coordinates(self, images: torch.Tensor, full_resolution: bool = True) -> torch.Tensor:
        """Coordinate maps c (N, D, *S) of preprocessed images (N, 1, *S) on the model grid (Sec. 2.1),
        from the heads trained so far (:attr:`active_levels`), without gradients. Corner-aligned
        normalised template coordinates in [-1, 1], channels in ITK order (:mod:`.coordinates`)."""
        self.net.active_levels = self.active_levels
        with torch.no_grad():
            return self.net(images, full_resolution)

    def predict(self, images: torch.Tensor) -> dict:
        """DeepATLAS segments through a template (Eq. 14), not a labelled atlas: AtlasregError pointing
        to ``atlasreg deepatlas template`` and ``propagate``."""
        raise AtlasregError("a DeepATLAS model segments with a template: build one with `atlasreg deepatlas "
                            "template` and apply it with `atlasreg deepatlas propagate`")

    @classmethod
    def report_label(cls, info: dict) -> str:
        return str(info["label"]) if info.get("label") else "DeepATLAS"

    @classmethod
    def report_column(cls, info: dict, output: str) -> str | None:
        """'DeepATLAS' (or the model's label) for the template propagated by the coordinate maps, the
        one output ``atlasreg deepatlas propagate`` writes (as ``onepass``: one forward pass)."""
        return cls.report_label(info) if output == "onepass" else None

    # ---------------------------------------------------------------- data
    def set_training_data(self, dataset: Dataset | None) -> None:
        """The training cases (a :class:`~atlasreg.data.case_dataset.CaseDataset`: items (image (1, *S),
        labelmap (C or 0, *S), index, field-of-view mask (1, *S))), for :meth:`seed_atlas`. None
        releases it."""
        self.train_data = dataset

    def exam_channels(self, image: torch.Tensor, labelmap: torch.Tensor | None) -> torch.Tensor:
        """x' of Sec. 5.1.5: the image (N, 1, *S), its Prewitt gradient magnitude and the binarised
        foreground label masks, as far as ``deepatlas.losses`` asks for them: (N, atlas channels, *S)."""
        losses = self.config["deepatlas"]["losses"]
        masks = labelmap[:, 1:] if self.masks else None
        if losses["gradient_channel"]:
            return auxiliary_channels(image, masks)
        return image if masks is None else torch.cat([image, (masks > 0.5).to(image.dtype)], 1)

    @torch.no_grad()
    def seed_atlas(self) -> str | None:
        """Seed the atlas with the channels of the training case ``deepatlas.seed_atlas`` (Secs. 5.1.2,
        5.2.5), resampled onto the atlas grid; returns its name (None without seed). AtlasregError
        when the case is not in the training set."""
        name = self.config["deepatlas"].get("seed_atlas")
        if name is None:
            return None
        names = list(getattr(self.train_data, "names", None) or [])
        if str(name) not in names:
            raise AtlasregError(f"deepatlas.seed_atlas: case {name!r} is not in the training set (first cases: "
                                f"{names[:5]})")
        item = self.train_data[names.index(str(name))]
        self.atlas.seed(self.exam_channels(item[0][None], item[1][None]))
        self.seed_image.copy_(item[0][None])
        return str(name)

    def seed_crops(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random crops of the seed case (Sec. 5.2.5; module docstring): images (n, 1, *S) on the model
        grid and their known coordinate maps p (n, D, *S), corner-aligned normalised positions in the
        seed case. Draws from torch's global generator (checkpointed, so a resumed run draws the same)."""
        from .coordinates import identity_coordinates

        u = identity_coordinates(self.seed_image.shape[2:], self.seed_image.device, self.seed_image.dtype)
        lo, hi = self.config["deepatlas"]["seed_crop_scale"]
        shape = (n, 1, *[1] * (u.dim() - 2))
        scale = torch.rand(shape, device=u.device, dtype=u.dtype) * (hi - lo) + lo
        shift = (torch.rand((n, u.shape[1], *shape[2:]), device=u.device, dtype=u.dtype) * 2.0 - 1.0) * (1.0 - scale)
        points = scale * u + shift
        return sample_at(self.seed_image, points), points

    def on_fit_start(self) -> None:
        aug = self.config["training"]["augmentation"]
        if aug.get("enabled"):
            from ..data.augmentation import make_spatial_augmentation
            self._augment = make_spatial_augmentation(aug, self.config["model"]["ndim"],
                                                      self.config["model"]["spacing"],
                                                      seed=int(self.config["training"]["seed"]) + self.global_rank)

    def _batch(self, batch):
        """(image (N, 1, *S), labelmap (N, C or 0, *S), foreground (N, 1, *S) 0/1), augmented."""
        image, labelmap, mask = batch[0], batch[1], batch[3]
        if self._augment is not None:
            image, moved, mask = self._augment(image, labelmap, mask)
            labelmap = moved if labelmap.shape[1] else labelmap
        fg = (mask > 0.5).to(image.dtype)
        threshold = self.config["deepatlas"]["foreground"]["threshold"]
        if threshold is not None:
            fg = fg * foreground_mask(image, float(threshold), float(self.config["deepatlas"]["foreground"]["sigma"]))
        return image, labelmap, fg

    # ---------------------------------------------------------------- losses
    def similarity(self, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_sim (Eqs. 9, 12-13): feature NCC of channel 0 plus the weighted MSE of the others, or the
        MSE ablation; a scalar, the mean over the batch."""
        weight = float(self.config["deepatlas"]["losses"]["auxiliary_weight"])
        if self.autoencoder is None:
            return self._mse(moving, fixed, mask)
        return similarity_loss(moving, fixed, self.autoencoder.features, mask, weight)

    def registration_losses(self, image: torch.Tensor, labelmap: torch.Tensor, fg: torch.Tensor) -> dict:
        """The DeepATLAS loss terms of a batch (module docstring): 'explicit_sim', 'explicit_smooth',
        'implicit_sim', 'implicit_smooth' (those the settings ask for; the implicit ones need N >= 2)
        and 'total' (similarities plus ``smoothness_weight`` times the smoothness terms). Scalars."""
        losses = self.config["deepatlas"]["losses"]
        w = float(losses["smoothness_weight"])
        x = self.exam_channels(image, labelmap)
        c = self.net(image)
        out: dict = {}
        if losses["explicit"]:
            out["explicit_sim"] = self.similarity(self.atlas(c), x, fg)
            out["explicit_smooth"] = smoothness_loss(c, fg)
        if losses["implicit"] and image.shape[0] >= 2:
            order = torch.roll(torch.arange(image.shape[0], device=image.device), -1)  # p = n + 1, q = n
            phi = implicit_warp(c[order], c, int(losses["implicit_steps"]), mask=fg,
                                gradient=losses["implicit_gradient"])
            both = sample_at(torch.cat([x[order], fg[order]], 1), phi)
            keep = fg * overlap_mask(phi) * (both[:, -1:].detach() > 0.5).to(fg.dtype)
            out["implicit_sim"] = self.similarity(both[:, :-1], x, keep)
            out["implicit_smooth"] = smoothness_loss(phi, keep)
        total = sum((v if k.endswith("_sim") else w * v) for k, v in out.items())
        out["total"] = total if out else c.sum() * 0.0
        return out

    # ---------------------------------------------------------------- training
    def configure_optimizers(self):
        from ..models.optim import adam

        d = self.config["deepatlas"]
        opts = [adam(self.net.parameters(), d["lr"]), adam([*self.net.parameters(), *self.atlas.parameters()], d["lr"])]
        if self.autoencoder is not None:
            opts.append(adam(self.autoencoder.parameters(), d["autoencoder"]["lr"]))
        return opts

    def _freeze_for(self, stage: Stage) -> None:
        """requires_grad as the stage trains: the autoencoder alone; the first level's parameters (seed
        crops) or the new level's alone (head warm-up); the network and the atlas (the autoencoder
        frozen)."""
        if self._frozen_for == stage.start:
            return
        if self.autoencoder is not None:
            self.autoencoder.requires_grad_(stage.kind == AUTOENCODER)
        self.atlas.requires_grad_(stage.kind == COORDINATES)
        if stage.kind in (SEED, WARMUP):
            self.net.requires_grad_(False)
            self.net.active_levels = stage.levels
            for p in self.net.level_parameters():
                p.requires_grad_(True)
        else:
            self.net.requires_grad_(stage.kind == COORDINATES)
        self._frozen_for = stage.start

    def stage(self, step: int | None = None) -> Stage:
        """The stage of global step `step` (default: the trainer's current step)."""
        return stage_at(self.stages, self.global_step if step is None else step)

    def training_step(self, batch, batch_idx):
        step = self.global_step
        stage = self.stage(step)
        self._freeze_for(stage)
        image, labelmap, fg = self._batch(batch)
        opts = self.optimizers()
        if stage.kind == AUTOENCODER:
            opt = opts[2]
            loss = self.autoencoder.reconstruction_loss(image)
            values = {"loss/total": loss, "loss/autoencoder": loss}
        elif stage.kind == SEED:
            opt = opts[0]
            self.net.active_levels = 1
            crops, target = self.seed_crops(image.shape[0])
            loss = torch.nn.functional.mse_loss(self.net(crops), target)
            values = {"loss/total": loss, "loss/seed": loss}
        elif stage.kind == WARMUP:
            opt = opts[0]
            self.net.active_levels = stage.levels
            loss = self.net.head_warmup_loss(image)
            values = {"loss/total": loss, "loss/warmup": loss}
        else:
            opt = opts[1]
            self.net.active_levels = stage.levels
            if int(self.levels_trained) != stage.levels:
                self.levels_trained.fill_(stage.levels)
            terms = self.registration_losses(image, labelmap, fg)
            loss = terms.pop("total")
            values = {"loss/total": loss, **{f"loss/{k}": v for k, v in terms.items()}}
        lr = stage.learning_rate(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.step_losses = {k: float(v.detach()) for k, v in values.items()}
        self.step_losses.update({"lr": lr, "stage": stage.name})
        if self.logger is not None:
            self.logger.log_metrics({"lr": lr, "levels": float(stage.levels)}, step=step)
        return loss.detach()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        stage = self.stage()
        checkpoint["deepatlas"] = {"stage": stage.name, "kind": stage.kind, "levels": stage.levels,
                                   "levels_trained": int(self.levels_trained), "step": int(self.global_step),
                                   "total_steps": self.total_steps}


# ------------------------------------------------------------------------------------------ progress
class StageProgress(Callback):
    """A tqdm bar on stderr over the run's steps, showing the stage and the latest loss and learning rate,
    e.g. ``stage 2/5:  40%|####  | 120/300 [00:21<00:31, loss=0.812, lr=2.5e-03]``."""

    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer, pl_module):
        from tqdm import tqdm

        self.bar = tqdm(total=pl_module.total_steps, initial=trainer.global_step, file=sys.stderr, dynamic_ncols=True,
                        smoothing=0, unit="step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        values = pl_module.step_losses
        self.bar.set_description(str(values.get("stage", "")), refresh=False)
        self.bar.set_postfix_str(f"loss={values.get('loss/total', float('nan')):.4g}, "
                                 f"lr={values.get('lr', float('nan')):.2g}", refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.bar is not None:
            self.bar.leave = False  # cleared: the error is the last line
            self.bar.close()


class _TrainingLoader(DataLoader):
    """A DataLoader with Lightning's stateful-loader interface and an empty state: where a resumed run
    continues in its epoch follows from the checkpoint's global step (the sampler's `skip`), so
    Lightning need not warn that the loader cannot resume mid-epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _training_cases(config: dict, out_dir: Path):
    from ..models.train import training_dataset

    labelled = bool(config["deepatlas"]["losses"]["mask_channels"])
    try:
        return training_dataset(config, out_dir, labelled=labelled)
    except AtlasregError as e:
        if labelled and str(e).endswith("no labelmap for this image"):
            raise AtlasregError("no labelmap for this image (deepatlas.losses.mask_channels needs one per training "
                                "image)", e.path) from None
        raise


def save_atlas_image(module: DeepAtlasModule, folder: Path) -> Path:
    """Write the learnt atlas X (its image channel) as the atlas folder's image (:mod:`atlasreg.contracts`):
    float32 on :func:`template_grid`, in the normalised intensities of the training images."""
    import SimpleITK as sitk

    from ..contracts import atlas_paths
    from ..data.io import write_image

    image = sitk.GetImageFromArray(module.atlas.tensor.detach()[0, 0].cpu().numpy().astype("float32"))
    template_grid(module.config).copy_information_to(image)
    return write_image(image, atlas_paths(folder).image)


def pretrain(config: dict, out_dir: str | Path, resume: bool = True, progress: bool = True, device: str = "auto",
             callbacks: list | None = None) -> Path:
    """Self-supervised DeepATLAS training on ``data.train`` (images; labelmaps only with
    ``deepatlas.losses.mask_channels``) into the training run folder `out_dir`
    (:func:`atlasreg.contracts.run_paths`): the config, the checkpoint folder (the last checkpoint every
    ``deepatlas.checkpoint_every`` steps, Lightning's name, and the newest step checkpoint), the final
    checkpoint, the atlas folder (the learnt atlas image on :func:`template_grid`), TensorBoard logs
    (``loss_step/*`` per step, ``lr`` and ``levels``) and the case cache. Runs the schedule of
    :func:`schedule` with Lightning; resumes from the last checkpoint when `resume` and the folder holds
    a run of the same config (another config: AtlasregError naming the differing keys; `resume` False
    deletes that run first); a finished run is left as it is (its final checkpoint's bytes, which the
    templates built with it record, do not change). progress: a bar over the steps on stderr. device:
    'auto', 'cpu', 'cuda', 'cuda:<i>'. callbacks: more Lightning callbacks (tests). Every training case is
    read before anything is written (AtlasregError naming the file of a bad case). Returns the final
    checkpoint.
    Raises AtlasregError for a config whose method is not deepatlas, an empty training set, a single
    case with the implicit warp, or an interrupted run (KeyboardInterrupt, after its checkpoint)."""
    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..config import validate
    from ..contracts import LOG_DIR, STEP_CHECKPOINT, read_run_config, run_paths
    from ..data.io import write_text
    from ..devices import lightning_accelerator, resolve_device
    from ..distributed import EpochShuffleSampler
    from ..models.monitor import StepLosses, console_line, quiet_lightning
    from ..models.train import AtomicCheckpointIO, RandomStates, _check_resumable, _clear_run, _resume_step

    config = validate(config)
    if config["model"]["method"] != DeepAtlasModule.name:
        raise AtlasregError(f"model.method is {config['model']['method']}: `atlasreg deepatlas pretrain` trains "
                            "model.method deepatlas (use `atlasreg train` for the others)")
    if config["data"]["train"] is None:
        raise AtlasregError("data.train: missing: pretraining needs a data split {images | csv, ...}")
    accelerator, device_ids = lightning_accelerator(resolve_device(device))
    out_dir = Path(out_dir)
    paths = run_paths(out_dir)
    t = config["training"]
    if t.get("threads"):
        torch.set_num_threads(int(t["threads"]))
    L.seed_everything(int(t["seed"]), workers=True, verbose=False)
    dataset = _training_cases(config, out_dir)
    if len(dataset) == 0:
        raise AtlasregError("the training set is empty")
    if config["deepatlas"]["losses"]["implicit"] and len(dataset) < 2:
        raise AtlasregError(f"the implicit warp pairs exams: {len(dataset)} training image is too few (set "
                            "deepatlas.losses.implicit: false or add images)", dataset.pairs[0].image)
    created = not out_dir.exists()
    has_run = paths.last_checkpoint.is_file() or paths.final_checkpoint.is_file()
    if resume and has_run:
        _check_resumable(read_run_config(out_dir), config, out_dir)
    dataset.check()  # every case read once before anything is written
    if not (resume and has_run) and not created:
        _clear_run(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_text(paths.config, yaml.safe_dump(config, sort_keys=False))
        module = DeepAtlasModule(config)
        module.set_training_data(dataset)
        last = paths.last_checkpoint
        ckpt_path = str(last) if (resume and last.is_file()) else None
        if ckpt_path is None:
            module.seed_atlas()
        # A DeepATLAS step is one batch, so a checkpoint's global step says how far into its epoch the
        # run was: a resumed run skips those batches and trains on exactly the uninterrupted run's (tested)
        order = EpochShuffleSampler(len(dataset), int(t["seed"]))
        loader = _TrainingLoader(dataset, batch_size=int(t["batch_size"]), sampler=order, drop_last=False,
                                 num_workers=int(config["data"]["num_workers"]))
        checkpoint = ModelCheckpoint(dirpath=paths.checkpoints, filename=STEP_CHECKPOINT, auto_insert_metric_name=False,
                                     save_last=True, save_top_k=1,
                                     every_n_train_steps=int(config["deepatlas"]["checkpoint_every"]))
        step = _resume_step(last) if ckpt_path else None
        if step is not None and step >= module.total_steps and paths.final_checkpoint.is_file():
            # a finished run: its checkpoint (and the templates that name its bytes) stays as it is
            console_line(f"{out_dir} holds a finished run ({step} of {module.total_steps} steps): nothing to do")
            return paths.final_checkpoint
        if step is not None:  # the batches of the checkpoint's epoch already trained
            order.skip = (step % len(loader)) * int(t["batch_size"])
        logger = TensorBoardLogger(out_dir, name=LOG_DIR, version=0, default_hp_metric=False,
                                   **({"purge_step": step} if step is not None else {}))
        with quiet_lightning(), warnings.catch_warnings():
            # the checkpoint of a step holds the state after its update, as meant (a Lightning note)
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization",
                                    category=UserWarning)
            # a resumed run continues its checkpoint folder (a Lightning note)
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            trainer = L.Trainer(
                max_steps=module.total_steps, max_epochs=-1, accelerator=accelerator, devices=device_ids,
                logger=logger, callbacks=[RandomStates(), StepLosses(), *(callbacks or []), checkpoint,
                                          *([StageProgress()] if progress else [])],
                plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                log_every_n_steps=1, num_sanity_val_steps=0, use_distributed_sampler=False)
            if ckpt_path:
                console_line(f"resuming from {ckpt_path} (step {step} of {module.total_steps})")
            trainer.fit(module, loader, ckpt_path=ckpt_path)
            if trainer.interrupted:
                raise KeyboardInterrupt
            trainer.save_checkpoint(paths.final_checkpoint, weights_only=False)
            trainer.save_checkpoint(last, weights_only=False)  # a finished run resumes at its end
        save_atlas_image(module, paths.atlas)
        module.set_training_data(None)
        module.trainer = None
        del trainer, module, loader, dataset
        gc.collect()
        return paths.final_checkpoint
    except AtlasregError:
        if created and not paths.last_checkpoint.is_file():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


DeepAtlasModule.training_run = staticmethod(pretrain)  # `atlasreg train` with model.method deepatlas
