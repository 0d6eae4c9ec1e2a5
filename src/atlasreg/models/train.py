"""Training entry point: Lightning Trainer with TensorBoard logging (losses per step and epoch, learning
rate, a validation pass and images: :mod:`atlasreg.models.monitor`), a progress bar and one summary
line per epoch, atomic checkpoints holding weights, optimiser, atlas, config and random states, and an
exact resume from the last checkpoint (only with the same config)."""

from __future__ import annotations

import gc
import os
import random
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from ..atlas import save_atlas
from ..config import DEFAULTS, ConfigError, differences, validate
from ..contracts import EPOCH_CHECKPOINT, LOG_DIR, read_run_config, run_paths
from ..data.case_dataset import CaseDataset
from ..data.cases import pairs_from_spec
from ..data.io import atomic_file, write_text
from ..errors import AtlasregError
from .atlas_istn import AtlasISTNModule
from ..devices import lightning_accelerator, resolve_device
from ..distributed import (EpochShuffleSampler, all_gather_objects, barrier, init_external_process_group,
                           launched_as_rank_zero, rank_and_world)
from .monitor import LossProgressBar, StepLosses, ValidationMonitor, console_line, quiet_lightning
from .registry import build_method, get_method, load_model

#: Environment variable naming a case-cache folder shared by runs (default: the run folder's cache folder).
CACHE_ENV = "ATLASREG_CACHE"

#: Config keys that may change when a run is resumed: they change its speed, its length or what it
#: shows, not the numbers of the epochs it trains (the learning-rate and fade-in schedules do not
#: depend on training.epochs; workers give the same batches, see `train`; the validation pass and
#: the images change no training number, see :mod:`atlasreg.models.monitor`).
RESUMABLE_KEYS = ("training.epochs", "training.threads", "data.num_workers", "training.validation_every",
                  "training.refine_validation_every", "training.refine_validation_cases",
                  "training.images_every", "training.validation_cases")

#: Key of the random states in a checkpoint (:class:`RandomStates`).
RNG_KEY = "atlasreg_random_states"

#: TensorBoard run of a training folder: one, continued by every resume (the events a killed run wrote
#: after its last checkpoint are purged).
LOG_VERSION = 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, then renames it into place, so an
    interruption never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)


_LOG_COLUMNS = (("loss", "loss/total", ".4f"), ("seg", "loss/seg", ".4f"), ("a2s", "loss/a2s", ".4f"),
                ("s2a", "loss/s2a", ".4f"), ("reg", "loss/reg", ".2e"), ("w", "w", ".3f"))


class EpochTimer(Callback):
    """Logs seconds per epoch of training (the atlas update is timed by the module itself); keeps
    (train_s, atlas_s) per epoch in `self.times`, and if `verbose` prints one summary line per epoch
    on stdout (above the progress bar, :func:`~atlasreg.models.monitor.console_line`): the epoch, the
    epoch means of the losses the method has, the seconds of training and of the atlas update, and
    what other callbacks add through an ``epoch_summary(trainer) -> str | None`` method (the
    validation figures of :class:`~atlasreg.models.monitor.ValidationMonitor`), e.g.
    ``epoch    4  loss 0.0429  seg 0.0133  a2s 0.0551  s2a 0.0453  reg 5.01e-02  w 0.277  train 16.5s
    atlas 2.6s  val 1.2s dice itn 0.912 1-pass 0.874``."""

    def __init__(self, verbose: bool = False):
        self.times: list[tuple[float, float]] = []
        self.verbose = verbose

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._t1 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log("time/train_s", self._t1 - self._t0)
        self.times.append((self._t1 - self._t0, pl_module.atlas_update_seconds))
        if self.verbose and trainer.is_global_zero:
            # Lightning runs this before the module's own on_train_epoch_end, which logs the epoch
            # means, so they are read from the module.
            m = pl_module.epoch_losses()
            # Only the losses this method has (the U-Net has no a2s/s2a/reg, VML no seg).
            parts = [f"{name} {m[key]:{fmt}}" for name, key, fmt in _LOG_COLUMNS if key in m]
            extra = [summary(trainer) for summary in
                     (getattr(c, "epoch_summary", None) for c in getattr(trainer, "callbacks", []) or [])
                     if summary is not None]
            console_line(f"epoch {trainer.current_epoch:4d}  " + "  ".join(parts) + f"  train {self.times[-1][0]:.1f}s"
                         f"  atlas {self.times[-1][1]:.1f}s" + "".join(f"  {e}" for e in extra if e))


