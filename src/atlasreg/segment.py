"""Segmentation of new images with a trained Atlas-ISTN: ITN, 1-pass and refined labelmaps, transforms
and the deformed atlas image, all written on each input's own grid and geometry.

Output contract: one case folder per case ``<out>/<case>/`` (written all or nothing: the labelmaps of
each output, the deformed atlas image, the transforms of the final registration as displacement
fields and ITK composites, the case information and the transform metrics), described with its file
names, units and geometry, readers and writers in :mod:`atlasreg.contracts`. Which files exist
depends on the model's method.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from .contracts import (  # noqa: F401 - the case folder's names, re-exported
    CASE_INFO, COMPLETE, DEFORMED_ATLAS_IMAGE, FORWARD_FIELD, FORWARD_TRANSFORM, IN_PROGRESS, INVERSE_FIELD,
    INVERSE_TRANSFORM, LABELMAP_OUTPUTS, SEGMENT_INFO, TRANSFORM_OUTPUTS, read_segment_info, transform_metrics_csv,
    write_segment_info,
)
from .config import SPLITS, validate_section
from .data.cases import Preprocessing, case_name, load_case
from .data.dataset import CasePair, find_pairs, split_extension
from .data.io import write_bytes
from .errors import AtlasregError
from .export import world_transforms, write_case_outputs  # noqa: F401 - re-exported
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


def _begin_run(out_dir: Path, checkpoint: str | Path, refinement: dict, names: Sequence[str],
               overwrite: bool) -> tuple[dict, set[str]]:
    """Claim `out_dir` for a segmentation run (:func:`atlasreg.outputs.claim_output`) and mark it in
    progress (:data:`SEGMENT_INFO` with status :data:`IN_PROGRESS`). A folder holding the same run
    (same checkpoint bytes and refinement settings) is continued: its case list grows by `names`.
    Returns (identity, case names)."""
    identity = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                "refinement": dict(refinement)}
    previous = read_segment_info(out_dir)
    owned = [p for p in out_dir.iterdir() if p.is_dir() and (p / CASE_INFO).is_file()] if out_dir.is_dir() else []
    cases = set(names)
    if claim_output(out_dir, out_dir / SEGMENT_INFO, previous, identity, owned, "segmentations", overwrite):
        cases |= {p.name for p in owned} | set(previous.get("cases") or [])
    write_segment_info(out_dir, checkpoint, refinement, identity["checkpoint_sha256"], IN_PROGRESS, cases)
    return identity, cases


def segment(module: Method, inputs: Iterable[str | Path], out_dir: str | Path,
            refinement: dict | None = None, progress: bool = True, image_suffix: str = "",
            checkpoint: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Segment every input image (files or folders) and write the outputs under out_dir.

    Folders are read with :func:`collect_inputs`: files named with the label suffix of a data split of
    the model's config (``data.train.label_suffix``, e.g. '_seg') are left out with one warning, shown
    once every input was checked, and a folder mixing images and files named like labelmaps is refused.
    All inputs are read and checked before anything is written; a bad input raises AtlasregError
    naming the file. Cases are then read again `cases_at_once` at a time, so peak memory does not grow
    with the number of inputs; progress: bars on stderr (tqdm) while checking, then one advancing per
    written case. refinement: overrides of config['refinement'] (iterations, lr, beta, gamma,
    lambda, cases_at_once), validated as config values (ConfigError naming the key) before anything is
    read or written. checkpoint: the file `module` was loaded from; when given, out_dir gets the run's
    manifest (:data:`SEGMENT_INFO`: checkpoint, its SHA-256, the settings, status and cases): marked
    in progress before the first case folder is written and complete after the last, and a folder
    holding segmentations of another checkpoint or settings is refused (AtlasregError naming its
    manifest) unless `overwrite`, which deletes them first. Returns the case output folders."""
    cfg = module.config
    ref = validate_section("refinement", refinement or {}, cfg["refinement"])  # before anything is written
    labels = list(cfg["data"]["labels"].keys())
    grid = module.net.grid
    prep = Preprocessing.from_config(cfg)
    splits = [cfg["data"].get(s) or {} for s in SPLITS]
    label_suffixes = sorted({s.get("label_suffix") or "" for s in splits} - {""})
    image_suffixes = {s.get("image_suffix") or "" for s in splits if s.get("label_suffix")}
    with warnings.catch_warnings(record=True) as notes:  # shown once every input was checked
        warnings.simplefilter("always")
        files = collect_inputs(list(inputs), image_suffix, label_suffixes,
                               image_suffixes.pop() if len(image_suffixes) == 1 else "")

    def read(name, path):
        return load_case(path, None, prep, name=name)

    # Every input is read and checked before anything is written, but not kept: cases are read again
    # chunk by chunk below, so memory does not grow with the number of inputs (reading is about 2% of
    # the time of a refined case).
    for name, path in tqdm(files, desc="checking", disable=not progress, leave=False):
        read(name, path)
    for note in notes:
        warnings.warn_explicit(note.message, note.category, note.filename, note.lineno, source=note.source)
    out_dir = Path(out_dir)  # created by the manifest or the first case folder: none if an input is bad
    created = not out_dir.exists()
    manifest = out_dir / SEGMENT_INFO
    previous = manifest.read_bytes() if manifest.is_file() else None
    run = _begin_run(out_dir, checkpoint, ref, [n for n, _ in files], overwrite) if checkpoint else None
    written = []
    chunk = max(1, int(ref["cases_at_once"]))
    bar = tqdm(total=len(files), desc="segmenting", unit="case", disable=not progress)
    try:
        for i in range(0, len(files), chunk):
            group = [read(name, path) for name, path in files[i:i + chunk]]
            for pred in predict_cases(module, group, ref):
                written.append(write_case_outputs(out_dir, pred.case, labels, grid, pred.itn, pred.transforms,
                                                  module.atlas_labelmap, module.atlas_image,
                                                  transform_metrics=pred.transform_metrics))
                bar.update()  # per written case
    except AtlasregError:
        bar.leave = False  # cleared: the error is the last line
        # a failure before the first case folder (e.g. a diverged refinement) leaves the folder as it
        # was; after it, the manifest stays "in progress": the folder is incomplete
        if run is not None and not written:
            if previous is not None:
                write_bytes(manifest, previous)
            else:
                manifest.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
    if run is not None:
        identity, cases = run
        write_segment_info(out_dir, checkpoint, ref, identity["checkpoint_sha256"], COMPLETE, cases)
    return written
