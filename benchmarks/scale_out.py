"""Throughput and peak memory of training and batch segmentation with 1 and 2 processes (issue 16
item 4; run by hand, prints figures, asserts nothing).

    python benchmarks/scale_out.py train --data /tmp/scale_out --cases 1000 --epochs 3 --global-batch 20
    python benchmarks/scale_out.py segment --data /tmp/scale_out --cases 1000

Letter-B cases (paper Sec. 3.1, 128 x 128, the model of configs/letter_b.yaml) are generated once into
--data: B1..B<cases> for training and as many test cases after them. Every run is a subprocess of the
command line, and the configurations alternate (A B A B, `--repeats` rounds) so that slow drifts of
the machine hit both alike; medians over the rounds are printed with the ratio 2 processes / 1.

- train: one process with `training.threads` = the cores and batch G, against `--devices 2` (two gloo
  processes, Lightning's DDP) with threads = cores / 2 each and batch G / 2 (the same global batch).
  Seconds per epoch (training + atlas update, from the summary lines; the first epoch is left out) and
  training cases per second.
- segment: the model trained by the 1-process training run of `train` (run that first), segmenting
  the test cases with refinement (the config's 50 iterations): one process against two processes
  that each take half of the cases (`--num-parts 2 --part-id i`, started at once, OMP_NUM_THREADS =
  cores / 2 each). Wall seconds from the start to the last process's end (start-up included) and cases per
  second.

Peak memory: the largest resident set (VmHWM of /proc) of each process of the run (Lightning's second
rank and DataLoader workers included), polled every 0.2 s while the run lasts.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ memory
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory(threading.Thread):
    """Polls the process trees under `roots` and keeps each process's peak resident set (MiB)."""

    def __init__(self, roots: list[int]):
        super().__init__(daemon=True)
        self.roots, self.peaks, self.names = roots, {}, {}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            todo = list(self.roots)
            while todo:
                pid = todo.pop()
                peak = _peak_kib(pid)
                if peak is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), peak / 1024)
                    if pid not in self.names:
                        try:
                            self.names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80]
                        except OSError:
                            pass
                todo += _children(pid)
            time.sleep(0.2)


def run_processes(commands: list[list[str]], env: dict) -> tuple[float, list[subprocess.CompletedProcess], dict]:
    """Start the commands at once; wall seconds until the last ends, their outputs, peak MiB per pid."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    monitor = PeakMemory([p.pid for p in procs])
    monitor.start()
    outputs = []
    for p, c in zip(procs, commands):
        out, err = p.communicate()
        outputs.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    seconds = time.perf_counter() - t0
    monitor.stopped.set()
    monitor.join()
    for o in outputs:
        if o.returncode != 0:
            sys.exit(f"failed: {' '.join(o.args)}\n{o.stderr[-3000:]}")
    return seconds, outputs, monitor.peaks


# ------------------------------------------------------------------------------------------ data
def prepare(data: Path, cases: int) -> tuple[Path, Path]:
    from atlasreg.data.letter_b import write_letter_b_dataset

    train, test = data / "train", data / "test"
    for folder, start in ((train, 1), (test, cases + 1)):
        if len(list(folder.glob("*_img.png"))) < cases:
            t0 = time.perf_counter()
            write_letter_b_dataset(folder, cases, seed=start, start_index=start)
            print(f"generated {cases} cases in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return train, test


def _atlasreg(*args) -> list[str]:
    return [sys.executable, "-m", "atlasreg", *map(str, args)]


# ------------------------------------------------------------------------------------------ train
EPOCH = re.compile(r"^epoch\s+(\d+) .* train ([\d.]+)s\s+atlas ([\d.]+)s")


def train_run(data: Path, train: Path, processes: int, args, env: dict, out: Path) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // processes)
    batch = args.global_batch // processes
    cmd = _atlasreg("train", ROOT / "configs" / "letter_b.yaml", "--out", out, "--quiet", "--force-new",
                    "--epochs", args.epochs, "--devices", processes,
                    "--set", f"data.train={{images: {train}, image_suffix: _img, label_suffix: _seg}}",
                    "--set", f"training.batch_size={batch}", "--set", f"training.threads={threads}",
                    "--set", "data.cache=false")
    seconds, (result,), peaks = run_processes([cmd], env)
    epochs = [tuple(map(float, m.groups()[1:])) for m in map(EPOCH.match, result.stdout.splitlines())
              if m and int(m.group(1)) > 0]
    per_epoch = statistics.median(t + a for t, a in epochs)
    return {"epoch_s": per_epoch, "cases_per_s": args.cases / per_epoch, "wall_s": seconds,
            "peak_mib": sorted(peaks.values(), reverse=True)}


def segment_run(test: Path, checkpoint: Path, processes: int, env: dict, out: Path,
                iterations: int | None = None) -> dict:
    cores = os.cpu_count() or 1
    threads = str(max(1, cores // processes))
    commands = []
    for part in range(processes):
        cmd = _atlasreg("segment", test, "--image-suffix", "_img", "--checkpoint", checkpoint, "--out", out,
                        "--quiet", *(["--iterations", str(iterations)] if iterations is not None else []))
        if processes > 1:
            cmd += ["--num-parts", str(processes), "--part-id", str(part)]
        commands.append([c for c in cmd if c])
    if out.exists():  # a folder of the same run would be resumed (every case skipped)
        import shutil

        shutil.rmtree(out)
    seconds, _, peaks = run_processes(commands, {**env, "OMP_NUM_THREADS": threads})
    cases = len(list(test.glob("*_img.png")))
    return {"wall_s": seconds, "cases_per_s": cases / seconds, "peak_mib": sorted(peaks.values(), reverse=True)}


def _show(name: str, runs: dict[int, list[dict]], key: str) -> None:
    med = {k: statistics.median(r[key] for r in v) for k, v in runs.items()}
    peaks = {k: max(max(r["peak_mib"][:k]) for r in v) for k, v in runs.items()}
    print(f"\n{name}: median over {len(runs[1])} rounds")
    print(f"| processes | {key} | cases/s | peak MiB per process |\n|---|---|---|---|")
    for k in sorted(runs):
        print(f"| {k} | {med[k]:.1f} | {statistics.median(r['cases_per_s'] for r in runs[k]):.1f} | {peaks[k]:.0f} |")
    print(f"ratio {key} 2 / 1 processes: {med[2] / med[1]:.2f} (rounds: "
          + ", ".join(f"{a[key]:.1f}/{b[key]:.1f}" for a, b in zip(runs[1], runs[2])) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train", "segment"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/scale_out"))
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", default="1,2", help="the configurations to run, e.g. 1 for one only")
    parser.add_argument("--iterations", type=int, help="segment: refinement iterations (default: the config's 50)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    train, test = prepare(args.data, args.cases)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for round_ in range(args.repeats):
        for processes in (int(p) for p in args.processes.split(",")):
            if args.what == "train":
                r = train_run(args.data, train, processes, args, env, args.data / f"model_{processes}")
            else:
                r = segment_run(test, args.data / "model_1" / "model.ckpt", processes, env,
                                args.data / f"segment_{processes}", args.iterations)
            runs[processes].append(r)
            print(f"round {round_} processes {processes}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()), flush=True)
    if runs[1] and runs[2]:
        _show(args.what, runs, "epoch_s" if args.what == "train" else "wall_s")


if __name__ == "__main__":
    main()
