"""Atlas-ISTN (Sinclair et al. 2022): ITN + STN + transformation computation, losses of Eq. 14.

:class:`AtlasISTN` is the stateless network (Eq. 9). :class:`AtlasISTNModule` is the Lightning module
that trains it and owns the atlas (Eqs. 15-16) as buffers, so checkpoints hold weights, optimiser,
atlas and the full config together.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..atlas import atlas_update
from ..data.case_dataset import StreamingSum
from ..errors import AtlasregError
from ..losses import diffusion_regulariser, label_mse
from ..nets.stn import STN
from ..nets.unet import UNet
from ..spatial.transforms import SpatialTransform, compose_transform, warp
from .optim import adam


METHODS = ("atlas_istn", "unet", "vml")


class AtlasISTN(nn.Module):
    """ITN S (U-Net, Eq. 4), STN D (Eq. 5) and C (Eq. 6), without state.

    ndim: 2/3; num_classes: C incl. background; size/spacing: model grid (array order / ITK mm).
    method: 'atlas_istn' (the STN sees the ITN logits and the atlas labelmap), 'unet' (same layout;
    only the ITN is trained, the STN stays at its initialisation for refinement from scratch, the
    paper's 'Independent') or 'vml' (no ITN; the STN sees the image and the atlas image, the paper's
    VoxelMorph-like baseline, Sec. 3.2).
    forward(image (N, 1, *size), atlas_labelmap (1 or N, C, *size), atlas_image (1 or N, 1, *size))
    -> (logits (N, C, *size) or None for 'vml', SpatialTransform).
    Raises ValueError for an unknown method.
    """

    def __init__(self, ndim: int, num_classes: int, size: Sequence[int], spacing: Sequence[float],
                 itn_channels=(8, 16, 32, 64), stn_channels=(16, 16, 32), stn_variant: str = "affine_svf",
                 integration_steps: int = 6, method: str = "atlas_istn"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.ndim, self.num_classes, self.method = ndim, num_classes, method
        self.size, self.spacing = tuple(int(s) for s in size), tuple(float(s) for s in spacing)
        self.steps = integration_steps
        self.itn = UNet(ndim, 1, num_classes, itn_channels) if method != "vml" else None
        stn_in = 2 if method == "vml" else 2 * (num_classes - 1)
        self.stn = STN(ndim, stn_in, self.size, self.spacing, stn_variant, stn_channels)

    @staticmethod
    def label_stn_input(logits: torch.Tensor, atlas_labelmap: torch.Tensor) -> torch.Tensor:
        """Foreground channels of the ITN logits and of the atlas labelmap: (N, 2(C-1), *size)."""
        atlas = atlas_labelmap[:, 1:]
        atlas = atlas.expand(logits.shape[0], *atlas.shape[1:])
        return torch.cat([logits[:, 1:], atlas], dim=1)

    def stn_input(self, image: torch.Tensor, logits: torch.Tensor | None, atlas_labelmap: torch.Tensor,
                  atlas_image: torch.Tensor | None) -> torch.Tensor:
        """The STN's input for this method: label channels (Atlas-ISTN) or (image, atlas image) (VML)."""
        if self.method == "vml":
            if atlas_image is None:
                raise ValueError("the VML method needs the atlas image")
            return torch.cat([image, atlas_image.expand(image.shape[0], *atlas_image.shape[1:])], dim=1)
        return self.label_stn_input(logits, atlas_labelmap)

    def transform(self, stn_input: torch.Tensor, use_affine: bool = True, inverse: bool = True) -> SpatialTransform:
        """STN D and transformation computation C (Eqs. 5-6); inverse=False skips Phi^-1."""
        out = self.stn(stn_input, use_affine=use_affine)
        return compose_transform(out["svf"], out["A"], out["t"], self.size, self.spacing, self.steps,
                                 inverse)

    def forward(self, image: torch.Tensor, atlas_labelmap: torch.Tensor, atlas_image: torch.Tensor | None = None,
                use_affine: bool = True, inverse: bool = True):
        logits = self.itn(image) if self.itn is not None else None
        return logits, self.transform(self.stn_input(image, logits, atlas_labelmap, atlas_image), use_affine,
                                      inverse)


def fade_in_weight(epoch: int, fade_in: dict | None) -> float:
    """w of Eq. 14 by the schedule of Eq. 24: 1 / (1 + exp(-(epoch - e0) / tau)); 1 without fade-in."""
    if not fade_in:
        return 1.0
    return 1.0 / (1.0 + math.exp(-(epoch - fade_in["e0"]) / fade_in["tau"]))