def random_states(module=None) -> dict:
    """The states of every random generator training draws from: Python's, NumPy's global, torch's CPU
    (and CUDA) generators and, when `module` has a spatial augmentation, MONAI's own RandomState of it
    (:func:`atlasreg.data.augmentation.make_spatial_augmentation`). Plain types and tensors only, so a
    checkpoint holding them loads with ``weights_only=True``."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": _plain_numpy_state(np.random.get_state())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    augment = getattr(module, "_augment", None)
    if augment is not None and hasattr(augment, "random_states"):
        states["augmentation"] = [_plain_numpy_state(r.get_state()) for r in augment.random_states]
    return states


def _plain_numpy_state(state: tuple) -> list:
    kind, keys, pos, has_gauss, gauss = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]


def set_random_states(states: Mapping, module=None) -> None:
    """Restore what :func:`random_states` returned (the CUDA states only where CUDA is available; the
    augmentation's only when `module` has one)."""
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in states["python"]))
    np.random.set_state(_numpy_state(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    _set_augmentation_states(module, states.get("augmentation"))


def _set_augmentation_states(module, states) -> None:
    augment = getattr(module, "_augment", None)
    if states is not None and augment is not None and hasattr(augment, "random_states"):
        for generator, state in zip(augment.random_states, states):
            generator.set_state(_numpy_state(state))


def _numpy_state(value) -> tuple:
    kind, keys, pos, has_gauss, gauss = value
    return kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)


class RandomStates(Callback):
    """Stores the random states (:func:`random_states`) in every checkpoint and restores them when a
    run resumes. Checkpoints are written at the end of an epoch, after the atlas update, so the resumed
    run continues from the states the uninterrupted run has at the start of the next epoch: on the same
    machine and thread count, the same numbers (tests/test_train.py kills a run with SIGKILL and
    compares). The global states are restored as soon as the checkpoint is read: on resume Lightning
    creates the first epoch's DataLoader iterator, which draws its base seed from torch's generator,
    before the training-start hooks. The augmentation's state is restored at the start of training,
    after the module has built its augmentation (`on_fit_start`)."""

    def __init__(self):
        self._augmentation = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # every rank's states (Lightning builds the checkpoint on every rank and writes rank 0's)
        ranks = all_gather_objects(random_states(pl_module))
        checkpoint[RNG_KEY] = ranks[0] if len(ranks) == 1 else {**ranks[0], "ranks": ranks}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        states = checkpoint.get(RNG_KEY)
        if states is not None and "ranks" in states:
            # a run of several processes: each rank continues its own generators (resumed with another
            # number of processes, the ranks it did not have start from rank 0's)
            rank = rank_and_world()[0]
            states = states["ranks"][rank] if rank < len(states["ranks"]) else states["ranks"][0]
        if states is not None:
            set_random_states({k: v for k, v in states.items() if k != "augmentation"})
            self._augmentation = states.get("augmentation")

    def on_train_start(self, trainer, pl_module):
        _set_augmentation_states(pl_module, self._augmentation)
        self._augmentation = None


def _new_default(difference: str, config: Mapping) -> bool:
    """Whether a :func:`~atlasreg.config.differences` entry is a setting the stored config lacks (an
    older atlasreg wrote it) and `config` holds at its default: the same run, so it resumes."""
    key, _, change = difference.partition(": ")
    if not change.startswith("<unset> -> "):
        return False
    node, default = config, DEFAULTS
    for part in key.split("."):
        if not isinstance(node, Mapping) or not isinstance(default, Mapping) or part not in default:
            return False
        node, default = node.get(part), default[part]
    return node == default


def _check_resumable(stored: Mapping, config: Mapping, folder: Path) -> None:
    """AtlasregError naming the run's config file and the differing keys unless `config` may resume
    the run whose config is `stored` (equal up to :data:`RESUMABLE_KEYS`)."""
    plain = yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=False))  # tuples -> lists, as stored
    changed = [d for d in differences(stored, plain) if d.split(":")[0] not in RESUMABLE_KEYS
               and not _new_default(d, plain)]
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise AtlasregError(f"holds a run trained with another config ({shown}): give the same config to "
                            f"resume it, or --force-new to start a new run there (its checkpoints, atlas "
                            f"and logs are deleted), or another --out", run_paths(folder).config)


def _clear_run(paths) -> None:
    """Delete what a training run wrote in its folder except the case cache (keyed by preprocessing)."""
    for folder in (paths.checkpoints, paths.atlas, paths.atlas_initial, paths.logs):
        shutil.rmtree(folder, ignore_errors=True)
    for file in (paths.final_checkpoint, paths.config):
        file.unlink(missing_ok=True)


