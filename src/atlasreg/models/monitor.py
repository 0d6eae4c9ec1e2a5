"""What training shows, on the console and in TensorBoard (Lightning callbacks used by
:func:`atlasreg.models.train.train`).

Console: :class:`LossProgressBar` (Lightning's tqdm bar, on stderr, with the running epoch means of
the losses and the epoch's elapsed time); the one summary line per epoch is
:class:`~atlasreg.models.train.EpochTimer`'s, to which :class:`ValidationMonitor` adds its figures;
:func:`quiet_lightning` holds back Lightning's banners, tips and the library warnings a user cannot act
on (:data:`UNACTIONABLE_WARNINGS`).

TensorBoard (Lightning's TensorBoardLogger): :class:`StepLosses` writes the losses of every step,
Lightning's LearningRateMonitor the learning rate (``lr-Adam``), and :class:`ValidationMonitor` the
validation pass: Dice and HD95 of the ITN, 1-pass and refined segmentations of ``data.validation`` on
the model grid (``val/dice_itn``, ``val/hd95_onepass``, ...), and images of the atlas and of a few
validation cases with the outlines of their segmentations.

None of this changes a training number: the validation pass runs without gradients on the trained
weights (refinement works on copies of the STN), the network in eval mode, its data read by a loader
with a generator of its own, and every random state of :func:`~atlasreg.models.train.random_states`
restored afterwards (tests/test_monitor.py trains with and without it and compares the weights, atlas,
losses and random states bit for bit).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from typing import Iterator, Sequence

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from ..evaluation.metrics import batch_dice_hd95
from ..spatial.transforms import warp

#: Library warnings that an atlasreg user cannot act on, held back during training, as (message
#: regular expression, category, why). Everything else is shown, once, in one line (`atlasreg.cli`).
UNACTIONABLE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "Lightning's own use of a torch API that torch 2.13 deprecates (lightning/pytorch/utilities/_pytree.py)"),
    (r"GPU available but not used", UserWarning,
     "asked for by --device cpu (auto uses the GPU); it suggests a Trainer argument the user does not set"),
    (r".*does not have many workers which may be a bottleneck", UserWarning,
     "suggests DataLoader arguments; the user's setting is data.num_workers, 0 by default for exact "
     "numbers with low memory"),
    (r"It is recommended to use `self.log\('.*', \.\.\., sync_dist=True\)`", UserWarning,
     "DDP: the epoch means of the losses are already sums over all ranks (reduce_epoch_losses) and the "
     "times are rank 0's own; Lightning cannot know that"),
)

#: Python loggers of Lightning whose INFO messages (device banners, the LitLogger tip, checkpoint
#: notes, '`Trainer.fit` stopped') :func:`quiet_lightning` holds back.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning's loggers (:data:`LIGHTNING_LOGGERS`) show warnings and errors
    only, and the warnings of :data:`UNACTIONABLE_WARNINGS` are ignored; both are restored on exit."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            for pattern, category, _why in UNACTIONABLE_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=category)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ------------------------------------------------------------------------------------------ console
#: The losses of the progress bar: (name shown, key of `epoch_losses()`, format).
BAR_COLUMNS = (("loss", "loss/total", ".4f"), ("seg", "loss/seg", ".4f"), ("reg", "loss/reg", ".2e"))


class LossProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar on stderr (stdout keeps the summary lines and the final paths),
    showing per epoch the batches done, the elapsed and remaining time and the running means over
    the epoch's cases of the losses of :data:`BAR_COLUMNS` that the method has (the U-Net has no
    reg), e.g. ``Epoch 3:  45%|####5     | 41/90 [00:05<00:06, 8.10it/s, loss=0.0123, seg=0.0051,
    reg=1.20e-03]``. The module provides the means (``epoch_losses()``); the bar reads them, so it
    logs nothing and costs no step time beyond tqdm's drawing."""

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        means = pl_module.epoch_losses() if hasattr(pl_module, "epoch_losses") else {}
        return {name: format(means[key], fmt) for name, key, fmt in BAR_COLUMNS if key in means}