def deformation_losses(transform: SpatialTransform, labelmap: torch.Tensor, atlas_labelmap: torch.Tensor,
                       reduction: str = "mean", with_s2a: bool = True) -> dict:
    """L_a2s (Eq. 11), L_s2a (Eq. 12) and L_reg (Eq. 13) for one-hot/logit `labelmap` (N, C, *S)
    against the atlas labelmap (1, C, *S); foreground channels only. reduction: 'mean' or 'per_case'.

    The regulariser acts on the non-rigid part only (the displacement of phi at SVF resolution)."""
    n = labelmap.shape[0]
    # Only the foreground channels are warped: the losses never look at the background.
    atlas = atlas_labelmap[:, 1:].expand(n, -1, *atlas_labelmap.shape[2:])
    target = labelmap[:, 1:]
    out = {"a2s": label_mse(warp(atlas, transform.inverse_points(), transform.spacing), target, False, reduction)}
    if with_s2a:
        out["s2a"] = label_mse(warp(target, transform.forward_points(), transform.spacing), atlas, False,
                               reduction)
    if transform.u_half is not None:
        out["reg"] = diffusion_regulariser(transform.u_half, transform.spacing_half, reduction)
    else:
        out["reg"] = labelmap.new_zeros(n if reduction == "per_case" else ())
    return out


