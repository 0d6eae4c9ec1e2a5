"""Several processes, one result: the few pieces atlasreg needs to train under Lightning's DDP
(``atlasreg train --devices N --num-nodes M``; issue 16).

Lightning runs the processes (its own launcher, torchrun or SLURM), wraps the networks in
DistributedDataParallel (gradients averaged over ranks) and writes checkpoints on rank 0. What it
cannot know is atlasreg's own state outside the gradients: the atlas (Eqs. 15-16) is a mean over ALL
training cases, the epoch means of the losses are means over all cases, and the run folder must be
prepared once. This module gives the rank and world size (also before Lightning has made the process
group, from the launchers' environment variables), a seeded sampler that gives every rank its part of
the same global batches, sharding of a data set for the atlas pass, and sums over ranks. Everything
here is the identity for one process, so the single-process path is the same code.
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, Subset


def is_distributed() -> bool:
    """True inside a process group of more than one process (Lightning's DDP, torchrun, SLURM)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process: from the process group when it exists, else (0, 1)."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_as_rank_zero() -> bool:
    """Whether the launcher made this process global rank 0, readable BEFORE the process group exists
    (when `atlasreg train` decides whether to prepare the run folder): torchrun's ``RANK``, SLURM's
    ``SLURM_PROCID`` when SLURM started several tasks, else Lightning's own launcher, which starts the
    ranks > 0 with ``LOCAL_RANK`` (and, on other nodes, ``NODE_RANK``) set. True for a plain process."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


def external_launcher_environment():
    """Lightning's cluster environment when an external launcher started several processes at once
    (torchrun: TorchElasticEnvironment; SLURM with several tasks: SLURMEnvironment), else None
    (one process, or Lightning's own launcher, which starts ranks > 0 itself)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return SLURMEnvironment()
    return None


def init_external_process_group(cuda: bool) -> bool:
    """Make the process group now when an external launcher (torchrun, SLURM) started all ranks at
    once, so that rank 0 can prepare the run folder while the others wait (:func:`barrier`); Lightning
    then uses this group (it makes none when one exists). Backend: gloo for CPU tensors, and NCCL for
    CUDA tensors when `cuda`. Returns True when a group was made (or already existed)."""
    if dist.is_available() and dist.is_initialized():
        return True
    env = external_launcher_environment()
    if env is None:
        return False
    os.environ.setdefault("MASTER_ADDR", env.main_address)
    os.environ.setdefault("MASTER_PORT", str(env.main_port))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=env.global_rank(),
                            world_size=env.world_size())
    return True


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (no-op for one process). The tensors must have the
    same shapes on every rank, and every rank must call this the same number of times."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_objects(value) -> list:
    """`value` of every rank, in rank order ([value] for one process); picklable values."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shard(dataset: Dataset) -> Dataset:
    """This rank's cases of `dataset` (cases rank, rank + world, ...; no case twice, none left out),
    for passes whose results are summed over ranks (:func:`all_reduce_sum`). The whole data set for
    one process."""
    rank, world = rank_and_world()
    if world == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world))


class EpochShuffleSampler(Sampler[int]):
    """Shuffled case order per epoch, seeded, the same on every rank: the order of epoch e is
    ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e`` (Lightning calls `set_epoch`
    before each epoch, so a resumed run draws the same order). With W ranks the order is padded (by its
    first cases) to a multiple of W and rank r takes its positions r, r + W, ...; with a per-rank
    batch size b, global batch k is then positions k*W*b ... (k+1)*W*b - 1 of the order: the cases of
    global batch k of one process with batch size W*b. The rank and world size are read when the
    sampler is iterated, after Lightning has made the process group.

    Independent of the global random generator, so the order does not depend on what else draws from
    it (augmentation, validation, workers). `skip`: cases of this rank's order to leave out the next
    time it is iterated (once; a run resumed in the middle of an epoch sets it to the cases its
    checkpoint's steps had already trained, e.g. DeepATLAS, whose checkpoints come every few steps)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        rank, world = rank_and_world()
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / world) * world
        order += order[: total - self.n]
        return order[rank::world]

    def __iter__(self) -> Iterator[int]:
        order, self.skip = self._indices()[self.skip:], 0
        return iter(order)

    def __len__(self) -> int:
        return math.ceil(self.n / rank_and_world()[1])
