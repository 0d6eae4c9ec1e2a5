"""Segmentation of new images with a trained Atlas-ISTN: ITN, 1-pass and refined labelmaps, transforms
and the deformed atlas image, all written on each input's own grid and geometry.

Output contract: one case folder per case ``<out>/<case>/`` (written all or nothing: the labelmaps of
each output, the deformed atlas image, the transforms of the final registration as displacement
fields and ITK composites, the case information and the transform metrics), described with its file
names, units and geometry, readers and writers in :mod:`atlasreg.contracts`. Which files exist
depends on the model's method.

Large folders (issue 16 item 3): the case list is cut into batches of ``cases_at_once`` consecutive
cases (the cases refined together); a run split into P parts (``--num-parts P --part-id I``, each part
a command of its own, on any machine, into one shared folder) computes the batches k with
``k % P == I``. A case's result depends on the batch it is computed in, bit for bit (the ITN's
batched convolutions round differently with the batch, and the refinement starts from its logits), so
batches are a function of the position in the whole case list only: the parts of a run write exactly
the files of one unsplit run, and a rerun computes exactly the batches of the first run. Cases are
read in DataLoader workers (:class:`CaseReader`) ahead of the computation, and the files of a case
folder are written by a background thread while the next case computes. A case that cannot be read or checked
is recorded as failed in the run's case manifest and the others go on (:class:`CasesFailed` at the
end). With a checkpoint (a run with a manifest, :data:`SEGMENT_INFO`), a rerun of the same command
skips the cases whose folder is complete and computes again the batches that hold a missing case,
writing only their missing cases: a run killed at any point and rerun ends with exactly the files of
an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from .contracts import (  # noqa: F401 - the case folder's names, re-exported
    CASE_INFO, COMPLETE, DEFORMED_ATLAS_IMAGE, DONE, FAILED, FORWARD_FIELD, FORWARD_TRANSFORM, IN_PROGRESS,
    INVERSE_FIELD, INVERSE_TRANSFORM, LABELMAP_OUTPUTS, SEGMENT_INFO, SKIPPED, TRANSFORM_OUTPUTS,
    append_segment_manifest, read_case_info, read_segment_info, segment_manifest_path, segment_part_info_path,
    segment_run_status, start_segment_manifest, transform_metrics_csv, write_segment_info, write_segment_part_info,
)
from .config import DEFAULTS, SPLITS, validate_section
from .data.cases import Case, Preprocessing, case_name, load_case
from .data.dataset import CasePair, find_pairs, split_extension
from .data.io import remove_temporaries, write_bytes
from .devices import release_free_memory
from .errors import AtlasregError
from .contracts import labelmap_extension
from .atlas_topology import fitted_atlas
from .export import native_outputs, world_transforms, write_case_outputs, write_outputs  # noqa: F401 - re-exported
from .models.registry import Method
from .outputs import claim_output, file_sha256
from .predict import predict_cases, segment_cases, transform_statistics  # noqa: F401


#: Endings of file names (before the extension, any letter case) that mark labelmaps by convention. A
#: folder holding such files beside others mixes images and labelmaps: :func:`collect_inputs` refuses
#: to guess which are the images.
LABELMAP_NAME_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")


def _stem(pair: CasePair) -> str:
    """The image's file name without its extension (a DICOM series folder: its name)."""
    split = split_extension(pair.image.name)
    return split[0] if split else pair.image.name


def _named_as_label(stem: str, label_suffix: str, image_suffix: str) -> bool:
    """Whether a file found as an image is named as a labelmap (as data.dataset.find_pairs tells the
    two apart in one folder: the longer of two matching suffixes wins)."""
    return stem.endswith(label_suffix) and not (
        image_suffix and stem.endswith(image_suffix) and len(image_suffix) >= len(label_suffix))


