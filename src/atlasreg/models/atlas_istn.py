"""Atlas-ISTN (Sinclair et al. 2022): ITN + STN + transformation computation, losses of Eq. 14, and
the paper's baselines, as registered methods (:mod:`atlasreg.models.registry`).

:class:`AtlasISTN` is the stateless network (Eq. 9). :class:`AtlasISTNModule` (method ``atlas_istn``)
is the Lightning module that trains it and owns the atlas (Eqs. 15-16) as buffers, so checkpoints hold
weights, optimiser, atlas and the method's arguments together. :class:`UNetModule` (``unet``: the ITN
alone; with ``training.fixed_atlas`` also the paper's 'Independent') and :class:`VMLModule` (``vml``:
no ITN, the STN registers the image to the atlas image) are the baselines. Fixed atlas, Atlas-ISTN
without L_s and SVF only are settings of ``atlas_istn`` (``training.fixed_atlas``,
``training.seg_weight: 0``, ``model.stn_variant: svf``). With ``training.stn_gradient_to_itn: false``
the deformation losses train the STN only: the ITN learns from L_s alone and is, weight for weight, the
U-Net baseline of the same seed (the paper's Sec. 3.3 blames competing gradients for its ITN falling
behind the U-Net).
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..atlas import atlas_update
from ..config import LABEL_LOSSES
from ..data.case_dataset import StreamingSum
from ..distributed import all_reduce_sum, shard
from ..errors import AtlasregError
from ..losses import diffusion_regulariser, label_dice, label_mse, segmentation_loss
from ..nets.stn import STN
from ..nets.unet import UNet
from ..spatial.grid import Grid
from ..spatial.transforms import AffineSVFTransform, compose_transform, warp
from .optim import adam
from .registry import Method, register


class AtlasISTN(nn.Module):
    """ITN S (U-Net, Eq. 4), STN D (Eq. 5) and C (Eq. 6), without state.

    ndim: 2/3; num_classes: C incl. background; grid: the model grid (:meth:`Grid.centred`, the atlas's
    grid). with_itn: build the ITN (False for the paper's VoxelMorph-like baseline, Sec. 3.2);
    stn_on_images: the STN sees (image, atlas image) instead of the foreground channels of the ITN
    logits and of the atlas labelmap.
    forward(image (N, 1, *size), atlas_labelmap (1 or N, C, *size), atlas_image (1 or N, 1, *size))
    -> (logits (N, C, *size) or None without ITN, AffineSVFTransform).
    Raises ValueError for a grid that is not centred, or labels on the STN without an ITN.
    """

    def __init__(self, ndim: int, num_classes: int, grid: Grid,
                 itn_channels=(8, 16, 32, 64), stn_channels=(16, 16, 32), stn_variant: str = "affine_svf",
                 integration_steps: int = 6, with_itn: bool = True, stn_on_images: bool = False,
                 stn_activation: str = "relu", stn_max_rotation: float = 45.0):
        super().__init__()
        if not with_itn and not stn_on_images:
            raise ValueError("without an ITN the STN must see the images (stn_on_images=True)")
        self.ndim, self.num_classes = ndim, num_classes
        if not grid.is_centred:
            raise ValueError("the model grid must be centred at the world origin (Grid.centred)")
        self.grid = grid
        self.steps = integration_steps
        self.stn_on_images = stn_on_images
        self.itn = UNet(ndim, 1, num_classes, itn_channels) if with_itn else None
        stn_in = 2 if stn_on_images else 2 * (num_classes - 1)
        self.stn = STN(ndim, stn_in, grid, stn_variant, stn_channels, activation=stn_activation,
                       max_rotation=stn_max_rotation)

    @staticmethod
    def label_stn_input(logits: torch.Tensor, atlas_labelmap: torch.Tensor) -> torch.Tensor:
        """Foreground channels of the ITN logits and of the atlas labelmap: (N, 2(C-1), *size)."""
        atlas = atlas_labelmap[:, 1:]
        atlas = atlas.expand(logits.shape[0], *atlas.shape[1:])
        return torch.cat([logits[:, 1:], atlas], dim=1)

    def stn_input(self, image: torch.Tensor, logits: torch.Tensor | None, atlas_labelmap: torch.Tensor,
                  atlas_image: torch.Tensor | None) -> torch.Tensor:
        """The STN's input: label channels (Atlas-ISTN) or (image, atlas image) (VML)."""
        if self.stn_on_images:
            if atlas_image is None:
                raise ValueError("an STN on images needs the atlas image")
            return torch.cat([image, atlas_image.expand(image.shape[0], *atlas_image.shape[1:])], dim=1)
        return self.label_stn_input(logits, atlas_labelmap)

    def transform(self, stn_input: torch.Tensor, use_affine: bool = True) -> AffineSVFTransform:
        """STN D and transformation computation C (Eqs. 5-6); Phi^-1 is computed only when asked for."""
        out = self.stn(stn_input, use_affine=use_affine)
        return compose_transform(out["svf"], out["A"], out["t"], self.grid, self.steps)

    def forward(self, image: torch.Tensor, atlas_labelmap: torch.Tensor, atlas_image: torch.Tensor | None = None,
                use_affine: bool = True, detach_logits: bool = False):
        """(ITN logits (N, C, *S) or None, the transform). detach_logits: the STN reads the logits
        without passing gradients back to the ITN (training.stn_gradient_to_itn false)."""
        logits = self.itn(image) if self.itn is not None else None
        seen = logits.detach() if detach_logits and logits is not None else logits
        return logits, self.transform(self.stn_input(image, seen, atlas_labelmap, atlas_image), use_affine)


def fade_in_weight(epoch: int, fade_in: dict | None) -> float:
    """w of Eq. 14 by the schedule of Eq. 24: 1 / (1 + exp(-(epoch - e0) / tau)); 1 without fade-in."""
    if not fade_in:
        return 1.0
    x = -(epoch - fade_in["e0"]) / fade_in["tau"]
    if x > 700.0:  # exp would overflow; w is 0 to double precision
        return 0.0
    return 1.0 / (1.0 + math.exp(x))


def deformation_losses(transform: AffineSVFTransform, labelmap: torch.Tensor, atlas_labelmap: torch.Tensor,
                       reduction: str = "mean", with_s2a: bool = True, mask: torch.Tensor | None = None,
                       label_loss: str = "mse") -> dict:
    """L_a2s (Eq. 11), L_s2a (Eq. 12) and L_reg (Eq. 13) for one-hot/logit `labelmap` (N, C, *S)
    against the atlas labelmap (1, C, *S); foreground channels only. reduction: 'mean' or 'per_case'.
    mask: (N, 1, *S) the scans' field of view on the model grid, or None: L_a2s counts the voxels
    inside the scan, L_s2a the atlas voxels that Phi maps into it (padding is no anatomy).
    label_loss: 'mse' (the paper's, :func:`~atlasreg.losses.label_mse`) or 'dice'
    (:func:`~atlasreg.losses.label_dice`, every structure weighing the same; ``refinement.label_loss``).
    Raises ValueError for another label_loss.

    The regulariser acts on the non-rigid part only (the displacement of phi at SVF resolution)."""
    if label_loss not in LABEL_LOSSES:
        raise ValueError(f"label_loss must be one of {LABEL_LOSSES}, got {label_loss!r}")

    def compare(prediction, target, weight):
        if label_loss == "dice":
            return label_dice(prediction, target, reduction, weight)
        return label_mse(prediction, target, False, reduction, weight=weight)

    n = labelmap.shape[0]
    # Only the foreground channels are warped: the losses never look at the background.
    atlas = atlas_labelmap[:, 1:].expand(n, -1, *atlas_labelmap.shape[2:])
    target = labelmap[:, 1:]
    out = {"a2s": compare(warp(atlas, transform.inverse_points(), transform.grid), target, mask)}
    if with_s2a:
        if mask is None:
            moved, weight = warp(target, transform.forward_points(), transform.grid), None
        else:
            both = warp(torch.cat([target, mask], 1), transform.forward_points(), transform.grid,
                        padding="zeros")
            moved, weight = both[:, :-1], both[:, -1:]
        out["s2a"] = compare(moved, atlas, weight)
    svf = transform.svf
    if svf is not None:
        out["reg"] = diffusion_regulariser(svf.displacement_on_svf_grid, svf.grid.spacing, reduction)
    else:
        out["reg"] = labelmap.new_zeros(n if reduction == "per_case" else ())
    return out


#: An epoch mean of L_reg (Eq. 7, dimensionless: mm per mm) below this means a constant SVF.
CONSTANT_SVF_REG = 1e-7


def warn_if_svf_constant(losses: dict, config: dict) -> bool:
    """Warn (UserWarning) when an epoch's mean L_reg (`losses['loss/reg']`) is below
    :data:`CONSTANT_SVF_REG`: the SVF is a constant, typically because every unit of the STN's SVF
    decoder has died (ReLU), which no later epoch undoes (measured on the mouse brain at 0.3 mm).
    Suggests `model.stn_activation: leaky_relu` when the config uses ReLU. Returns whether it warned."""
    reg = losses.get("loss/reg")
    if reg is None or reg >= CONSTANT_SVF_REG or config["model"].get("stn_variant") == "affine":
        return False
    hint = (" Retrain with model.stn_activation: leaky_relu (whose units cannot die)."
            if config["model"].get("stn_activation", "relu") == "relu" else "")
    warnings.warn(f"L_reg is {reg:.1e} this epoch: the SVF is constant, so the STN's SVF decoder has "
                  f"probably stopped learning (dead ReLU units); the deformable part will stay off.{hint}",
                  stacklevel=2)
    return True


@register("atlas_istn", "Atlas-ISTN")
class AtlasISTNModule(Method):
    """Training of Atlas-ISTN with Lightning: loss of Eq. 14 with fade-in (Eq. 24) or delayed affine
    start, atlas initialisation and update at every epoch end (Eqs. 15-16).

    config: the method's arguments (:meth:`arguments_from_config`): ``data.labels`` and
    ``data.spacing`` (the preprocessing), ``model``, ``training`` and ``refinement``, plus the name
    and data splits of the experiment for provenance (``segment --split`` reads them). Stored in the
    checkpoint as hyper-parameters, so :func:`~atlasreg.models.registry.load_model` needs nothing else.
    The atlas (labelmap (1, C, *S), image (1, 1, *S)) lives in buffers, so it is checkpointed.
    """

    #: Whether the method has an ITN, and whether its STN sees images instead of labels.
    with_itn: bool = True
    stn_on_images: bool = False

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        m = config["model"]
        labels = list(config["data"]["labels"].keys())
        self.net = AtlasISTN(m["ndim"], len(labels), Grid.centred(m["size"], m["spacing"]), m["itn_channels"],
                             m["stn_channels"], m["stn_variant"], m["integration_steps"],
                             with_itn=self.with_itn, stn_on_images=self.stn_on_images,
                             stn_activation=m.get("stn_activation", "relu"),
                             stn_max_rotation=float(m.get("stn_max_rotation", 45.0)))
        size = tuple(m["size"])
        self.register_buffer("atlas_labelmap", torch.zeros(1, len(labels), *size))
        self.register_buffer("atlas_image", torch.zeros(1, 1, *size))
        self.register_buffer("atlas_ready", torch.zeros((), dtype=torch.bool))
        if float(config["training"].get("unbiased_weight", 0.0)) > 0:
            # running mean of the predicted velocity fields (unbiased atlas; only with the option, so
            # checkpoints without it load as before)
            half = self.net.grid.downsample(2).size
            self.register_buffer("velocity_mean", torch.zeros(1, m["ndim"], *half))
        self.train_data: Dataset | None = None
        self._augment = None
        self.atlas_update_seconds = 0.0
        self._epoch_sums: dict = {}
        self._epoch_count = 0
        #: The values of the latest training step ('loss/total', 'loss/seg', ..., 'w'; detached).
        self.step_losses: dict = {}

    # ---------------------------------------------------------------- training data
    def set_training_data(self, dataset: Dataset | None) -> None:
        """The training cases, used for the atlas (Eqs. 15-16): a map-style Dataset whose items begin
        with the unaugmented image (1, *S) and labelmap (C, *S) on the model grid (a
        :class:`~atlasreg.data.case_dataset.CaseDataset`, or a TensorDataset). Its `names` (case names,
        in item order) are needed by `training.fixed_atlas`. None releases it."""
        self.train_data = dataset

    def case_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """The cases of `dataset` in order, `batch_size` at a time, read by `data.num_workers` workers.
        The loader has its own generator, so iterating it leaves the global RNG (from which the
        training loader draws its workers' seeds) untouched."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                          num_workers=int(self.config["data"].get("num_workers", 0)), generator=torch.Generator())

    @classmethod
    def arguments_from_config(cls, config: dict) -> dict:
        keys = ("name", "data", "model", "training", "refinement")
        return {k: config[k] for k in keys if k in config}

    @property
    def method(self) -> str:
        return self.name

    @property
    def labels(self) -> list[int]:
        """The declared label values, in channel order."""
        return list(self.config["data"]["labels"].keys())

    def fixed_atlas(self) -> str | None:
        """Case name of a fixed training-case atlas (the paper's 'Fixed' and 'Independent'), or None."""
        return self.config["training"].get("fixed_atlas")

    def atlas_is_learnt(self) -> bool:
        """True when the atlas is built during training (Eqs. 15-16); False for a fixed atlas."""
        return self.fixed_atlas() is None

    def registers(self) -> bool:
        """True when the method maps the atlas to each case (1-pass transform, Eq. 9)."""
        return True

    def refines(self) -> bool:
        """True when test-time refinement (Eqs. 17-21) applies: it fits the atlas to ITN logits."""
        return self.registers() and self.net.itn is not None

    # ---------------------------------------------------------------- prediction (Method protocol)
    def predict(self, images: torch.Tensor) -> dict:
        """Model-grid predictions for preprocessed images (N, 1, *size): ``itn`` probabilities and
        ``logits`` (N, C, *size) where the method has an ITN; ``transforms``: {'onepass': Phi
        (Eq. 9), an :class:`AffineSVFTransform` of batch N} where it registers. No gradients."""
        net = self.net
        out: dict = {"transforms": {}}
        with torch.no_grad():
            logits = net.itn(images) if net.itn is not None else None
            if logits is not None:
                out["itn"] = torch.softmax(logits, 1)
                out["logits"] = logits
            if self.registers():
                stn_in = net.stn_input(images, logits, self.atlas_labelmap, self.atlas_image)
                out["transforms"]["onepass"] = net.transform(stn_in)
        return out

    def refine(self, images: torch.Tensor, predicted: dict, settings: dict | None = None) -> dict | None:
        """Test-time refinement (Eqs. 17-21) towards the ITN output of :meth:`predict` (its logits, or
        their argmax one-hot with ``refinement.target: labelmap``): returns
        {'transform': refined Phi* (batch N), 'history': losses (K+1, N)}, or None where the method
        does not refine. settings: overrides of ``config['refinement']``, validated as the config's
        own values (ConfigError naming the key, e.g. 'refinement.lr: expected a number > 0, got 0')."""
        if not self.refines():
            return None
        from ..atlas_topology import fitted_atlas
        from ..config import validate_section
        from .refine import refine_transforms

        r = validate_section("refinement", settings or {}, self.config["refinement"])
        transform, history = refine_transforms(self.net, predicted["logits"], fitted_atlas(self, r),
                                               int(r["iterations"]), float(r["lr"]), float(r["beta"]),
                                               float(r["gamma"]), float(r["lambda"]),
                                               mask=predicted.get("mask"), images=images,
                                               atlas_image=self.atlas_image,
                                               image_similarity=r.get("image_similarity"),
                                               image_weight=float(r.get("image_weight", 0.0)),
                                               target=r["target"], structures=r["structures"],
                                               stn_atlas=self.atlas_labelmap, label_loss=r["label_loss"])
        return {"transform": transform, "history": history}

    # ---------------------------------------------------------------- report naming
    @classmethod
    def report_label(cls, info: dict) -> str:
        """Short name of a trained model in the report ('Atlas-ISTN', 'Fixed', 'SVF',
        'Atlas-ISTN-L_s'), unless info['label'] names it; info: an evaluation folder's info
        (:func:`atlasreg.contracts.read_evaluation_info`)."""
        if info.get("label"):
            return str(info["label"])
        if info.get("fixed_atlas"):
            return "Fixed"
        if info.get("stn_variant") == "svf":
            return "SVF"
        if float(info.get("seg_weight", 1.0)) == 0.0:
            return "Atlas-ISTN-L_s"
        return "Atlas-ISTN"

    @classmethod
    def report_column(cls, info: dict, output: str) -> str | None:
        """The report column of one output: 'ITN', 'ITN_lcc', '1-pass', 'Refine' and 'Id' (the
        undeformed atlas) for Atlas-ISTN, the same after the model's label for its variants ('Fixed
        Refine', 'SVF Id'); None for the ITN outputs and the refinement of a model trained without L_s
        (:meth:`report_hidden`)."""
        label = cls.report_label(info)
        names = {"itn": "ITN", "itn_lcc": "ITN_lcc", "onepass": "1-pass", "refine": "Refine", "atlas": "Id"}
        if output not in names or cls.report_hidden(info, output):
            return None
        return names[output] if label == "Atlas-ISTN" else f"{label} {names[output]}"

    @classmethod
    def report_hidden(cls, info: dict, output: str) -> str | None:
        """Why the report leaves out an output of a model trained without L_s: its ITN output is no
        segmentation, so refining towards it is meaningless; the paper compares this model's 1-pass only
        (Sec. 3.2, Table 3). None for every other output."""
        if float(info.get("seg_weight", 1.0)) == 0.0 and output in ("itn", "itn_lcc", "refine"):
            return "trained without L_s: the ITN output is no segmentation (paper Sec. 3.2, Table 3)"
        return None

    def _initial_atlas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 15 at t = 0: the mean of the unaligned training labelmaps (1, C, *S) and images
        (1, 1, *S), streamed over the data set (equal bit for bit to `atlas.atlas_init` on the stacked
        cases, see StreamingSum; with several processes each sums its share and the sums are added,
        :func:`atlasreg.distributed.shard`); or the case named by `training.fixed_atlas`, read alone."""
        name = self.fixed_atlas()
        if name is None:
            n = len(self.train_data)
            mine = shard(self.train_data)
            sum_lab, sum_img = StreamingSum(len(mine)), StreamingSum(len(mine))
            loader = self.case_loader(mine, int(self.config["training"]["atlas_batch_size"]))
            show = self._trainer is not None and self._trainer.progress_bar_callback is not None
            for batch in tqdm(loader, desc="initial atlas", disable=not show, leave=False):
                img, lab = batch[0], batch[1]
                for i in range(img.shape[0]):
                    sum_lab.add(lab[i:i + 1])
                    sum_img.add(img[i:i + 1])
            totals = [sum_lab.total(), sum_img.total()]
            all_reduce_sum(totals)
            return totals[0] / n, totals[1] / n
        names = list(getattr(self.train_data, "names", None) or [])
        if str(name) not in names:
            raise AtlasregError(f"training.fixed_atlas: case {name!r} is not in the training set "
                                f"(first cases: {names[:5]})")
        item = self.train_data[names.index(str(name))]
        return item[1][None].clone(), item[0][None].clone()

    def on_fit_start(self) -> None:
        if not bool(self.atlas_ready):
            if self.train_data is None:
                raise RuntimeError("set_training_data() must be called before fit")
            lab, img = self._initial_atlas()
            self.atlas_labelmap.copy_(lab)
            self.atlas_image.copy_(img)
            self.atlas_ready.fill_(True)
        aug = self.config["training"]["augmentation"]
        if aug.get("enabled"):
            from ..data.augmentation import make_spatial_augmentation
            self._augment = make_spatial_augmentation(aug, self.config["model"]["ndim"],
                                                      self.config["model"]["spacing"],
                                                      seed=int(self.config["training"]["seed"]) + self.global_rank)

    # ---------------------------------------------------------------- training
    def use_affine(self) -> bool:
        return self.current_epoch >= int(self.config["training"]["affine_start_epoch"])

    def _batch(self, batch):
        """(image (N, 1, *S), labelmap (N, C, *S), mask (N, 1, *S) or None), augmented. A CaseDataset
        adds the indices and the field-of-view masks to the first two."""
        image, labelmap = batch[0], batch[1]
        mask = batch[3] if len(batch) > 3 else None
        if self._augment is not None:
            if mask is None:
                image, labelmap = self._augment(image, labelmap)
            else:
                image, labelmap, mask = self._augment(image, labelmap, mask)
        return image, labelmap, mask

    def training_step(self, batch, batch_idx):
        image, labelmap, mask = self._batch(batch)
        t = self.config["training"]
        n = image.shape[0]
        logits, transform = self.net(image, self.atlas_labelmap, self.atlas_image, self.use_affine(),
                                     detach_logits=not t.get("stn_gradient_to_itn", True))
        d = deformation_losses(transform, labelmap, self.atlas_labelmap, mask=mask)
        w = fade_in_weight(self.current_epoch, t["fade_in"])
        loss = w * (d["a2s"] + d["s2a"] + t["lambda"] * d["reg"])
        logs = {"loss/a2s": d["a2s"], "loss/s2a": d["s2a"], "loss/reg": d["reg"]}
        if hasattr(self, "velocity_mean") and transform.svf is not None:
            penalty = self._unbiased_penalty(transform.svf.v, float(t.get("unbiased_momentum", 0.1)))
            loss = loss + w * float(t["unbiased_weight"]) * penalty
            logs["loss/unbiased"] = penalty
        if logits is not None:  # Eq. 14; seg_weight 0 is the paper's Atlas-ISTN without L_s
            l_s = self.segmentation_loss(logits, labelmap, mask)
            loss = loss + float(t.get("seg_weight", 1.0)) * l_s
            logs["loss/seg"] = l_s
        self._accumulate({"loss/total": loss, **logs, "w": w}, n)
        return loss

    def segmentation_loss(self, logits: torch.Tensor, labelmap: torch.Tensor, mask: torch.Tensor | None):
        """L_s with the config's dice_weight and ce_weight (:func:`atlasreg.losses.segmentation_loss`)."""
        t = self.config["training"]
        return segmentation_loss(logits, labelmap, mask, float(t.get("dice_weight", 0.0)),
                                 float(t.get("ce_weight", 0.0)))

    def _unbiased_penalty(self, v: torch.Tensor, momentum: float) -> torch.Tensor:
        """Unbiased-atlas penalty (WBIR 2022, fetal atlas; issue 12 item 6): the running mean of the
        predicted velocity fields, m_t = (1 - momentum) m_{t-1} + momentum mean_batch(v), is kept near
        zero by mean(m_t^2) (mm^2), so the atlas drifts to the population's mean shape instead of one
        the transforms all have to bend towards. v: (N, D, *half size) mm. The gradient flows through
        this batch's term only; m_t is stored (buffer `velocity_mean`, checkpointed)."""
        running = (1.0 - momentum) * self.velocity_mean + momentum * v.mean(0, keepdim=True)
        self.velocity_mean.copy_(running.detach())
        return running.pow(2).mean()

    # ---------------------------------------------------------------- epoch means of the losses
    # Lightning's self.log costs about 0.5 ms per value and step on this CPU (3 ms, 5% of a Letter-B
    # step, for our six values), so the module keeps its own batch-size-weighted epoch means and
    # hands them to Lightning's logger once per epoch; the values of the latest step (`step_losses`)
    # go to TensorBoard through models/monitor.py's StepLosses, straight to the logger.
    def _accumulate(self, values: dict, n: int) -> None:
        step = {}
        for k, v in values.items():
            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
            step[k] = v
            self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + v * n
        self._epoch_count += n
        self.step_losses = step

    def epoch_losses(self) -> dict[str, float]:
        """Means over the training cases seen so far in this epoch: 'loss/total', 'loss/seg',
        'loss/a2s', 'loss/s2a', 'loss/reg' and 'w', as far as the method has them."""
        return {k: float(v) / self._epoch_count for k, v in self._epoch_sums.items()}

    def on_train_epoch_start(self) -> None:
        self._epoch_sums, self._epoch_count = {}, 0

    def reduce_epoch_losses(self) -> None:
        """Make the epoch sums of the losses sums over every rank's cases (DDP; no-op for one process),
        so :meth:`epoch_losses` gives the means over all the epoch's cases. Called on every rank at the
        epoch's end (the AtlasUpdate callback of :mod:`atlasreg.models.train`)."""
        keys = sorted(self._epoch_sums)
        values = torch.tensor([float(self._epoch_sums[k]) for k in keys] + [float(self._epoch_count)],
                              dtype=torch.float64, device=self.atlas_image.device)
        all_reduce_sum([values])
        self._epoch_sums = dict(zip(keys, values[:-1].tolist()))
        self._epoch_count = int(values[-1])

    def on_train_epoch_end(self) -> None:
        if self._epoch_count:
            losses = self.epoch_losses()
            self.log_dict(losses, on_step=False, on_epoch=True)
            if not getattr(self, "_warned_constant_svf", False) and self.current_epoch >= 1:
                self._warned_constant_svf = warn_if_svf_constant(losses, self.config)

    @torch.no_grad()
    def warp_to_atlas(self, dataset: Dataset, batch_size: int = 100):
        """Forward pass without augmentation warping every case of `dataset` (items as in
        `set_training_data`) to atlas space, `batch_size` cases per pass (Eq. 16): returns the means
        of z_i o Phi_i for labelmaps (1, C, *S) and images (1, 1, *S). Where the items carry
        field-of-view masks, each atlas voxel averages the cases whose scan covers it (Phi maps it
        inside the scan); a voxel no scan covers keeps the current atlas. With several processes each
        warps its share of the cases (:func:`atlasreg.distributed.shard`) and the sums are added over
        the ranks, so every rank gets the same means."""
        sum_lab = torch.zeros_like(self.atlas_labelmap)
        sum_img = torch.zeros_like(self.atlas_image)
        count = torch.zeros_like(self.atlas_image)
        masked = False
        n = 0
        for batch in self.case_loader(shard(dataset), batch_size):
            img = batch[0].to(self.device)
            lab = batch[1].to(self.device)
            # Only Phi is needed here (z_i o Phi_i): its inverse is never asked for, so never computed.
            _, tr = self.net(img, self.atlas_labelmap, self.atlas_image, self.use_affine())
            if len(batch) > 3:
                mask = batch[3].to(self.device)
                warped = warp(torch.cat([lab * mask, img * mask, mask], 1), tr.forward_points(), tr.grid,
                              padding="zeros").sum(0, keepdim=True)
                count += warped[:, -1:]
                masked = True
                warped = warped[:, :-1]
            else:
                warped = warp(torch.cat([lab, img], 1), tr.forward_points(), tr.grid).sum(0, keepdim=True)
            sum_lab += warped[:, :-1]
            sum_img += warped[:, -1:]
            n += img.shape[0]
        flags = torch.tensor([float(n), float(masked)], dtype=torch.float64, device=sum_lab.device)
        all_reduce_sum([sum_lab, sum_img, count, flags])
        n = int(flags[0])
        if not flags[1]:
            return sum_lab / n, sum_img / n
        covered = count > 1e-3
        safe = count.clamp_min(1e-3)
        return (torch.where(covered, sum_lab / safe, self.atlas_labelmap),
                torch.where(covered, sum_img / safe, self.atlas_image))

    def update_atlas(self) -> None:
        """Eqs. 15-16 at the end of an epoch. Called by the AtlasUpdate callback, which Lightning runs
        before ModelCheckpoint, so every checkpoint holds the updated atlas."""
        if not self.atlas_is_learnt():
            self.atlas_update_seconds = 0.0
            return
        t0 = time.perf_counter()
        eta = float(self.config["training"]["atlas_eta"])
        was_training = self.net.training
        self.net.eval()
        mean_lab, mean_img = self.warp_to_atlas(self.train_data, int(self.config["training"]["atlas_batch_size"]))
        self.net.train(was_training)
        self.atlas_labelmap.copy_(atlas_update(self.atlas_labelmap, mean_lab, eta))
        self.atlas_image.copy_(atlas_update(self.atlas_image, mean_img, eta))
        self.atlas_update_seconds = time.perf_counter() - t0
        self.log("time/atlas_s", self.atlas_update_seconds)

    def configure_optimizers(self):
        t = self.config["training"]
        opt = adam(self.net.parameters(), float(t["lr"]))
        gamma = 0.5 ** (1.0 / float(t["lr_halving_epochs"]))
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


@register("unet", "U-Net")
class UNetModule(AtlasISTNModule):
    """The paper's U-Net baseline: the ITN alone, trained with L_s only (Sec. 3.2). Its STN stays at
    its initialisation; with ``training.fixed_atlas`` it is refined from scratch towards the ITN
    output at test time (the paper's 'Independent'). Without a fixed atlas it registers nothing."""

    def atlas_is_learnt(self) -> bool:
        return False

    def registers(self) -> bool:
        return self.fixed_atlas() is not None

    def training_step(self, batch, batch_idx):
        image, labelmap, mask = self._batch(batch)
        loss = self.segmentation_loss(self.net.itn(image), labelmap, mask)
        self._accumulate({"loss/total": loss, "loss/seg": loss}, image.shape[0])
        return loss

    @classmethod
    def report_label(cls, info: dict) -> str:
        return str(info["label"]) if info.get("label") else "U-Net"

    @classmethod
    def report_column(cls, info: dict, output: str) -> str | None:
        """'U-Net', 'U-Net_lcc', and with a fixed atlas 'Independent' (the atlas registered to the
        U-Net output by refinement) and 'U-Net Id' (the undeformed atlas); after info['label'] when
        given. None for the 1-pass (:meth:`report_hidden`)."""
        names = {"itn": "U-Net", "itn_lcc": "U-Net_lcc", "refine": "Independent", "atlas": "U-Net Id"}
        if info.get("label"):
            names = {k: f"{info['label']} {v}" for k, v in names.items()}
        return names.get(output)

    @classmethod
    def report_hidden(cls, info: dict, output: str) -> str | None:
        if output == "onepass":
            return "the U-Net's STN is untrained: its 1-pass is the undeformed atlas"
        return None


@register("vml", "VML")
class VMLModule(AtlasISTNModule):
    """The paper's VoxelMorph-like baseline (Sec. 3.2): no ITN; the STN registers the image to the atlas
    image and is trained with the label losses L_a2s, L_s2a and L_reg; the atlas is built as usual.
    Test time: 1-pass only (no ITN output to refine towards)."""

    with_itn = False
    stn_on_images = True

    @classmethod
    def report_label(cls, info: dict) -> str:
        return str(info["label"]) if info.get("label") else "VML"

    @classmethod
    def report_column(cls, info: dict, output: str) -> str | None:
        """'VML' for the 1-pass registration and 'VML Id' for the undeformed atlas (the label instead of
        'VML' when given)."""
        return {"onepass": cls.report_label(info), "atlas": f"{cls.report_label(info)} Id"}.get(output)

    @classmethod
    def report_hidden(cls, info: dict, output: str) -> str | None:
        return None