def console_line(text: str) -> None:
    """Print one line on stdout above any tqdm bar (tqdm.write redraws the bars below it), flushed at
    once, so that a pipe reading the output sees each epoch's line when it is printed."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ TensorBoard
class StepLosses(Callback):
    """The losses of every ``trainer.log_every_n_steps``-th training step to the logger, as
    ``loss_step/<name>`` (``total``, ``seg``, ``a2s``, ``s2a``, ``reg``: those the method has), at the
    step's index (the first step is 0, the convention of Lightning's per-step values; the epoch means
    ``loss/<name>`` are at the index of the epoch's last step). The module keeps the step's values
    (``step_losses``), so this writes a few scalars per step straight to the logger instead of
    Lightning's ``self.log``, whose bookkeeping costs about 0.5 ms per value and step on a CPU."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        values = getattr(pl_module, "step_losses", None)
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        step = trainer.global_step - 1
        if not values or trainer.logger is None or step % every:
            return
        trainer.logger.log_metrics({"loss_step/" + key.split("/", 1)[1]: float(value)
                                    for key, value in values.items() if key.startswith("loss/")}, step=step)


def due(every: int, epoch: int, epochs: int) -> bool:
    """Whether something done every `every` epochs (0: never) is due at the end of 0-based `epoch` of
    `epochs`: after epochs every, 2 every, ... and after the last epoch."""
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


#: Names of the outputs in the summary line.
SHOWN_NAMES = {"itn": "itn", "onepass": "1-pass", "refine": "refine"}