def _folder_images(folder: Path, image_suffix: str, label_suffixes: Sequence[str],
                   config_image_suffix: str) -> tuple[list[CasePair], str | None]:
    """The images of one folder: (pairs, note). Files named with one of `label_suffixes` are left
    out, and the note says how many (None when none were). Raises AtlasregError naming the folder when
    it holds files named like labelmaps (:data:`LABELMAP_NAME_SUFFIXES`) beside others."""
    pairs = find_pairs(folder, image_suffix=image_suffix)
    left_out = [p for p in pairs if any(_named_as_label(_stem(p), s, image_suffix) for s in label_suffixes)]
    kept = [p for p in pairs if p not in left_out]
    named = ", ".join(f"*{s}" for s in label_suffixes)
    if not kept:
        raise AtlasregError(f"no images found: all {len(pairs)} image files are named as the labelmaps of the "
                            f"checkpoint's config ({named})", folder)
    note = None
    if left_out:
        hint = (f"; --image-suffix {config_image_suffix} names the cases without it"
                if config_image_suffix and not image_suffix else "")
        note = (f"{folder}: {len(left_out)} file(s) named as the labelmaps of the checkpoint's config ({named}) "
                f"left out, {len(kept)} image(s) taken{hint}")
    labelish = [p for p in kept if _stem(p).lower().endswith(LABELMAP_NAME_SUFFIXES)]
    if labelish and len(labelish) < len(kept):
        others = [_stem(p) for p in kept if p not in labelish]
        tails = {s[s.rfind("_"):] if "_" in s[1:] else None for s in others}
        suffix = tails.pop() if len(tails) == 1 and None not in tails else "<suffix of the images>"
        raise AtlasregError(
            f"mixes images and files named like labelmaps ({len(labelish)} of {len(kept)}, e.g. "
            f"{labelish[0].image.name}); give the images' suffix to take only them, e.g. --image-suffix {suffix}",
            folder)
    return kept, note


