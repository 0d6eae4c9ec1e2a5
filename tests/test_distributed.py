"""Tests of atlasreg.distributed and of training under Lightning's DDP (issue 16 items 1 and 5): two
gloo processes on the CPU against one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import atlasreg
from atlasreg import distributed
from atlasreg.distributed import EpochShuffleSampler, launched_as_rank_zero, shard


def _as_rank(monkeypatch, rank, world):
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, world))


def test_sampler_gives_the_global_batches_of_one_process(monkeypatch):
    """With W ranks and per-rank batch b, global batch k holds the cases of batch k of one process
    with batch W*b, for every epoch; the order changes with the epoch and is the same for a new
    sampler (a resumed run)."""
    n, b, world = 11, 2, 2
    one = EpochShuffleSampler(n, seed=5)
    for epoch in (0, 3):
        one.set_epoch(epoch)
        _as_rank(monkeypatch, 0, 1)
        order = list(one)
        assert sorted(order) == list(range(n)) and len(one) == n
        parts = []
        for rank in range(world):
            _as_rank(monkeypatch, rank, world)
            sampler = EpochShuffleSampler(n, seed=5)
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
            assert len(sampler) == 6  # ceil(11 / 2): the order is padded with its first case
        padded = order + order[:1]
        for k in range(3):
            global_batch = sorted(parts[0][k * b:(k + 1) * b] + parts[1][k * b:(k + 1) * b])
            assert global_batch == sorted(padded[k * world * b:(k + 1) * world * b])
    _as_rank(monkeypatch, 0, 1)
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first


def test_shard_splits_the_cases_without_overlap(monkeypatch):
    data = list(range(7))
    _as_rank(monkeypatch, 0, 1)
    assert shard(data) is data
    seen = []
    for rank in range(3):
        _as_rank(monkeypatch, rank, 3)
        seen += list(shard(data))
    assert sorted(seen) == data


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"LOCAL_RANK": "1"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
    ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "1"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, False), ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, True),
])
def test_launched_as_rank_zero_reads_each_launcher(monkeypatch, env, zero):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_as_rank_zero() is zero


# ------------------------------------------------------------------------------ two gloo processes
#: Written as sitecustomize.py into a folder on PYTHONPATH, so every process of a run (Lightning starts
#: rank 1 as a new Python process) appends "<LOCAL_RANK> <destination>" to $WRITES_LOG for every file
#: or folder it moves into place; every atlasreg write ends in os.replace (atlasreg.data.io).
_RECORD_WRITES = """
import os
_replace = os.replace
def _recording_replace(src, dst, *a, **k):
    out = _replace(src, dst, *a, **k)
    with open(os.environ["WRITES_LOG"], "a") as log:
        log.write(f"{os.environ.get('LOCAL_RANK', '0')} {os.fspath(dst)}\\n")
    return out
os.replace = _recording_replace
"""


def _write_config(path: Path, train: Path, batch_size: int, epochs: int, augment: bool) -> Path:
    import yaml

    cfg = {"data": {"train": {"images": str(train), "image_suffix": "_img", "label_suffix": "_seg"},
                    "labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0], "cache": False},
           "model": {"size": [16, 16], "itn_channels": [4, 4, 4, 4], "stn_channels": [4, 4, 4]},
           "training": {"epochs": epochs, "batch_size": batch_size, "atlas_batch_size": 3, "threads": 1,
                        "fade_in": {"e0": 1, "tau": 1} if augment else None, "affine_start_epoch": 1,
                        "augmentation": {"enabled": augment}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path, config: Path, out: Path, devices: int, *extra) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_RECORD_WRITES)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{Path(atlasreg.__file__).parents[1]}",
           "WRITES_LOG": str(out) + ".writes"}
    cmd = [sys.executable, "-m", "atlasreg", "train", str(config), "--out", str(out), "--quiet",
           "--devices", str(devices), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "model.ckpt", weights_only=False, map_location="cpu")


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    """Issue 16 item 5. Two gloo processes with batch 2 each against one process with batch 4 (8
    cases, 1 epoch, no augmentation): the same atlas (max difference 1e-6 in probability; measured
    2.4e-7 on the image, Adam and the all-reduce add in another order), weights within 1e-4 (measured
    1e-5 after two epochs), the same epoch means of the losses (4 digits). Every checkpoint, atlas
    and config file is written once, by rank 0 (rank 1 writes nothing), with no temporary file left,
    and the summary lines are printed once. torchrun gives the same numbers as Lightning's launcher.
    Then resume under DDP: the two-process run continued to
    epoch 2 ends bit for bit as an uninterrupted two-process run of 2 epochs, augmentation on (each
    rank's random generators are in the checkpoint)."""
    from atlasreg.data.letter_b import write_letter_b_dataset

    write_letter_b_dataset(tmp_path / "train", 8, seed=0, size=32)
    one = _train(tmp_path, _write_config(tmp_path / "one.yaml", tmp_path / "train", 4, 1, False), tmp_path / "one", 1)
    two = _train(tmp_path, _write_config(tmp_path / "two.yaml", tmp_path / "train", 2, 1, False), tmp_path / "two", 2)
    a, b = _checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "two")
    for key in ("atlas_labelmap", "atlas_image"):
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6), key
    assert a["state_dict"]["atlas_labelmap"].std() > 0
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), rtol=0, atol=1e-4), key
    losses = [[line.split("  train ")[0] for line in run.stdout.splitlines() if line.startswith("epoch")]
              for run in (one, two)]
    assert len(losses[1]) == 1 and losses[0] == losses[1]  # printed once, the same 4-digit means
    assert two.stdout.count("model: ") == 1
    assert len(b["atlasreg_random_states"]["ranks"]) == 2

    writes = [line.split(" ", 1) for line in (tmp_path / "two.writes").read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}  # rank 1 moved nothing into place
    destinations = [Path(dst) for _, dst in writes]
    out = tmp_path / "two"
    for path in (out / "config.yaml", out / "model.ckpt", out / "checkpoints" / "last.ckpt", out / "atlas",
                 out / "atlas_initial"):
        assert destinations.count(path) == 1, path
    assert not [p for p in out.rglob("*") if "tmp" in p.name.lower() or p.name.startswith(".")]

    # torchrun starts both ranks at once (the process group is made before rank 0 prepares the folder):
    # the same numbers, bit for bit
    env = {**os.environ, "PYTHONPATH": str(Path(atlasreg.__file__).parents[1])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "atlasreg", "train", str(tmp_path / "two.yaml"), "--out", str(tmp_path / "torchrun"), "--quiet",
                    "--devices", "2"], env=env, capture_output=True, text=True, timeout=600, check=True)
    c = _checkpoint(tmp_path / "torchrun")
    assert all(torch.equal(value, c["state_dict"][key]) for key, value in b["state_dict"].items())

    # resume under DDP, augmentation and fade-in on
    config = _write_config(tmp_path / "aug.yaml", tmp_path / "train", 2, 2, True)
    _train(tmp_path, config, tmp_path / "whole", 2)
    _train(tmp_path, config, tmp_path / "resumed", 2, "--epochs", "1")
    resumed = _train(tmp_path, config, tmp_path / "resumed", 2)
    assert "resuming from" in resumed.stdout
    whole, again = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "resumed")
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    ranks = whole["atlasreg_random_states"]["ranks"]
    # each rank augments with its own generator (seeded with training.seed + rank)
    assert not torch.equal(ranks[0]["augmentation"][0][1], ranks[1]["augmentation"][0][1])