def _resume_step(last: Path) -> int | None:
    """The global step of the checkpoint a run resumes from (None when unreadable)."""
    try:
        return int(torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))
    except Exception:  # an unreadable checkpoint is reported by Lightning when it loads it
        return None


class AtlasUpdate(Callback):
    """Atlas update at every epoch end (Eqs. 15-16). As a callback it runs before ModelCheckpoint
    (Lightning orders checkpoint callbacks last), so checkpoints and resumed runs see the new atlas.
    With `initial_dir`, the atlas at the start of training (Eq. 15, t = 0) is saved there once
    (paper Fig. 9 compares it with the final atlas)."""

    def __init__(self, initial_dir: Path | None = None):
        self.initial_dir = initial_dir

    def on_train_start(self, trainer, pl_module):
        if self.initial_dir is not None and trainer.is_global_zero and not self.initial_dir.exists():
            save_atlas(pl_module.atlas_labelmap, pl_module.atlas_image,
                       list(pl_module.config["data"]["labels"].keys()), pl_module.net.grid, self.initial_dir)

    def on_train_epoch_end(self, trainer, pl_module):
        # first of all epoch-end hooks: the epoch means of the losses over every rank's cases, for the
        # summary line, the progress bar and the logger (no-op for one process)
        if hasattr(pl_module, "reduce_epoch_losses"):
            pl_module.reduce_epoch_losses()
        pl_module.update_atlas()


def training_dataset(config: dict, out_dir: Path, labelled: bool = True) -> CaseDataset:
    """The cases of `config['data']['train']`, read on demand (`labelled` False: the images only, for
    self-supervised training, :meth:`CaseDataset.from_config`). With `data.cache` (default true) their
    model-grid tensors are cached in the folder named by the environment variable ATLASREG_CACHE, else
    in the cache folder of the run folder `out_dir` (:func:`atlasreg.contracts.run_paths`; a cached read
    takes 0.1 ms, reading and resampling a Letter-B case 6 ms)."""
    cache_dir = None
    if config["data"].get("cache", True):
        cache_dir = Path(os.environ.get(CACHE_ENV) or run_paths(out_dir).cache)
    return CaseDataset.from_config(config, "train", cache_dir, labelled=labelled)


def validation_dataset(config: dict, training: CaseDataset) -> CaseDataset | None:
    """The cases of `config['data']['validation']` (None without that split), read on demand with the
    preprocessing of `training` (the dataset of :func:`training_dataset`: its orientation reference
    is a training case) and its case cache; for :class:`~atlasreg.models.monitor.ValidationMonitor`."""
    spec = config["data"].get("validation")
    if not spec:
        return None
    cache = training.cache_dir.parent if training.cache_dir is not None else None
    return CaseDataset(pairs_from_spec(spec), training.preprocessing, cache)


