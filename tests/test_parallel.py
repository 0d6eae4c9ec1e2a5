"""Tests of atlasreg.parallel: the parts of a segmentation run over processes (the end-to-end run of
`segment --devices 2` is in tests/test_cli.py, beside the other segmentation-run tests)."""

import pytest

from atlasreg.parallel import child_arguments, launcher_part


@pytest.mark.parametrize("env, part", [
    ({}, None), ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)), ({"RANK": "0", "WORLD_SIZE": "1"}, None),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3)), ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
])
def test_launcher_part_reads_torchrun_and_slurm(monkeypatch, env, part):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launcher_part() == part


def test_child_arguments_drop_what_the_launcher_sets():
    argv = ["in/", "--out", "o", "--devices", "2", "--num-parts=3", "--part-id", "1", "--device", "cuda",
            "--quiet", "--overwrite", "--iterations", "5"]
    assert child_arguments(argv) == ["in/", "--out", "o", "--iterations", "5"]