def collect_inputs(inputs: Sequence[str | Path], image_suffix: str = "",
                   label_suffixes: Sequence[str] = (), config_image_suffix: str = "") -> list[tuple[str, Path]]:
    """(case name, image file) for a list of files and/or folders. In folders, every image file whose
    name ends with `image_suffix` before the extension (e.g. '_img'); the suffix is dropped from the
    case name. Files named with one of `label_suffixes` (the label suffixes of the model's config,
    e.g. '_seg') are left out of folders, with one warning per folder saying how many (naming
    `config_image_suffix`, the config's image suffix, when `image_suffix` is not given); files given
    by name are always taken.

    Raises AtlasregError for a missing path, no images, colliding case names, or a folder holding
    files named like labelmaps (:data:`LABELMAP_NAME_SUFFIXES`, e.g. B1_seg.png) beside others (e.g.
    B1_img.png): the error suggests an image suffix."""
    found: list[tuple[str, Path]] = []
    notes: list[str] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            pairs, note = _folder_images(item, image_suffix, label_suffixes, config_image_suffix)
            found.extend((p.name, p.image) for p in pairs)
            notes += [note] if note else []
        elif item.exists():
            name = case_name(item)
            if image_suffix and name.endswith(image_suffix):
                name = name[: -len(image_suffix)]
            found.append((name, item))
        else:
            raise AtlasregError("file not found", item)
    if not found:
        raise AtlasregError("no input images given")
    names = [n for n, _ in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AtlasregError(f"several inputs share the case name(s) {dup[:5]}; outputs would collide")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return found


def default_workers() -> int:
    """DataLoader worker processes that read cases by default: 1 on a machine of up to 4 CPUs, else 2.
    One worker hides the reading whenever a case reads faster than it computes (reading and resampling
    a Letter-B PNG is about 2% of a refined case on CPU), and takes one process's CPU time from the
    computation only while it reads; a second one keeps up where reading is the slower part (large
    compressed 3D volumes, a GPU, no refinement) and has CPUs to itself. (32 Letter-B cases, K = 10, on
    a busy 2-CPU machine: 10-14 s with 0, 1 or 2 workers and before this reader, within the noise.)
    Each worker holds at most about one batch of read cases."""
    return 1 if (os.cpu_count() or 1) <= 4 else 2


def check_part(num_parts: int, part_id: int) -> None:
    """AtlasregError (one line) unless num_parts >= 1 and 0 <= part_id < num_parts (integers)."""
    if not isinstance(num_parts, int) or isinstance(num_parts, bool) or num_parts < 1:
        raise AtlasregError(f"--num-parts {num_parts!r}: expected an integer >= 1")
    if not isinstance(part_id, int) or isinstance(part_id, bool) or not 0 <= part_id < num_parts:
        raise AtlasregError(f"--part-id {part_id!r}: expected an integer with 0 <= part id < --num-parts "
                            f"({num_parts})")


def part_batches(n: int, cases_at_once: int, num_parts: int = 1, part_id: int = 0) -> list[range]:
    """The batches of part `part_id` of `num_parts` of a run over `n` cases: positions in the case list,
    cut into consecutive batches of `cases_at_once` (the last may be shorter), batch k going to part
    ``k % num_parts`` (with cases_at_once = 1: the cases i with ``i % num_parts == part_id``, as
    nnU-Net). The parts partition the cases, and each batch is the batch one unsplit run computes.
    AtlasregError for a bad part (:func:`check_part`)."""
    check_part(num_parts, part_id)
    size = max(1, int(cases_at_once))
    return [range(s, min(s + size, n)) for k, s in enumerate(range(0, n, size)) if k % num_parts == part_id]


#: ITK's bundled HDF5 library is not thread-safe, and ITK probes HDF5 for any image it reads (its HDF5
#: image reader): an image read in this process (``num_workers=0``) while the writer thread writes an
#: .h5 transform failed with "H5Dcreate2 failed" (32 Letter-B cases, 1 run in 8). Reads in this process
#: and the writer's files take turns; reads in DataLoader workers (other processes) need not.
_ITK_FILES = threading.Lock()


@dataclass
class CaseRead:
    """One input as read by :class:`CaseReader`: the case on the model grid, or the one-line error
    (naming the file) that kept it from being read; the warnings its reading gave (message text,
    category), to be shown by the main process; the seconds it took."""

    position: int
    name: str
    path: Path
    case: Case | None
    error: str | None = None
    warned: list = field(default_factory=list)
    seconds: float = 0.0


class CaseReader(Dataset):
    """The inputs of a segmentation run as a map-style Dataset for DataLoader workers: item i reads and
    checks input i (:func:`atlasreg.data.cases.load_case`) and returns a :class:`CaseRead`. It never
    raises for a bad input: the error becomes the record's `error` (AtlasregError's one-line message;
    any other exception as ``<file>: cannot read (<type>: <text>)``), so one unreadable scan of a
    large folder fails alone."""

    def __init__(self, files: Sequence[tuple[str, Path]], prep: Preprocessing):
        self.files = list(files)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> CaseRead:
        name, path = self.files[position]
        start = time.perf_counter()
        case = error = None
        here = get_worker_info() is None  # in the process that writes (no worker processes)
        with warnings.catch_warnings(record=True) as caught, (_ITK_FILES if here else contextlib.nullcontext()):
            warnings.simplefilter("always")
            try:
                case = load_case(path, None, self.prep, name=name)
            except AtlasregError as e:
                error = str(e) if e.path else f"{path}: {e}"
            except Exception as e:  # noqa: BLE001 - any failure of one file fails that case only
                error = f"{path}: cannot read ({type(e).__name__}: {' '.join(str(e).split())})"
        warned = [(str(w.message), w.category) for w in caught]
        return CaseRead(position, name, Path(path), case, error, warned, time.perf_counter() - start)


def _as_is(item):
    """DataLoader collate function: the record as the Dataset returned it."""
    return item


class SegmentedCases(list):
    """The case folders a segmentation run wrote (a list of Paths, in case order), with `skipped` (case
    names whose folder was complete already), `failures` ((case, input file, one-line message) of the
    inputs that could not be read or checked), `total` (the cases of the run or part) and `manifest`
    (the case manifest, None without one)."""

    def __init__(self):
        super().__init__()
        self.skipped: list[str] = []
        self.failures: list[tuple[str, Path, str]] = []
        self.total = 0
        self.manifest: Path | None = None


class CasesFailed(AtlasregError):
    """Some inputs of a segmentation run could not be read or checked; every other case was written.
    `result`: the :class:`SegmentedCases` of the run (its `failures` name the files and problems).
    The message is one line, ``<k> of <n> cases failed, see <manifest>`` (without a manifest: the first
    failure's message)."""

    def __init__(self, result: SegmentedCases):
        self.result = result
        k, n = len(result.failures), result.total
        where = f", see {result.manifest}" if result.manifest else f" (first: {result.failures[0][2]})"
        super().__init__(f"{k} of {n} cases failed{where}")


class _Writer:
    """A background thread that writes case folders (`write(item)`) in the order given, through a
    queue of at most `size` items (bounded memory: computing stops while the queue is full). The first
    exception of `write` (BaseException: a KeyboardInterrupt too) stops the writing and is raised by
    the next :meth:`put` or :meth:`close`."""

    def __init__(self, write: Callable, size: int):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="atlasreg-segment-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None or self._stop.is_set():
                continue  # drained, not written
            try:
                self._write(item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, item) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, stop the thread; raise the writing's error if there was one."""
        self.put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the case being written (queued cases are dropped) and wait for the thread."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join()


class _Manifest:
    """The run's case manifest (rows appended under a lock: the main thread records failed and skipped
    cases, the writer thread done ones) and the count of rows this run recorded besides the cases it
    skipped. `path` None: no file (a run without a checkpoint)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.recorded = 0
        self._lock = threading.Lock()

    def add(self, rows: list[dict], skipped: bool = False) -> None:
        if not rows:
            return
        with self._lock:
            if self.path is not None:
                append_segment_manifest(self.path, rows)
            self.recorded += 0 if skipped else len(rows)


def _row(case: str, image: Path, status: str, seconds: float = 0.0, error: str = "") -> dict:
    return {"case": case, "image": str(Path(image).resolve()), "status": status, "seconds": float(seconds),
            "error": error}


def _complete(case_dir: Path, image: Path) -> bool:
    """Whether `case_dir` is a complete case folder (:func:`atlasreg.export.write_outputs` writes it all or
    nothing) of the input `image`."""
    try:
        info = read_case_info(case_dir)
    except AtlasregError:  # a damaged case information file: written again
        return False
    return info is not None and info["image"] is not None and str(info["image"]) == str(Path(image).resolve())


def _begin_run(out_dir: Path, checkpoint: str | Path, refinement: dict, names: Sequence[str],
               overwrite: bool, num_parts: int = 1, part_id: int = 0) -> tuple[dict, set[str]]:
    """Claim `out_dir` for a segmentation run (:func:`atlasreg.outputs.claim_output`) and mark it in
    progress (:data:`SEGMENT_INFO` with status :data:`IN_PROGRESS`; for part `part_id` of
    `num_parts` > 1 its part status file first). A folder holding the same run (same checkpoint bytes
    and refinement settings) is continued: its case list grows by `names` (every case of the run, all
    parts: the parts write the same list). Returns (identity, case names)."""
    identity = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                "refinement": dict(refinement)}
    previous = read_segment_info(out_dir)
    if isinstance(previous.get("refinement"), dict):
        # a setting the manifest of an older atlasreg lacks did not exist then: that run had its default
        previous = {**previous, "refinement": {**DEFAULTS["refinement"], **previous["refinement"]}}
    owned = [p for p in out_dir.iterdir() if p.is_dir() and (p / CASE_INFO).is_file()] if out_dir.is_dir() else []
    cases = set(names)
    if claim_output(out_dir, out_dir / SEGMENT_INFO, previous, identity, owned, "segmentations", overwrite):
        cases |= {p.name for p in owned} | set(previous.get("cases") or [])
    if num_parts > 1:
        write_segment_part_info(out_dir, part_id, num_parts, IN_PROGRESS)
    write_segment_info(out_dir, checkpoint, refinement, identity["checkpoint_sha256"], IN_PROGRESS, cases,
                       parts=num_parts)
    return identity, cases


def segment(module: Method, inputs: Iterable[str | Path], out_dir: str | Path,
            refinement: dict | None = None, progress: bool = True, image_suffix: str = "",
            checkpoint: str | Path | None = None, overwrite: bool = False, num_parts: int = 1, part_id: int = 0,
            num_workers: int | None = None, on_failure: Callable[[str], None] | None = None) -> SegmentedCases:
    """Segment every input image (files or folders) and write the outputs under out_dir.

    Folders are read with :func:`collect_inputs`: files named with the label suffix of a data split of
    the model's config (``data.train.label_suffix``, e.g. '_seg') are left out with one warning, and a
    folder mixing images and files named like labelmaps is refused. The case list (the inputs in the
    order given, each folder's images sorted by name) is cut into batches of `cases_at_once` cases
    refined together; `num_parts` > 1 runs part `part_id` (0-based) only, the batches k with
    ``k % num_parts == part_id`` (:func:`part_batches`), so that P commands, on any machines, segment
    one folder together. Cases are read by `num_workers` DataLoader worker processes
    (:class:`CaseReader`; None: :func:`default_workers`; 0: in this process) ahead of the computation;
    each case's outputs are computed on its input's grid here and written (encoded, compressed, flushed)
    by a background thread while the next case computes; memory holds about two batches of cases and
    the outputs of three, whatever the number of inputs. progress: a bar on stderr (tqdm)
    advancing per case (written, skipped or failed). refinement: overrides of config['refinement']
    (iterations, lr, beta, gamma, lambda, cases_at_once, ...), validated as config values (ConfigError
    naming the key) before anything is read or written.

    checkpoint: the file `module` was loaded from; when given, out_dir gets the run's manifest
    (:data:`SEGMENT_INFO`: checkpoint, its SHA-256, the settings, status and cases; with parts, a status
    file per part), marked in progress before the first case folder is written and complete once every
    case was attempted (with parts: once every part has finished, :func:`segment_run_status`), and a
    case manifest (:func:`segment_manifest_path`: one row per case, done, failed or skipped, its
    seconds and error). A folder holding segmentations of another checkpoint or settings is refused
    (AtlasregError naming its manifest) unless `overwrite`, which deletes them first. A folder holding
    this run is continued: the cases whose folder is complete (of the same input file) are skipped, a
    batch holding a missing case is computed again and only its missing cases written, so a killed run
    (SIGKILL included) rerun gives exactly an uninterrupted run's files; what a killed writer left
    (``.tmp-`` entries) is removed first (with parts: only this part's own entries).

    Bad input: a missing path, no images, colliding case names, a mixed folder, a bad part or bad
    settings raise AtlasregError before anything is written. An input that cannot be read or checked
    (corrupt, truncated, NaN, wrong dimension, ...) fails alone: its one-line message (naming the file)
    goes to `on_failure` (if given) and to the case manifest, the other cases are written, and
    :class:`CasesFailed` (an AtlasregError: "k of n cases failed, see <manifest>") is raised at the end.
    A failure of the computation (a diverged refinement, a damaged checkpoint) or of the writing stops
    the run: before the first case was recorded the folder is left as it was; after, the manifest
    stays in progress and a rerun continues. Returns the case folders written (:class:`SegmentedCases`:
    also the skipped cases and the manifest)."""
    cfg = module.config
    ref = validate_section("refinement", refinement or {}, cfg["refinement"])  # before anything is written
    check_part(num_parts, part_id)
    workers = default_workers() if num_workers is None else num_workers
    if not isinstance(workers, int) or workers < 0:
        raise AtlasregError(f"--num-workers {workers!r}: expected an integer >= 0")
    labels = list(cfg["data"]["labels"].keys())
    grid = module.net.grid
    prep = Preprocessing.from_config(cfg)
    splits = [cfg["data"].get(s) or {} for s in SPLITS]
    label_suffixes = sorted({s.get("label_suffix") or "" for s in splits} - {""})
    image_suffixes = {s.get("image_suffix") or "" for s in splits if s.get("label_suffix")}
    files = collect_inputs(list(inputs), image_suffix, label_suffixes,
                           image_suffixes.pop() if len(image_suffixes) == 1 else "")
    batches = part_batches(len(files), ref["cases_at_once"], num_parts, part_id)
    mine = [files[i] for batch in batches for i in batch]
    out_dir = Path(out_dir)  # created by the manifest or the first case folder
    result = SegmentedCases()
    result.total = len(mine)
    manifest = _Manifest(None)
    created = not out_dir.exists()
    run, saved, present = None, {}, set()
    if checkpoint:
        csv_file = segment_manifest_path(out_dir, part_id, num_parts)
        own = [out_dir / SEGMENT_INFO] if num_parts == 1 else [segment_part_info_path(out_dir, part_id, num_parts)]
        # restored when the run fails before it records a case: the run's manifest (one part) or the
        # part's status file, and the case manifest
        saved = {f: (f.read_bytes() if f.is_file() else None) for f in own + [csv_file]}
        remove_temporaries(out_dir, None if num_parts == 1 else {n for n, _ in mine} | {f.name for f in saved})
        run = _begin_run(out_dir, checkpoint, ref, [n for n, _ in files], overwrite, num_parts, part_id)
    bar = tqdm(total=len(mine), desc="segmenting", unit="case", disable=not progress)

    def write(item) -> None:  # on the writer thread: files only (encoding, compression, fsync)
        pred, read, computed, outputs = item
        start = time.perf_counter()
        with _ITK_FILES:
            folder = write_outputs(out_dir / pred.case.name, pred.case, outputs, labelmap_extension(pred.case.path),
                                   pred.transform_metrics)
        result.append(folder)
        release_free_memory()  # else the resident set grows with the number of cases (glibc keeps freed pages)
        manifest.add([_row(read.name, read.path, DONE, read.seconds + computed + time.perf_counter() - start)])
        bar.update()  # per written case

    reads = writer = None
    try:
        if run is not None:
            present = {name for name, path in mine if _complete(out_dir / name, path)}
            skipped = [files[i] for b in batches if all(files[j][0] in present for j in b) for i in b]
            start_segment_manifest(csv_file, [_row(name, path, SKIPPED) for name, path in skipped])
            result.skipped += [name for name, _ in skipped]
            result.manifest = manifest.path = csv_file
            if skipped:
                bar.update(len(skipped))
        todo = [b for b in batches if not all(files[i][0] in present for i in b)]
        size, workers = (len(todo[0]), workers) if todo else (1, 0)  # nothing to read: no worker
        # each worker keeps up to prefetch_factor cases read ahead: together about one batch
        loader = DataLoader(CaseReader(files, prep), batch_size=None, sampler=[i for b in todo for i in b],
                            num_workers=workers, collate_fn=_as_is,
                            prefetch_factor=max(2, -(-size // workers)) if workers else None)
        reads = iter(loader)  # the workers start (forked before the writer thread exists)
        writer = _Writer(write, 2)  # outputs of large 3D inputs take GBs: two cases wait at most
        for batch in todo:
            got = [next(reads) for _ in batch]
            for r in got:
                for message, category in r.warned:
                    warnings.warn(message, category, stacklevel=2)
            failed = [r for r in got if r.case is None and r.name not in present]
            if failed:
                manifest.add([_row(r.name, r.path, FAILED, r.seconds, r.error) for r in failed])
                for r in failed:
                    result.failures.append((r.name, r.path, r.error))
                    if on_failure is not None:
                        on_failure(r.error)
                bar.update(len(failed))
            ok = [r for r in got if r.case is not None]
            if ok:
                start = time.perf_counter()
                preds = predict_cases(module, [r.case for r in ok], ref)
                share = (time.perf_counter() - start) / len(ok)
                for pred, r in zip(preds, ok):
                    if r.name not in present:  # the outputs on the input's grid: computed here, written there
                        start = time.perf_counter()
                        outputs = native_outputs(pred.case, labels, grid, pred.itn, pred.transforms,
                                                 fitted_atlas(module, ref), module.atlas_image,
                                                 connected=ref.get("atlas_topology") == "connected")
                        writer.put((pred, r, share + time.perf_counter() - start, outputs))
            # complete cases of a batch computed again (for its missing ones) keep their folders, even
            # one that cannot be read now
            kept = [r for r in got if r.name in present]
            if kept:
                manifest.add([_row(r.name, r.path, SKIPPED) for r in kept], skipped=True)
                result.skipped += [r.name for r in kept]
                bar.update(len(kept))
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        bar.leave = False  # cleared: the error is the last line
        # a failure before the first case was recorded (e.g. a diverged refinement) leaves the folder
        # as it was; after it, the manifest stays "in progress": the folder is incomplete, a rerun
        # continues it
        if run is not None and not manifest.recorded:
            for f, data in saved.items():
                if data is not None:
                    write_bytes(f, data)
                else:
                    f.unlink(missing_ok=True)
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
        del reads  # the workers stop
    if run is not None:
        identity, cases = run
        if num_parts > 1:
            write_segment_part_info(out_dir, part_id, num_parts, COMPLETE)
        if num_parts == 1 or segment_run_status(out_dir)[0] == COMPLETE:  # parts: the last to finish
            write_segment_info(out_dir, checkpoint, ref, identity["checkpoint_sha256"], COMPLETE, cases,
                               parts=num_parts)
    if result.failures:
        raise CasesFailed(result)
    return result
