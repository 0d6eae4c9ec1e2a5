"""Segmentation over several processes (issue 16 item 3): ``atlasreg segment --devices N`` on one
machine, and runs started by torchrun or SLURM.

A segmentation run splits into parts (``--num-parts P --part-id I``, :func:`atlasreg.segment.part_batches`)
that write one folder together and need no communication: refinement optimises each batch of cases on
its own. So several processes are several parts. ``--devices N`` starts N parts of this machine's
share as child processes of the command (each with 1/N of the CPU threads, or its own GPU), shows
one progress bar over them and ends with the worst exit status; under torchrun or SLURM (several
tasks) every process takes the part of its rank. No process group, no Lightning predict loop: it
would add start-up and a collective to a job that has none, and the parts already give what the
engine would (sharding, a writer per process, resume).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

#: Options of `segment` that the launcher sets for each child (removed from the parent's arguments).
_CHILD_OPTIONS = {"--devices": 1, "--num-parts": 1, "--part-id": 1, "--device": 1, "--quiet": 0, "--overwrite": 0}


def launcher_part() -> tuple[int, int] | None:
    """(part id, number of parts) that an external launcher gave this process when it started several
    at once: torchrun's ``RANK`` / ``WORLD_SIZE``, or SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS`` (more
    than one task). None otherwise (one plain process, or a SLURM array job of single tasks)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and int(os.environ.get(world, "1") or 1) > 1:
            return int(os.environ[rank]), int(os.environ[world])
    return None


def child_arguments(argv: Sequence[str]) -> list[str]:
    """`argv` (of ``atlasreg segment ...``) without the options the launcher sets per child."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _CHILD_OPTIONS:
            skip = _CHILD_OPTIONS[name] if "=" not in arg else 0
            continue
        out.append(arg)
    return out


def _child_device(device: str, index: int) -> str:
    """The --device of child `index`: its own GPU (round robin) when `device` is auto/cuda and CUDA is
    available, else `device`."""
    text = (device or "auto").strip().lower()
    if text in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{index % torch.cuda.device_count()}"
    return device


def _recorded(manifests: Sequence[Path]) -> int:
    """Cases recorded so far in the case manifests (their lines less the header; for the progress bar,
    read every half second, so the rows are counted, not parsed)."""
    total = 0
    for m in manifests:
        try:
            total += max(0, m.read_bytes().count(b"\n") - 1)
        except OSError:  # not written yet
            continue
    return total


def _rows(manifests: Sequence[Path]) -> dict[str, int]:
    """Rows per status of the case manifests that exist."""
    from .contracts import read_segment_manifest

    counts: dict[str, int] = {}
    for m in manifests:
        try:
            rows = read_segment_manifest(m) if m.is_file() else []
        except Exception:  # noqa: BLE001 - a manifest being appended to is read again at the next poll
            continue
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def run_local_parts(argv: Sequence[str], out: str | Path, devices: int, num_parts: int = 1, part_id: int = 0,
                    device: str = "auto", progress: bool = True) -> int:
    """Run part `part_id` of `num_parts` of a segmentation as `devices` child processes of
    ``atlasreg segment`` (parts ``part_id * devices + j`` of ``num_parts * devices``), at once; `argv`:
    the command's arguments after ``segment`` (the per-child options are replaced). CPU threads: each
    child gets ``OMP_NUM_THREADS`` = CPU count / devices unless the variable is set. The children's
    error lines go to stderr as they come; a bar on stderr counts the cases they have recorded (done,
    skipped, failed) in their case manifests. Returns the worst exit status (2 before 1 before 0); on
    KeyboardInterrupt the children are terminated (a rerun resumes). Prints the cases written, skipped
    and failed, as a single `segment` does."""
    from tqdm import tqdm

    from .contracts import segment_manifest_path, segment_part_info_path

    parts = num_parts * devices
    ids = [part_id * devices + j for j in range(devices)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    base = [sys.executable, "-m", "atlasreg", "segment", *child_arguments(argv)]
    overwrite = any(a == "--overwrite" for a in argv)

    def start(j: int) -> subprocess.Popen:
        cmd = [*base, "--num-parts", str(parts), "--part-id", str(ids[j]), "--quiet",
               "--device", _child_device(device, j), *(["--overwrite"] if overwrite and j == 0 else [])]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)

    manifests = [segment_manifest_path(out, i, parts) for i in ids]
    bar = tqdm(desc=f"segmenting ({devices} processes)", unit="case", disable=not progress, file=sys.stderr)
    procs: list[subprocess.Popen] = []
    try:
        # The first child claims the folder (and alone applies --overwrite, which deletes the results of
        # another run) before the others start, so no child deletes what another has written.
        began = time.time()
        procs.append(start(0))
        claimed = segment_part_info_path(out, ids[0], parts)
        while procs[0].poll() is None and not (claimed.is_file() and claimed.stat().st_mtime >= began - 1):
            time.sleep(0.1)
        procs += [start(j) for j in range(1, devices)]
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            bar.n = _recorded(manifests)
            bar.refresh()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    finally:
        bar.close()
    codes = [p.wait() for p in procs]
    counts = _rows(manifests)
    skipped = f", {counts['skipped']} skipped (complete already)" if counts.get("skipped") else ""
    print(f"{counts.get('done', 0)} case(s) written to {out}{skipped}")
    if counts.get("failed"):
        print(f"atlasreg: error: {counts['failed']} of {sum(counts.values())} cases failed, see "
              + ", ".join(str(m) for m in manifests), file=sys.stderr)
    if any(c not in (0, 1) for c in codes):
        return 2
    return 1 if any(codes) else 0