class AtlasISTNModule(L.LightningModule):
    """Training of Atlas-ISTN with Lightning: loss of Eq. 14 with fade-in (Eq. 24) or delayed affine
    start, atlas initialisation and update at every epoch end (Eqs. 15-16).

    config: the full merged config (stored in the checkpoint as hyper-parameters).
    The atlas (labelmap (1, C, *S), image (1, 1, *S)) lives in buffers, so it is checkpointed.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        m = config["model"]
        labels = list(config["data"]["labels"].keys())
        self.net = AtlasISTN(m["ndim"], len(labels), m["size"], m["spacing"], m["itn_channels"],
                             m["stn_channels"], m["stn_variant"], m["integration_steps"],
                             m.get("method", "atlas_istn"))
        size = tuple(m["size"])
        self.register_buffer("atlas_labelmap", torch.zeros(1, len(labels), *size))
        self.register_buffer("atlas_image", torch.zeros(1, 1, *size))
        self.register_buffer("atlas_ready", torch.zeros((), dtype=torch.bool))
        self.train_data: Dataset | None = None
        self._augment = None
        self.atlas_update_seconds = 0.0
        self._epoch_sums: dict = {}
        self._epoch_count = 0

    # ---------------------------------------------------------------- training data
    def set_training_data(self, dataset: Dataset | None) -> None:
        """The training cases, used for the atlas (Eqs. 15-16): a map-style Dataset whose items begin
        with the unaugmented image (1, *S) and labelmap (C, *S) on the model grid (a
        :class:`~atlasreg.data.case_dataset.CaseDataset`, or a TensorDataset). Its `names` (case names,
        in item order) are needed by `training.fixed_atlas`. None releases it."""
        self.train_data = dataset

    def case_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """The cases of `dataset` in order, `batch_size` at a time, read by `data.num_workers` workers.
        The loader has its own generator, so iterating it leaves the global RNG (which shuffles the
        training batches) untouched."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                          num_workers=int(self.config["data"].get("num_workers", 0)), generator=torch.Generator())

    @property
    def method(self) -> str:
        return self.net.method

    def fixed_atlas(self) -> str | None:
        """Case name of a fixed training-case atlas (the paper's 'Fixed' and 'Independent'), or None."""
        return self.config["training"].get("fixed_atlas")

    def atlas_is_learnt(self) -> bool:
        """True when the atlas is built during training (Eqs. 15-16); False for a fixed atlas or a
        U-Net, whose training never registers anything."""
        return self.fixed_atlas() is None and self.method != "unet"

    def _initial_atlas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 15 at t = 0: the mean of the unaligned training labelmaps (1, C, *S) and images
        (1, 1, *S), streamed over the data set (equal bit for bit to `atlas.atlas_init` on the stacked
        cases, see StreamingSum); or the case named by `training.fixed_atlas`, read alone."""
        name = self.fixed_atlas()
        if name is None:
            n = len(self.train_data)
            sum_lab, sum_img = StreamingSum(n), StreamingSum(n)
            loader = self.case_loader(self.train_data, int(self.config["training"]["atlas_batch_size"]))
            show = self._trainer is not None and self._trainer.progress_bar_callback is not None
            for batch in tqdm(loader, desc="initial atlas", disable=not show, leave=False):
                img, lab = batch[0], batch[1]
                for i in range(img.shape[0]):
                    sum_lab.add(lab[i:i + 1])
                    sum_img.add(img[i:i + 1])
            return sum_lab.total() / n, sum_img.total() / n
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
                                                      self.config["model"]["spacing"])

    # ---------------------------------------------------------------- training
    def use_affine(self) -> bool:
        return self.current_epoch >= int(self.config["training"]["affine_start_epoch"])

    def training_step(self, batch, batch_idx):
        image, labelmap = batch[0], batch[1]  # (N, 1, *S), (N, C, *S); a CaseDataset adds the indices
        if self._augment is not None:
            image, labelmap = self._augment(image, labelmap)
        t = self.config["training"]
        n = image.shape[0]
        if self.method == "unet":  # the ITN alone, trained with L_s only (the paper's U-Net baseline)
            loss = label_mse(self.net.itn(image), labelmap)
            self._accumulate({"loss/total": loss, "loss/seg": loss}, n)
            return loss
        logits, transform = self.net(image, self.atlas_labelmap, self.atlas_image, self.use_affine())
        d = deformation_losses(transform, labelmap, self.atlas_labelmap)
        w = fade_in_weight(self.current_epoch, t["fade_in"])
        loss = w * (d["a2s"] + d["s2a"] + t["lambda"] * d["reg"])
        logs = {"loss/a2s": d["a2s"], "loss/s2a": d["s2a"], "loss/reg": d["reg"]}
        if logits is not None:  # Eq. 14; seg_weight 0 is the paper's Atlas-ISTN without L_s
            l_s = label_mse(logits, labelmap)
            loss = loss + float(t.get("seg_weight", 1.0)) * l_s
            logs["loss/seg"] = l_s
        self._accumulate({"loss/total": loss, **logs, "w": w}, n)
        return loss

    # ---------------------------------------------------------------- epoch means of the losses
    # Lightning's self.log costs about 0.5 ms per value and step on this CPU (3 ms, 5% of a Letter-B
    # step, for our six values), so the module keeps its own batch-size-weighted epoch means and
    # hands them to Lightning's logger once per epoch.
    def _accumulate(self, values: dict, n: int) -> None:
        for k, v in values.items():
            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
            self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + v * n
        self._epoch_count += n

    def epoch_losses(self) -> dict[str, float]:
        """Means over the training cases seen so far in this epoch: 'loss/total', 'loss/seg',
        'loss/a2s', 'loss/s2a', 'loss/reg' and 'w', as far as the method has them."""
        return {k: float(v) / self._epoch_count for k, v in self._epoch_sums.items()}

    def on_train_epoch_start(self) -> None:
        self._epoch_sums, self._epoch_count = {}, 0

    def on_train_epoch_end(self) -> None:
        if self._epoch_count:
            self.log_dict(self.epoch_losses(), on_step=False, on_epoch=True)

    @torch.no_grad()
    def warp_to_atlas(self, dataset: Dataset, batch_size: int = 100):
        """Forward pass without augmentation warping every case of `dataset` (items as in
        `set_training_data`) to atlas space, `batch_size` cases per pass (Eq. 16): returns the means
        of z_i o Phi_i for labelmaps (1, C, *S) and images (1, 1, *S)."""
        sum_lab = torch.zeros_like(self.atlas_labelmap)
        sum_img = torch.zeros_like(self.atlas_image)
        n = 0
        for batch in self.case_loader(dataset, batch_size):
            img = batch[0].to(self.device)
            lab = batch[1].to(self.device)
            # Only Phi is needed here (z_i o Phi_i), so its inverse is not computed.
            _, tr = self.net(img, self.atlas_labelmap, self.atlas_image, self.use_affine(), inverse=False)
            warped = warp(torch.cat([lab, img], 1), tr.forward_points(), tr.spacing).sum(0, keepdim=True)
            sum_lab += warped[:, :-1]
            sum_img += warped[:, -1:]
            n += img.shape[0]
        return sum_lab / n, sum_img / n

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