class ValidationMonitor(Callback):
    """The validation pass and the TensorBoard images, at the end of a training epoch, after the atlas
    update (so they show the model that epoch's checkpoint holds).

    dataset: the validation cases on the model grid (a
    :class:`~atlasreg.data.case_dataset.CaseDataset` of ``data.validation`` with the training
    preprocessing; items (image (1, *S), soft one-hot labelmap (C, *S), index, field-of-view mask
    (1, *S))), or None. settings: the config's ``training`` section:

    - every ``validation_every`` epochs and after the last one: the ITN (argmax of its probabilities)
      and 1-pass (the atlas labelmap warped by Phi^-1, argmax) segmentations of every validation case,
      ``atlas_batch_size`` cases per forward pass, compared with the case's labelmap on the model grid
      (argmax of the resampled one-hot) by :func:`~atlasreg.evaluation.metrics.batch_dice_hd95`
      (MONAI): scalars ``val/dice_<output>`` (mean over cases and foreground structures) and
      ``val/hd95_<output>`` (mm, mean over the structures present in both), output ``itn``,
      ``onepass``; ``time/validation_s`` (seconds of the pass);
    - every ``refine_validation_every`` epochs and after the last one (methods that refine): also
      ``refine`` (Eqs. 17-21 with the config's ``refinement`` settings, ``cases_at_once`` at a time) on
      the first ``refine_validation_cases`` validation cases;
    - every ``images_every`` epochs and after the last one: images ``atlas_image`` (grey) and
      ``atlas_labelmap`` (a colour per structure) and, for the first ``validation_cases`` validation
      cases, ``validation/<case>``: the image with the outlines of its labelmap, ITN and 1-pass
      segmentations, left to right (3D: rows of the middle slices across z, y and x).

    The figures of a pass are added to the epoch's summary line (:meth:`epoch_summary`), e.g.
    ``val 1.2s dice itn 0.912 1-pass 0.874``. progress: a tqdm bar for the pass (stderr).
    Costs: see docs/results.md ('Validation during training')."""

    def __init__(self, dataset: Dataset | None, settings: dict, progress: bool = False):
        self.dataset = dataset if dataset is not None and len(dataset) else None
        self.every = int(settings.get("validation_every", 5))
        self.refine_every = int(settings.get("refine_validation_every", 25))
        self.refine_cases = int(settings.get("refine_validation_cases", 8))
        self.images_every = int(settings.get("images_every", 10))
        self.image_cases = int(settings.get("validation_cases", 4))
        self.batch_size = int(settings.get("atlas_batch_size", 25))
        self.progress = progress
        #: (epoch, {tag: value}, seconds) of the latest pass, or None.
        self.latest: tuple[int, dict[str, float], float] | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:  # DDP: rank 0 validates and logs (the others go on training)
            return
        epoch, epochs = trainer.current_epoch, int(trainer.max_epochs or 0)
        validate = self.dataset is not None and due(self.every, epoch, epochs)
        refine = validate and due(self.refine_every, epoch, epochs) and getattr(pl_module, "refines", bool)()
        images = due(self.images_every, epoch, epochs)
        if not (validate or images):
            return
        from .train import random_states, set_random_states

        t0 = time.perf_counter()
        states = random_states(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            metrics = self.evaluate(pl_module, refine) if validate else {}
            pictures = self.images(pl_module) if images else {}
        finally:
            pl_module.train(was_training)
            set_random_states(states, pl_module)
        seconds = time.perf_counter() - t0
        if validate:
            self.latest = (epoch, metrics, seconds)
            pl_module.log_dict({**metrics, "time/validation_s": seconds})
        experiment = getattr(trainer.logger, "experiment", None)
        if pictures and hasattr(experiment, "add_image"):
            for tag, picture in pictures.items():
                experiment.add_image(tag, picture, trainer.global_step - 1, dataformats="CHW")

    def epoch_summary(self, trainer) -> str | None:
        """The validation figures of this epoch for the summary line, or None without a pass."""
        if self.latest is None or self.latest[0] != trainer.current_epoch:
            return None
        _, metrics, seconds = self.latest
        dice = [f"{SHOWN_NAMES[name]} {metrics[f'val/dice_{name}']:.3f}" for name in SHOWN_NAMES
                if f"val/dice_{name}" in metrics]
        return f"val {seconds:.1f}s dice " + " ".join(dice)

    # ------------------------------------------------------------------ the pass
    def _bar(self, loader, desc: str):
        return tqdm(loader, desc=desc, leave=False, disable=not self.progress, file=sys.stderr)

    def evaluate(self, module, refine: bool) -> dict[str, float]:
        """The validation scalars {tag: value} (see the class docstring) of `module` now."""
        num_classes = len(module.labels)
        spacing = module.config["model"]["spacing"]
        scores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for batch in self._bar(module.case_loader(self.dataset, self.batch_size), "validation"):
            image = batch[0].to(module.device)
            reference = batch[1].argmax(1)
            for name, labels in segmentations(module, image).items():
                scores.setdefault(name, []).append(batch_dice_hd95(labels.cpu(), reference, num_classes, spacing))
        if refine:
            cases = Subset(self.dataset, range(min(self.refine_cases, len(self.dataset))))
            at_once = int(module.config["refinement"].get("cases_at_once", 16))
            for batch in self._bar(module.case_loader(cases, at_once), "validation: refine"):
                image = batch[0].to(module.device)
                predicted = module.predict(image)
                if len(batch) > 3:
                    predicted["mask"] = batch[3].to(module.device)
                refined = module.refine(image, predicted)
                labels = warped_atlas(module, refined["transform"]).argmax(1)
                scores.setdefault("refine", []).append(
                    batch_dice_hd95(labels.cpu(), batch[1].argmax(1), num_classes, spacing))
        out = {}
        for name, parts in scores.items():
            dice = torch.cat([d for d, _ in parts])
            hd95 = torch.cat([h for _, h in parts])
            out[f"val/dice_{name}"] = float(dice.mean())
            if bool(torch.isfinite(hd95).any()):  # NaN where a structure is missing on one side
                out[f"val/hd95_{name}"] = float(hd95[torch.isfinite(hd95)].mean())
        return out

    def images(self, module) -> dict[str, torch.Tensor]:
        """The TensorBoard images {tag: (3, H, W) float in [0, 1]} of `module` now."""
        colours = label_colours(len(module.labels))
        out = {}
        if hasattr(module, "atlas_image") and hasattr(module, "atlas_labelmap"):
            atlas_image = module.atlas_image[0, 0].detach().cpu()
            atlas_labels = module.atlas_labelmap[0].detach().cpu().argmax(0)
            out["atlas_image"] = mosaic([[grey_rgb(enlarge(p))] for p in planes(atlas_image)])
            out["atlas_labelmap"] = mosaic([[colours[enlarge(p)].permute(2, 0, 1)] for p in planes(atlas_labels)])
        if self.dataset is None or self.image_cases == 0:
            return out
        cases = Subset(self.dataset, range(min(self.image_cases, len(self.dataset))))
        names = getattr(self.dataset, "names", None)
        for batch in module.case_loader(cases, self.image_cases):
            image = batch[0].to(module.device)
            shown = {"reference": batch[1].argmax(1), **{k: v.cpu() for k, v in segmentations(module, image).items()}}
            for j, index in enumerate(batch[2].tolist()):
                name = names[index] if names else str(index)
                columns = [[outlined(enlarge(p), enlarge(q), colours)
                            for p, q in zip(planes(batch[0][j, 0]), planes(labels[j]))] for labels in shown.values()]
                out[f"validation/{name}"] = mosaic([list(row) for row in zip(*columns)])
        return out


def segmentations(module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class-index segmentations (N, *S) of preprocessed images (N, 1, *S) by `module` (a
    :class:`~atlasreg.models.registry.Method`): ``itn`` (argmax of the ITN probabilities) where it has
    an ITN, ``onepass`` (the atlas labelmap warped by Phi^-1, argmax) where it registers."""
    predicted = module.predict(image)
    out = {}
    if "itn" in predicted:
        out["itn"] = predicted["itn"].argmax(1)
    if "onepass" in predicted.get("transforms", {}):
        out["onepass"] = warped_atlas(module, predicted["transforms"]["onepass"]).argmax(1)
    return out


def warped_atlas(module, transform) -> torch.Tensor:
    """The atlas labelmap (1, C, *S) in each case's space, atlas o Phi^-1 (as in the loss L_a2s, Eq. 11):
    (N, C, *S), without gradients."""
    with torch.no_grad():
        points = transform.inverse_points()
        atlas = module.atlas_labelmap.expand(points.shape[0], *module.atlas_labelmap.shape[1:])
        return warp(atlas, points, transform.grid)


# ------------------------------------------------------------------------------------------ images
def label_colours(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) RGB in [0, 1]: black for the background (class 0), then matplotlib's Set1
    (saturated, visible on grey: up to 8 structures) or tab20 colours, repeated beyond 20 structures."""
    from matplotlib import colormaps

    table = colormaps["Set1"].colors[:8] if num_classes <= 9 else colormaps["tab20"].colors
    rows = [(0.0, 0.0, 0.0)] + [tuple(table[i % len(table)][:3]) for i in range(num_classes - 1)]
    return torch.tensor(rows, dtype=torch.float32)


def enlarge(array: torch.Tensor, at_least: int = 256) -> torch.Tensor:
    """A 2-D `array` (H, W) repeated by the integer factor (nearest neighbour) that makes its largest
    side at least `at_least` pixels (1 if it already is), so small model grids show at a readable
    size."""
    factor = max(1, math.ceil(at_least / max(array.shape)))
    for dim in range(array.ndim):
        array = array.repeat_interleave(factor, dim)
    return array


def planes(array: torch.Tensor) -> list[torch.Tensor]:
    """The 2-D views of an array in array order: itself (2-D), or its middle slices across z, y and x
    (3-D, (z, y, x))."""
    if array.ndim == 2:
        return [array]
    z, y, x = (s // 2 for s in array.shape)
    return [array[z], array[:, y], array[:, :, x]]


def grey_rgb(image: torch.Tensor) -> torch.Tensor:
    """A 2-D image (H, W) as (3, H, W) grey in [0, 1], its 1st and 99th percentiles stretched to 0
    and 1 (a constant image is black)."""
    image = image.float()
    lo, hi = torch.quantile(image.flatten(), torch.tensor([0.01, 0.99])).tolist()
    out = ((image - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(image)
    return out.expand(3, *out.shape).clone()


def outlines(labels: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Boolean (H, W): the pixels of a 2-D class-index labelmap that are not background and have a
    pixel of another class at most `width` pixels above, below, left or right of them (the image
    border continues each edge pixel's class): each structure's inner rim, `width` pixels wide."""
    padded = torch.nn.functional.pad(labels[None, None].float(), (width,) * 4, mode="replicate")[0, 0]
    h, w = labels.shape
    centre = padded[width:width + h, width:width + w]
    edge = torch.zeros(h, w, dtype=torch.bool)
    for k in range(1, width + 1):
        for dy, dx in ((-k, 0), (k, 0), (0, -k), (0, k)):
            edge |= padded[width + dy:width + dy + h, width + dx:width + dx + w] != centre
    return edge & (labels > 0)


def outlined(image: torch.Tensor, labels: torch.Tensor, colours: torch.Tensor, width: int = 2) -> torch.Tensor:
    """(3, H, W): the grey image (:func:`grey_rgb`) with the outline (:func:`outlines`, `width`
    pixels) of every structure of `labels` (H, W) drawn in its colour of `colours` (C, 3)."""
    picture = grey_rgb(image)
    edge = outlines(labels, width)
    picture[:, edge] = colours[labels[edge].long()].T
    return picture


def mosaic(rows: Sequence[Sequence[torch.Tensor]], gap: int = 2) -> torch.Tensor:
    """Images (3, h, w) of different sizes laid out in rows and columns, each in a cell of the largest
    height and width, cells `gap` pixels apart (white): (3, H, W)."""
    h = max(p.shape[1] for row in rows for p in row)
    w = max(p.shape[2] for row in rows for p in row)
    columns = max(len(row) for row in rows)
    out = torch.ones(3, len(rows) * (h + gap) - gap, columns * (w + gap) - gap)
    for i, row in enumerate(rows):
        for j, p in enumerate(row):
            out[:, i * (h + gap):i * (h + gap) + p.shape[1], j * (w + gap):j * (w + gap) + p.shape[2]] = p
    return out