def train(config: dict, out_dir: str | Path, resume: bool = True, progress: bool = True,
          timer: EpochTimer | None = None, callbacks: list[Callback] | None = None,
          device: str = "auto", devices: int = 1, num_nodes: int = 1) -> Path:
    """Train the config's method (Atlas-ISTN by default) on `config['data']['train']` (a method with a
    training run of its own, :attr:`~atlasreg.models.registry.Method.training_run`, runs that instead:
    DeepATLAS's :func:`atlasreg.deepatlas.method.pretrain`, in one process); writes the
    training run folder out_dir (:mod:`atlasreg.contracts`, :func:`~atlasreg.contracts.run_paths`):
    the config, the last checkpoint (every epoch), the final checkpoint, the atlas folder (atlas
    labelmap, probabilities and image with their grid), the same at the start of training, TensorBoard
    logs and the case cache (preprocessed cases, see `training_dataset`).
    The cases are read on demand (`data.num_workers` DataLoader workers); the order of the cases is
    drawn per epoch from `training.seed` and the epoch (:class:`~atlasreg.distributed.EpochShuffleSampler`),
    so a seed gives the same batches whatever the workers and processes.
    Resumes from the last checkpoint if present and `resume`, exactly: the checkpoint holds the random
    states (:class:`RandomStates`), and TensorBoard continues in the same log. A folder holding a run
    with another config (other than :data:`RESUMABLE_KEYS`) is refused with an AtlasregError naming
    the differing keys; with `resume` False that run's checkpoints, atlas folders, logs and config are
    deleted first (the case cache is kept) and a new run starts. device: 'auto' (CUDA when
    available), 'cpu', 'cuda' or 'cuda:<i>' (:func:`atlasreg.devices.resolve_device`; AtlasregError
    for a device this machine lacks). Returns the final checkpoint path.
    devices, num_nodes: processes per machine (one per GPU, or CPU processes with the gloo backend)
    and machines; more than one process in all trains with Lightning's DDP (:mod:`atlasreg.distributed`):
    `training.batch_size` is per process (the global batch is devices * num_nodes times it), every
    rank takes its part of the same seeded global batches (:class:`~atlasreg.distributed.EpochShuffleSampler`),
    gradients are averaged, the atlas (Eqs. 15-16) and the epoch means of the losses are sums over
    all ranks' cases, and rank 0 alone prepares the run folder and writes checkpoints, atlases, logs and
    the summary lines. Started from a plain process, Lightning starts the other processes of this
    machine itself (it runs the same command line again, so call this from a script or the command
    line, not from an interactive session); under torchrun or SLURM every process runs this function
    and rank 0 prepares the folder while the others wait.
    The console (progress=True): a progress bar on stderr with the running losses
    (:class:`~atlasreg.models.monitor.LossProgressBar`) and one summary line per epoch on stdout
    (:class:`EpochTimer`); progress=False: the summary lines only. Lightning's banners and tips and
    the library warnings of :data:`~atlasreg.models.monitor.UNACTIONABLE_WARNINGS` are held back.
    TensorBoard: the losses per step and per epoch, the learning rate (``lr-Adam``), and, with a
    ``data.validation`` split, the validation pass and images of
    :class:`~atlasreg.models.monitor.ValidationMonitor` (``training.validation_every``,
    ``refine_validation_every``, ``refine_validation_cases``, ``images_every``, ``validation_cases``),
    which change no training number.
    The config is validated (`config.validate`) and every training and validation case not yet in
    the cache is read (:meth:`CaseDataset.check`) before anything is written into out_dir, so bad
    input leaves no output behind: AtlasregError naming the file of a bad case."""
    config = validate(config)
    own = get_method(config["model"]["method"]).training_run
    if own is not None:  # a method with a training run of its own (DeepATLAS: staged, counted in steps)
        if int(devices) * int(num_nodes) > 1:
            raise AtlasregError(f"model.method {config['model']['method']} trains in one process (--devices 1, "
                                "--num-nodes 1)")
        return own(config, out_dir, resume=resume, progress=progress, device=device, callbacks=callbacks)
    accelerator, device_ids = lightning_accelerator(resolve_device(device))
    devices, num_nodes = int(devices), int(num_nodes)
    if devices < 1 or num_nodes < 1:
        raise AtlasregError(f"devices and num_nodes must be >= 1, got {devices} and {num_nodes}")
    distributed = devices * num_nodes > 1
    if distributed:
        if isinstance(device_ids, list) and device.strip().lower().startswith("cuda:"):
            raise AtlasregError(f"--device {device} names one GPU; with --devices {devices} use --device cuda")
        device_ids = devices
        # torchrun / SLURM start every rank at once: the group is made now, so that the others wait
        # below while rank 0 prepares the folder (Lightning's own launcher starts them after that)
        init_external_process_group(cuda=accelerator == "gpu")
    prepare = launched_as_rank_zero()
    if config["data"]["train"] is None:
        raise ConfigError("data.train", "missing: training needs a data split {images | csv, labels, ...}")
    out_dir = Path(out_dir)
    paths = run_paths(out_dir)
    t = config["training"]
    workers = int(config["data"]["num_workers"])  # validated: an integer >= 0
    if t.get("threads"):
        torch.set_num_threads(int(t["threads"]))
    L.seed_everything(int(t["seed"]), workers=True, verbose=False)
    dataset = training_dataset(config, out_dir)
    if len(dataset) == 0:
        raise AtlasregError("the training set is empty")
    validation = validation_dataset(config, dataset)
    created = not out_dir.exists()
    has_run = paths.last_checkpoint.is_file() or paths.final_checkpoint.is_file()
    if resume and has_run:
        _check_resumable(read_run_config(out_dir), config, out_dir)
    # every case not cached yet is read once before anything is written (Lightning would meet a bad case
    # only inside fit, after its banners, with the run folder begun); rank 0 only: it fills the cache
    if prepare:
        dataset.check()
        if validation is not None:
            validation.check()
    if prepare and not (resume and has_run) and not created:
        # a new run: nothing of an older one (or of a run that died before its first checkpoint)
        # may survive into it, e.g. its initial atlas or its logs
        _clear_run(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if prepare:
            write_text(paths.config, yaml.safe_dump(config, sort_keys=False))
        barrier()  # torchrun / SLURM: the other ranks wait for the prepared folder

        module = build_method(config)
        module.set_training_data(dataset)
        # The order of the cases is seeded per epoch (EpochShuffleSampler: the same global batches for
        # any number of processes, and for a resumed run). Not persistent_workers: a new iterator every
        # epoch draws the workers' base seed from the global RNG, as with num_workers=0, so every
        # number is the same for any number of workers.
        loader = DataLoader(dataset, batch_size=int(t["batch_size"]), sampler=EpochShuffleSampler(len(dataset), int(t["seed"])),
                            drop_last=False, num_workers=workers)
        last = paths.last_checkpoint
        # save_top_k=1 without a monitor keeps the newest epoch; Lightning writes the last checkpoint only
        # when it has saved a top-k checkpoint in that epoch (save_top_k=0 would leave nothing to resume
        # from). It names it CHECKPOINT_NAME_LAST + FILE_EXTENSION, the contract's LAST_CHECKPOINT (tested).
        checkpoint = ModelCheckpoint(dirpath=paths.checkpoints, filename=EPOCH_CHECKPOINT,
                                     auto_insert_metric_name=False, save_last=True, save_top_k=1, every_n_epochs=1)
        ckpt_path = str(last) if (resume and last.is_file()) else None
        # one TensorBoard log per run folder; on resume, the events of steps after the checkpoint
        # (written by the run that was killed) are purged so that no step appears twice
        step = _resume_step(last) if ckpt_path else None
        logger = TensorBoardLogger(out_dir, name=LOG_DIR, version=LOG_VERSION, default_hp_metric=False,
                                   **({"purge_step": step} if step is not None else {}))
        # Callbacks run in this order at an epoch's end: the atlas update, then the validation pass on
        # the updated atlas (what the epoch's checkpoint holds), then the summary line that shows it;
        # Lightning runs ModelCheckpoint last.
        monitors = [AtlasUpdate(paths.atlas_initial), ValidationMonitor(validation, t, progress=progress),
                    RandomStates(), timer or EpochTimer(verbose=True), StepLosses(),
                    LearningRateMonitor(logging_interval="epoch")]
        with quiet_lightning():
            # log_every_n_steps=1: StepLosses writes every step's losses (Lightning itself logs nothing
            # per step here)
            trainer = L.Trainer(
                max_epochs=int(t["epochs"]), accelerator=accelerator, devices=device_ids, num_nodes=num_nodes,
                strategy=_ddp_strategy() if distributed else "auto", use_distributed_sampler=False, logger=logger,
                callbacks=[*monitors, *(callbacks or []), checkpoint, *([LossProgressBar()] if progress else [])],
                plugins=[AtomicCheckpointIO()], enable_progress_bar=progress, enable_model_summary=False,
                log_every_n_steps=1, num_sanity_val_steps=0, deterministic=False,
                precision=t.get("precision", "32-true"))
            if ckpt_path and prepare:
                console_line(f"resuming from {ckpt_path}")
            trainer.fit(module, loader, ckpt_path=ckpt_path)

            final = paths.final_checkpoint
            trainer.save_checkpoint(final, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            save_atlas(module.atlas_labelmap, module.atlas_image, list(config["data"]["labels"].keys()),
                       module.net.grid, paths.atlas)
        # Lightning leaves the module reachable from every callback (callback.log is module.log), and the
        # module reaches the trainer, its data loader and the training data. A caller that keeps a
        # callback (e.g. an EpochTimer) and segments next in the same process held them through its peak
        # (Letter-B, when the training set was one tensor: 704 instead of 654 MiB,
        # benchmarks/letter_b_speed.py), so release them here.
        module.set_training_data(None)
        module.trainer = None
        del trainer, module, loader, dataset, validation, monitors
        gc.collect()
        return final
    except AtlasregError:
        # bad input found after the folder was made (a training case is checked when first read):
        # a folder this call made and that holds no checkpoint yet is removed, as if never begun
        if prepare and created and not paths.last_checkpoint.is_file():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _ddp_strategy():
    """Lightning's DDP for several processes. find_unused_parameters: before
    `training.affine_start_epoch` the affine branch of the STN takes no part in the loss."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=True)


def load_module(checkpoint: str | Path, map_location="cpu") -> AtlasISTNModule:
    """Load a trained method (weights, atlas and its arguments) from a checkpoint, whatever its method
    (:func:`atlasreg.models.registry.load_model`); AtlasregError naming the file if unusable."""
    return load_model(checkpoint, map_location)
