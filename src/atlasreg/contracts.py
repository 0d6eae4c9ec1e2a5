"""File contracts: the names, contents and columns of every folder atlasreg writes and reads, with their
small readers and writers. This module is the written contract; no other module spells these names
(``tests/test_contracts.py`` checks), they import them from here.

Conventions of all folders: images are read and written with SimpleITK and keep their geometry
(spacing and origin in world units, mm; direction cosines); vector images hold world units along the
world axes; CSV files are UTF-8 with ``\\n`` line ends and a header row, floats written with ``repr``
(full precision, ``nan`` for NaN; an empty cell is read as NaN); YAML files are ``yaml.safe_dump``
output. Every file is written atomically (:mod:`atlasreg.data.io`), a case folder all or nothing. A
reader raises :class:`~atlasreg.errors.AtlasregError` with one line naming the file and the problem.

Case folder ``<out>/<case>/`` (``atlasreg segment``; :func:`atlasreg.export.write_case_outputs`,
:meth:`atlasreg.Segmentation.save`; read by ``atlasreg evaluate``, ``report`` and ``correspond``)
--------------------------------------------------------------------------------------------------
- ``<output>_labelmap<ext>`` (:func:`case_labelmap_path`, :func:`find_labelmap`), for the outputs of
  :data:`LABELMAP_OUTPUTS`: ``itn`` the ITN (segmentation network) output; ``itn_lcc`` the same with
  only the largest connected component per structure; ``onepass`` the atlas warped by the one-pass
  registration (Eq. 9); ``refine`` the atlas warped after test-time refinement (Eqs. 17-21); ``atlas``
  the undeformed atlas (identity, "Id"). Voxel values are the declared label values, on the input's
  own grid and geometry; ``<ext>`` is the input image's extension (:func:`labelmap_extension`:
  ``.png``, ``.nii.gz``, ...; ``.nii.gz`` for a DICOM series or file, with the series' geometry, and for
  an image given in memory). Which outputs exist depends on the model's method: Atlas-ISTN writes
  all; a U-Net writes itn and itn_lcc only, plus onepass (its untrained STN: the identity), refine and
  atlas when it has a fixed atlas (the paper's 'Independent'); VML has no ITN and writes onepass and
  atlas.
- ``deformed_atlas_image.nii.gz`` (:data:`DEFORMED_ATLAS_IMAGE`): the atlas image resampled onto the
  input grid (float32).
- The transforms of the final (refined, else 1-pass) registration, consistent as files with the saved
  atlas (``<run>/atlas/atlas_image.nii.gz``, on the centred model grid) with no hidden re-centring:
  ``inverse_displacement.nii.gz`` (:data:`INVERSE_FIELD`): on the input's grid, the ITK displacement
  field that maps each input (subject) point p to the atlas point p + d(p) (Phi^-1, Eq. 8, with the
  case's frame); resampling the saved atlas with it onto the input gives the 1-pass/refined
  segmentation;
  ``forward_displacement.nii.gz`` (:data:`FORWARD_FIELD`): on the atlas grid, the field that maps each
  atlas point q to the subject point q + d(q) (Phi, Eq. 7); it resamples the input into atlas space;
  ``inverse_transform.h5`` and ``forward_transform.h5`` (:data:`INVERSE_TRANSFORM`,
  :data:`FORWARD_TRANSFORM`): the same maps as ITK composite transforms (affine part + displacement
  field on the model grid), for SimpleITK, ANTs, 3D Slicer.
  Outside the model's field of view both maps continue the affine part (the dense part keeps its
  border value in the NIfTI fields; ITK's displacement-field transform in the .h5 files uses zero
  there). Not written when the method does not register (a U-Net without a fixed atlas).
- ``case.yaml`` (:data:`CASE_INFO`; :func:`write_case_info`, :func:`read_case_info`): ``image:
  <absolute path of the input image>`` (null for an image given in memory); always written; the
  report draws the image from it.
- ``transform_metrics.csv`` (:data:`TRANSFORM_METRICS`; :func:`write_transform_metrics`,
  :func:`read_transform_metrics`): one row per transform the method has (:data:`TRANSFORM_OUTPUTS`:
  ``onepass``, the 1-pass transform of Eq. 9; ``refine``, the refined one of Eq. 21), columns
  ``method, mice_mm, mice_voxels, ic_dsc, nonpositive_jacobian_fraction, std_log_jacobian``
  (:data:`TRANSFORM_METRIC_COLUMNS`), computed on the model grid (not the input's): the masked inverse
  consistency error in mm and in voxels of the model grid and the IC-DSC of the atlas labelmap (paper
  Sec. 3.2 'Inter-Subject Correspondence', Table 6;
  :func:`atlasreg.evaluation.consistency.inverse_consistency`); the fraction of model-grid voxels with
  det J(Phi) <= 0 and the standard deviation of log det J(Phi) over the whole grid (forward transform
  Phi, Eq. 7; :func:`atlasreg.evaluation.topology.jacobian_statistics`). Not written when the method
  has no transform.

Segmentation run folder (``atlasreg segment --out``)
----------------------------------------------------
One case folder per case, and ``segment.yaml`` (:data:`SEGMENT_INFO`; :func:`write_segment_info`,
:func:`read_segment_info`), the run's manifest: ``checkpoint`` (absolute path of the model checkpoint),
``checkpoint_sha256`` (its SHA-256), ``refinement`` (the refinement settings used: iterations, lr,
beta, gamma, lambda, cases_at_once), ``status`` (:data:`IN_PROGRESS` from before the first case folder
is written until every case was attempted, then :data:`COMPLETE`), ``cases`` (the case folders of
the run; a case that failed is listed but has no folder) and, for a run split into parts
(``--num-parts P``, P > 1), ``parts: P``.
``atlasreg segment`` refuses a folder whose manifest names another checkpoint or other settings
(:mod:`atlasreg.outputs`); ``atlasreg evaluate`` refuses a run in progress (:func:`segment_run_status`)
and case folders the manifest does not list, takes the declared labels from the checkpoint and copies
the entries into the evaluation's ``info.yaml`` (the report's lambda* sensitivity study reads them
there).

- ``segment_manifest.csv`` (:data:`SEGMENT_MANIFEST`; with parts one file per part,
  ``segment_manifest.part-<I>-of-<P>.csv``, :data:`SEGMENT_PART_MANIFEST`;
  :func:`segment_manifest_path`, :func:`read_segment_manifest`): one row per case of the run (of the
  part), columns ``case, image, status, seconds, error`` (:data:`SEGMENT_MANIFEST_COLUMNS`):
  ``image`` the input's absolute path; ``status`` :data:`DONE` (its case folder was written),
  :data:`FAILED` (the input could not be read or checked: ``error`` holds the one-line message naming
  the file; no case folder) or :data:`SKIPPED` (its case folder, of the same input, was already complete
  in the folder: a rerun of the same command resumes); ``seconds`` the wall time spent on the case
  (reading, its share of the batch of ``cases_at_once`` cases it was computed with, writing; 0 for a
  skipped case). A run starts its manifest anew (header and the rows of the cases it skips) and
  appends each further row in one write as the case ends, so a killed run's manifest holds whole rows
  only (:func:`read_segment_manifest` ignores an unfinished last line).
- ``segment.part-<I>-of-<P>.yaml`` (:data:`SEGMENT_PART_INFO`, parts only; :func:`write_segment_part_info`):
  ``part``, ``parts`` and ``status`` of part I. The parts of a run write one folder concurrently; its
  status is :data:`COMPLETE` only when every part's file says so (:func:`segment_run_status`; the
  ``status`` of ``segment.yaml`` is then only a hint, set by the last part to finish).

Training run folder (``atlasreg train --out``; :func:`run_paths`)
-------------------------------------------------------------
``config.yaml`` (:data:`RUN_CONFIG`: the validated config, data paths absolute; :func:`read_run_config`);
``checkpoints/last.ckpt`` (:data:`CHECKPOINT_DIR`, :data:`LAST_CHECKPOINT`: every epoch; a run resumes
from it; Lightning's name) beside Lightning's newest ``checkpoints/epoch<NNNN>.ckpt``;
``model.ckpt`` (:data:`FINAL_CHECKPOINT`: the trained method, weights, atlas, the method's name,
constructor arguments and preprocessing; :func:`atlasreg.models.registry.load_model` loads it without
the config); ``atlas/`` (:data:`ATLAS_DIR`: the final atlas) and ``atlas_initial/``
(:data:`INITIAL_ATLAS_DIR`: the atlas at the start of training, Eq. 15 with t = 0; paper Fig. 9), both
atlas folders; ``logs/`` (:data:`LOG_DIR`: TensorBoard); ``cache/`` (:data:`CACHE_DIR`: preprocessed
training cases, :mod:`atlasreg.data.case_dataset`, unless ``$ATLASREG_CACHE`` names another folder).

A DeepATLAS run (``atlasreg deepatlas pretrain``, :func:`atlasreg.deepatlas.method.pretrain`) has the
same folder with steps instead of epochs: ``checkpoints/last.ckpt`` every ``deepatlas.checkpoint_every``
steps beside Lightning's newest ``checkpoints/step<NNNNNNN>.ckpt`` (:data:`STEP_CHECKPOINT`); the
checkpoints hold the stage under the key ``deepatlas``; its atlas folder holds ``atlas_image.nii.gz``
alone: the learnt atlas X (image channel) on the template grid
(:func:`atlasreg.deepatlas.method.template_grid`: ``deepatlas.atlas_factor`` times the model grid over
its corner-to-corner extent, centred), and there is no ``atlas_initial/``.

Atlas folder (:func:`atlasreg.atlas.save_atlas`; :func:`atlas_paths`)
---------------------------------------------------------------------
On the model grid (:meth:`atlasreg.spatial.grid.Grid.centred`: centred at the world origin, identity
direction, the model spacing in mm), so the transforms of the case folders apply to these files as
they are: ``atlas_labelmap.nii.gz`` (:data:`ATLAS_LABELMAP`: argmax of the probabilities, declared
label values, int32), ``atlas_probabilities.nii.gz`` (:data:`ATLAS_PROBABILITIES`: float32 vector
image, one component per declared label in the declared order) and ``atlas_image.nii.gz``
(:data:`ATLAS_IMAGE`: float32, in the normalised intensities of the training images; Eqs. 15-16).

DeepATLAS template folder (``atlasreg deepatlas template --out``; :func:`template_paths`)
---------------------------------------------------------------------------------------
A template mask M (DeepATLAS Eq. 14) on the template grid (:func:`atlasreg.deepatlas.method.template_grid`),
written all or nothing: ``template_probabilities.nii.gz`` (:data:`TEMPLATE_PROBABILITIES`: float32
vector image, one component per declared label in the declared order, the least-squares fit of the
labelled exams' one-hot masks, background included; the components sum to 1 and overshoot [0, 1]
near edges), ``template_labelmap.nii.gz`` (:data:`TEMPLATE_LABELMAP`: their argmax as declared label
values, int32, to look at) and ``template.yaml`` (:data:`TEMPLATE_INFO`; :func:`write_template_info`,
:func:`read_template_info`): ``labels`` ({value: name}), ``checkpoint`` (absolute path),
``checkpoint_sha256``, ``cases`` (the labelled exams: name, image, labelmap, absolute paths),
``smoothness`` (the membrane weight) and ``grid`` (size, spacing, origin, direction).

DeepATLAS propagation (``atlasreg deepatlas propagate --out``) writes a segmentation run folder as
above: per case ``onepass_labelmap<ext>`` (the template propagated by the case's coordinate map,
``M o c_n``, argmax over the declared labels, on the input's own grid) and ``case.yaml``; its
``segment.yaml`` names the DeepATLAS checkpoint, and under ``refinement`` the template folder
(``template``) and its probabilities' SHA-256 (``template_sha256``).

DeepATLAS crop folder (``atlasreg deepatlas crop --out``)
------------------------------------------------------
One folder per case, ``<out>/<case>/``, all or nothing: ``crop.nii.gz`` (:data:`CROP_IMAGE`: the input's
raw intensities, float32, resampled linearly on the box's grid: the template box mapped into the case
by the least-squares affine of Sec. 5.2.4; its header is the nearest grid of orthogonal axes, exact
for a similarity map) and ``crop.yaml`` (:data:`CROP_INFO`; :func:`write_crop_info`): ``image``
(absolute path), ``box`` (min and max template coordinates), ``size``, ``index_to_world`` (the exact
(D + 1) x (D + 1) homogeneous map from crop indices, ITK order, to the input's world, mm) and
``vertices`` (the 2^D projected corners, world mm).

Evaluation folder (``atlasreg evaluate --out``; :func:`write_evaluation`, :func:`evaluation_paths`)
--------------------------------------------------------------------------------------------------
- ``metrics_per_case.csv`` (:data:`METRICS_PER_CASE`; :func:`read_metrics_per_case`): columns ``case,
  method, label, structure, dice, hd, hd95, hd95_avg, asd, components, holes, reference_components,
  reference_holes`` (:data:`PER_CASE_COLUMNS`), one row per case, output (``method``) and evaluated
  foreground structure. ``hd``, ``hd95``, ``hd95_avg``, ``asd`` in world units of the reference image (mm
  when its spacing is in mm); ``hd95`` is the maximum of the two directed 95th percentiles, ``hd95_avg``
  their mean (DeepATLAS Eq. 16; NaN when read from a folder written before it existed); ``components``: connected components of the structure in the prediction (full
  connectivity), ``holes`` its holes, and the same of the reference.
- ``summary.csv`` (:data:`SUMMARY_CSV`): columns ``method, label, structure, n, dice_mean, dice_std,
  hd_mean, hd_std, hd95_mean, hd95_std, hd95_avg_mean, hd95_avg_std, asd_mean, asd_std, components_mean,
  single_component_fraction, holes_mean, same_topology_fraction`` (:data:`SUMMARY_COLUMNS`), one row
  per (method, structure): NaN-ignoring mean and population standard deviation over the ``n`` cases.
- ``summary.md`` (:data:`SUMMARY_MD`): the same numbers as a Markdown table with ``mean ± std``
  cells, followed (when there are such rows) by a table of the transform metrics per method and a
  quality-control section (ranking quality of the QC score and the flagged cases).
- ``info.yaml`` (:data:`EVALUATION_INFO`; :func:`read_evaluation_info`): the caller's entries (model
  name, method, STN variant, fixed atlas, L_s weight, label, references, the ``segment.yaml``
  entries) plus ``test_set``, ``predictions`` (absolute path of the segmentation run folder),
  ``merge`` (null or ``{key: [values]}``), ``labels`` (``{value: name}``) and ``n_cases`` (cases with
  at least one prediction file).
- ``transforms_per_case.csv`` (:data:`TRANSFORMS_PER_CASE`; :func:`read_transforms_per_case`):
  columns ``case`` and those of ``transform_metrics.csv`` (:data:`TRANSFORMS_PER_CASE_COLUMNS`), the
  rows of every evaluated case's ``transform_metrics.csv`` with the case name prepended; header only
  when no case has that file.
- ``quality_control.csv`` (:data:`QUALITY_CONTROL`; :func:`read_quality_control`; only when at least
  one case has both ``itn`` and ``refine`` labelmaps, an older one is removed otherwise): columns
  ``case, dice_itn_refine, itn_outside_refine, qc_score, refine_dice, flagged``
  (:data:`QUALITY_COLUMNS`), one row per such case (:mod:`atlasreg.evaluation.quality`):
  ``dice_itn_refine``, the mean over the evaluated structures of the Dice between the ITN and the
  refined labelmap (no reference used); ``itn_outside_refine``, the fraction of ITN foreground voxels
  on the refined labelmap's background; ``qc_score = 1 - dice_itn_refine`` (higher: look at this
  case); ``refine_dice``, the mean Dice of ``refine`` against the reference (to judge the score);
  ``flagged``: ``True`` for the cases with the 10 % highest scores (at least one).

Report folder (``atlasreg report --out``)
-----------------------------------------
``report.html`` (:data:`REPORT_HTML`, self-contained), ``report.md`` (:data:`REPORT_MD`), ``figures/``
(:data:`FIGURE_DIR`, the Markdown's figures, replaced as a whole) and, written last, ``report.yaml``
(:data:`REPORT_INFO`): ``evaluations`` and ``sensitivity``, the absolute paths of the evaluation
folders the report was built from (what a report folder is compared by), and ``provenance``: the
generation time, the software versions (atlasreg, torch, SimpleITK, numpy, matplotlib, Python), the
bootstrap repetitions and, per evaluation folder, its test set, model, predictions, number of
references and cases, checkpoint and its SHA-256, the training run's configuration file and the
refinement settings (as the report's provenance table shows them).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import yaml

from .errors import AtlasregError


def _write_text(path: str | Path, text: str) -> Path:
    """:func:`atlasreg.data.io.write_text` (atomic), imported on first use: the command line imports
    this module to build its parser, and data.io would bring SimpleITK and numpy with it."""
    from .data.io import write_text as atomic_write_text

    return atomic_write_text(path, text)

# --------------------------------------------------------------------------------------------------
# case folder

#: Labelmap outputs of a case folder, in the order they are evaluated and reported.
LABELMAP_OUTPUTS = ("itn", "itn_lcc", "onepass", "refine", "atlas")
#: Transforms whose statistics go to :data:`TRANSFORM_METRICS`.
TRANSFORM_OUTPUTS = ("onepass", "refine")
#: Extensions a case folder's labelmaps are looked for with, in this order.
LABELMAP_EXTENSIONS = (".png", ".nii.gz")
#: ``<output>`` + this + ``<ext>`` is a labelmap's file name.
LABELMAP_SUFFIX = "_labelmap"
DEFORMED_ATLAS_IMAGE = "deformed_atlas_image.nii.gz"
FORWARD_FIELD = "forward_displacement.nii.gz"
INVERSE_FIELD = "inverse_displacement.nii.gz"
FORWARD_TRANSFORM = "forward_transform.h5"
INVERSE_TRANSFORM = "inverse_transform.h5"
CASE_INFO = "case.yaml"
TRANSFORM_METRICS = "transform_metrics.csv"
TRANSFORM_METRIC_COLUMNS = ("method", "mice_mm", "mice_voxels", "ic_dsc", "nonpositive_jacobian_fraction",
                            "std_log_jacobian")

# segmentation run folder
SEGMENT_INFO = "segment.yaml"
#: ``status`` of a segmentation run in :data:`SEGMENT_INFO` until its last case folder is written ...
IN_PROGRESS = "in_progress"
#: ... and after.
COMPLETE = "complete"
#: The case manifest of a segmentation run (one part: :data:`SEGMENT_PART_MANIFEST`).
SEGMENT_MANIFEST = "segment_manifest.csv"
#: The case manifest of part ``part`` (0-based) of ``parts``: ``.format(part=I, parts=P)``.
SEGMENT_PART_MANIFEST = "segment_manifest.part-{part}-of-{parts}.csv"
#: The status file of part ``part`` of ``parts`` of a sharded segmentation run.
SEGMENT_PART_INFO = "segment.part-{part}-of-{parts}.yaml"
SEGMENT_MANIFEST_COLUMNS = ("case", "image", "status", "seconds", "error")
#: ``status`` of a case in the manifest: its folder was written by this run ...
DONE = "done"
#: ... its input could not be read or checked (no folder) ...
FAILED = "failed"
#: ... its folder was already complete (a resumed run).
SKIPPED = "skipped"

# registration folder (`atlasreg register`): the transforms and fields share the case folder's names
# (FORWARD_TRANSFORM, FORWARD_FIELD, INVERSE_TRANSFORM, INVERSE_FIELD); there "forward" maps fixed
# world points to moving ones (the map ITK resamples the moving image with).
REGISTERED_IMAGE = "warped.nii.gz"
REGISTERED_LABELS = "warped_labels.nii.gz"
REGISTRATION_SUMMARY = "summary.yaml"
#: `atlasreg register-to-atlas` (fixed: the model's atlas image; moving: the scan): the atlas labelmap
#: on the scan's own grid, through the exact inverse (a segmentation by registration), and the atlas
#: files registered against, as written by `atlasreg train` (ATLAS_IMAGE, ATLAS_LABELMAP).
ATLAS_LABELS_ON_MOVING = "atlas_labels_on_moving.nii.gz"

# training run folder
RUN_CONFIG = "config.yaml"
FINAL_CHECKPOINT = "model.ckpt"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
#: Lightning's file-name template of the per-epoch checkpoints in :data:`CHECKPOINT_DIR`.
EPOCH_CHECKPOINT = "epoch{epoch:04d}"
#: ... and of the per-step checkpoints of a DeepATLAS run.
STEP_CHECKPOINT = "step{step:07d}"
ATLAS_DIR = "atlas"
INITIAL_ATLAS_DIR = "atlas_initial"
LOG_DIR = "logs"
CACHE_DIR = "cache"

# DeepATLAS template and crop folders
TEMPLATE_PROBABILITIES = "template_probabilities.nii.gz"
TEMPLATE_LABELMAP = "template_labelmap.nii.gz"
TEMPLATE_INFO = "template.yaml"
CROP_IMAGE = "crop.nii.gz"
CROP_INFO = "crop.yaml"

# atlas folder
ATLAS_LABELMAP = "atlas_labelmap.nii.gz"
ATLAS_PROBABILITIES = "atlas_probabilities.nii.gz"
ATLAS_IMAGE = "atlas_image.nii.gz"

# evaluation folder
METRICS_PER_CASE = "metrics_per_case.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
EVALUATION_INFO = "info.yaml"
TRANSFORMS_PER_CASE = "transforms_per_case.csv"
QUALITY_CONTROL = "quality_control.csv"

# report folder
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_INFO = "report.yaml"
FIGURE_DIR = "figures"
PER_CASE_COLUMNS = ("case", "method", "label", "structure", "dice", "hd", "hd95", "hd95_avg", "asd", "components", "holes",
                    "reference_components", "reference_holes")
SUMMARY_COLUMNS = ("method", "label", "structure", "n",
                   "dice_mean", "dice_std", "hd_mean", "hd_std", "hd95_mean", "hd95_std",
                   "hd95_avg_mean", "hd95_avg_std", "asd_mean", "asd_std", "components_mean", "single_component_fraction", "holes_mean",
                   "same_topology_fraction")
TRANSFORMS_PER_CASE_COLUMNS = ("case", *TRANSFORM_METRIC_COLUMNS)
QUALITY_COLUMNS = ("case", "dice_itn_refine", "itn_outside_refine", "qc_score", "refine_dice", "flagged")

#: Every file name above (what ``tests/test_contracts.py`` looks for in the other modules).
FILE_NAMES = (DEFORMED_ATLAS_IMAGE, FORWARD_FIELD, INVERSE_FIELD, FORWARD_TRANSFORM, INVERSE_TRANSFORM, CASE_INFO,
              TRANSFORM_METRICS, SEGMENT_INFO, SEGMENT_MANIFEST, SEGMENT_PART_MANIFEST,
              SEGMENT_PART_INFO, RUN_CONFIG, FINAL_CHECKPOINT, LAST_CHECKPOINT, ATLAS_LABELMAP,
              ATLAS_PROBABILITIES, ATLAS_IMAGE, METRICS_PER_CASE, SUMMARY_CSV, SUMMARY_MD, EVALUATION_INFO,
              TRANSFORMS_PER_CASE, QUALITY_CONTROL, REPORT_HTML, REPORT_MD, REPORT_INFO, TEMPLATE_PROBABILITIES,
              TEMPLATE_LABELMAP, TEMPLATE_INFO, CROP_IMAGE, CROP_INFO)
#: Every folder name above.
FOLDER_NAMES = (CHECKPOINT_DIR, ATLAS_DIR, INITIAL_ATLAS_DIR, LOG_DIR, CACHE_DIR, FIGURE_DIR)
#: Every column tuple above.
COLUMN_TUPLES = (TRANSFORM_METRIC_COLUMNS, PER_CASE_COLUMNS, SUMMARY_COLUMNS, TRANSFORMS_PER_CASE_COLUMNS,
                 QUALITY_COLUMNS, SEGMENT_MANIFEST_COLUMNS)


# --------------------------------------------------------------------------------------------------
# folder paths


@dataclass(frozen=True)
class RunPaths:
    """The paths of a training run folder (see the module docstring)."""

    root: Path
    config: Path
    final_checkpoint: Path
    checkpoints: Path
    last_checkpoint: Path
    atlas: Path
    atlas_initial: Path
    logs: Path
    cache: Path


def run_paths(folder: str | Path) -> RunPaths:
    """The files and folders of the training run folder `folder` (nothing is created or checked)."""
    root = Path(folder)
    return RunPaths(root, root / RUN_CONFIG, root / FINAL_CHECKPOINT, root / CHECKPOINT_DIR,
                    root / CHECKPOINT_DIR / LAST_CHECKPOINT, root / ATLAS_DIR, root / INITIAL_ATLAS_DIR,
                    root / LOG_DIR, root / CACHE_DIR)


@dataclass(frozen=True)
class AtlasPaths:
    """The files of an atlas folder (see the module docstring)."""

    labelmap: Path
    probabilities: Path
    image: Path


def atlas_paths(folder: str | Path) -> AtlasPaths:
    """The files of the atlas folder `folder` (nothing is checked)."""
    folder = Path(folder)
    return AtlasPaths(folder / ATLAS_LABELMAP, folder / ATLAS_PROBABILITIES, folder / ATLAS_IMAGE)


@dataclass(frozen=True)
class TemplatePaths:
    """The files of a DeepATLAS template folder (see the module docstring)."""

    probabilities: Path
    labelmap: Path
    info: Path


def template_paths(folder: str | Path) -> TemplatePaths:
    """The files of the template folder `folder` (nothing is checked)."""
    folder = Path(folder)
    return TemplatePaths(folder / TEMPLATE_PROBABILITIES, folder / TEMPLATE_LABELMAP, folder / TEMPLATE_INFO)


@dataclass(frozen=True)
class EvaluationPaths:
    """The files of an evaluation folder (see the module docstring)."""

    metrics_per_case: Path
    summary_csv: Path
    summary_md: Path
    info: Path
    transforms_per_case: Path
    quality_control: Path


def evaluation_paths(folder: str | Path) -> EvaluationPaths:
    """The files of the evaluation folder `folder` (nothing is checked)."""
    folder = Path(folder)
    return EvaluationPaths(folder / METRICS_PER_CASE, folder / SUMMARY_CSV, folder / SUMMARY_MD,
                           folder / EVALUATION_INFO, folder / TRANSFORMS_PER_CASE, folder / QUALITY_CONTROL)


# --------------------------------------------------------------------------------------------------
# labelmaps of a case folder


#: Input image extensions a case's labelmaps keep (:func:`labelmap_extension`).
KEPT_IMAGE_EXTENSIONS = (".png", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".bmp")
#: Lossy image formats: their labelmaps are written losslessly (JPEG would blur the label values).
LOSSLESS_FOR = {".jpg": ".png", ".jpeg": ".png"}


def labelmap_extension(image_path: str | Path | None) -> str:
    """The ``<ext>`` of a case's labelmaps: the input image's extension, lower case, ``.nii.gz`` kept
    whole, when it is one of :data:`KEPT_IMAGE_EXTENSIONS`; ``.png`` for a JPEG image
    (:data:`LOSSLESS_FOR`); ``.nii.gz`` for every other input: a DICOM
    series (its folder, a ``.dcm`` file or a file named by its UID; the NIfTI file then holds the
    series' geometry) and an image given in memory (no path, or an empty one)."""
    name = str(image_path or "").lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = Path(name).suffix
    if suffix in LOSSLESS_FOR:
        return LOSSLESS_FOR[suffix]
    return suffix if suffix in KEPT_IMAGE_EXTENSIONS else ".nii.gz"


def case_labelmap_path(case_dir: str | Path, output: str, ext: str) -> Path:
    """``case_dir/<output>_labelmap<ext>``; output: one of :data:`LABELMAP_OUTPUTS` (or another method
    name), ext: e.g. ``.png`` or ``.nii.gz`` (with its dot)."""
    return Path(case_dir) / f"{output}{LABELMAP_SUFFIX}{ext}"


def find_labelmap(case_dir: str | Path, output: str, prefer: str | None = None) -> Path | None:
    """The existing ``case_dir/<output>_labelmap<ext>`` for the first ``<ext>`` of
    :data:`LABELMAP_EXTENSIONS` (``prefer`` first, if it is one of them), or None if there is none."""
    extensions = list(LABELMAP_EXTENSIONS)
    if prefer in extensions:
        extensions.remove(prefer)
        extensions.insert(0, prefer)
    for ext in extensions:
        path = case_labelmap_path(case_dir, output, ext)
        if path.is_file():
            return path
    return None


# --------------------------------------------------------------------------------------------------
# YAML files


def _read_yaml(path: Path, what: str) -> dict:
    """The mapping of a YAML file (an empty file is ``{}``); AtlasregError naming it otherwise."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AtlasregError(f"cannot read {what} ({error.strerror or error})", path) from error
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = str(error).strip().splitlines()
        raise AtlasregError(f"{what} is not valid YAML ({detail[0] if detail else type(error).__name__})",
                            path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AtlasregError(f"{what} holds a {type(data).__name__}; expected a mapping", path)
    return data


def write_case_info(case_dir: str | Path, image: str | Path | None) -> Path:
    """Write :data:`CASE_INFO` into `case_dir`: ``image``, the absolute path of the input image (None
    for an image given in memory). Returns the file."""
    value = str(Path(image).resolve()) if image else None
    return _write_text(Path(case_dir) / CASE_INFO, yaml.safe_dump({"image": value}, sort_keys=False))


def read_case_info(case_dir: str | Path) -> dict | None:
    """The :data:`CASE_INFO` of a case folder as ``{"image": Path or None, ...}`` (other entries as
    written), or None when the folder has none. AtlasregError naming the file if it is unreadable, not
    YAML, not a mapping, or its image is not a string."""
    path = Path(case_dir) / CASE_INFO
    if not path.is_file():
        return None
    info = _read_yaml(path, "case information")
    image = info.get("image")
    if image is not None and not isinstance(image, str):
        raise AtlasregError(f"image = {image!r} is not a path", path)
    info["image"] = Path(image) if image else None
    return info


def write_segment_info(run_dir: str | Path, checkpoint: str | Path, refinement: Mapping,
                       checkpoint_sha256: str | None = None, status: str = COMPLETE,
                       cases: Sequence[str] | None = None, parts: int = 1) -> Path:
    """Write :data:`SEGMENT_INFO` into a segmentation run folder: ``checkpoint`` (made absolute),
    ``checkpoint_sha256``, ``refinement`` (the settings used, a plain mapping), ``status``
    (:data:`IN_PROGRESS` or :data:`COMPLETE`), ``cases`` (case names, sorted) and, when `parts` > 1
    (a run split into parts), ``parts``. Returns the file."""
    if status not in (IN_PROGRESS, COMPLETE):
        raise ValueError(f"status must be {IN_PROGRESS!r} or {COMPLETE!r}, got {status!r}")
    info = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": checkpoint_sha256,
            "refinement": dict(refinement), "status": status,
            "cases": sorted(str(c) for c in cases) if cases is not None else None}
    if parts > 1:
        info["parts"] = int(parts)
    return _write_text(Path(run_dir) / SEGMENT_INFO, yaml.safe_dump(info, sort_keys=False))


def read_segment_info(run_dir: str | Path) -> dict:
    """The :data:`SEGMENT_INFO` of a segmentation run folder as written (``checkpoint``, ``refinement``),
    or ``{}`` when it has none (a folder not written by ``atlasreg segment``). AtlasregError naming the
    file if it is unreadable, not YAML or not a mapping. (A run split into parts: its status is
    :func:`segment_run_status`'s.)"""
    path = Path(run_dir) / SEGMENT_INFO
    return _read_yaml(path, "segmentation settings") if path.is_file() else {}


def _check_part(part: int, parts: int) -> None:
    if not (isinstance(parts, int) and isinstance(part, int) and parts >= 1 and 0 <= part < parts):
        raise ValueError(f"part {part!r} of {parts!r}: expected parts >= 1 and 0 <= part < parts")


def segment_manifest_path(run_dir: str | Path, part: int = 0, parts: int = 1) -> Path:
    """The case manifest of a segmentation run folder: :data:`SEGMENT_MANIFEST`, or for part `part`
    (0-based) of `parts` > 1 :data:`SEGMENT_PART_MANIFEST`."""
    _check_part(part, parts)
    name = SEGMENT_MANIFEST if parts == 1 else SEGMENT_PART_MANIFEST.format(part=part, parts=parts)
    return Path(run_dir) / name


def segment_part_info_path(run_dir: str | Path, part: int, parts: int) -> Path:
    """The status file :data:`SEGMENT_PART_INFO` of part `part` (0-based) of `parts`."""
    _check_part(part, parts)
    return Path(run_dir) / SEGMENT_PART_INFO.format(part=part, parts=parts)


def write_segment_part_info(run_dir: str | Path, part: int, parts: int, status: str) -> Path:
    """Write :data:`SEGMENT_PART_INFO` of part `part` of `parts`: ``part``, ``parts``, ``status``
    (:data:`IN_PROGRESS` or :data:`COMPLETE`). Returns the file."""
    if status not in (IN_PROGRESS, COMPLETE):
        raise ValueError(f"status must be {IN_PROGRESS!r} or {COMPLETE!r}, got {status!r}")
    return _write_text(segment_part_info_path(run_dir, part, parts),
                       yaml.safe_dump({"part": part, "parts": parts, "status": status}, sort_keys=False))


def segment_run_status(run_dir: str | Path) -> tuple[str | None, list[int]]:
    """(status, unfinished parts) of a segmentation run folder: the ``status`` of its
    :data:`SEGMENT_INFO` (None without one) and ``[]``; for a run split into parts (``parts`` P > 1):
    :data:`COMPLETE` when the :data:`SEGMENT_PART_INFO` of every part 0..P-1 says complete, else
    :data:`IN_PROGRESS` and the parts whose file is missing or says otherwise. AtlasregError naming
    the file for an unreadable or malformed one."""
    info = read_segment_info(run_dir)
    parts = info.get("parts") or 1
    if not isinstance(parts, int) or parts < 1:
        raise AtlasregError(f"parts = {parts!r} is not an integer >= 1", Path(run_dir) / SEGMENT_INFO)
    if parts == 1:
        return info.get("status"), []
    unfinished = []
    for part in range(parts):
        path = segment_part_info_path(run_dir, part, parts)
        if not path.is_file() or _read_yaml(path, "segmentation part status").get("status") != COMPLETE:
            unfinished.append(part)
    return (IN_PROGRESS if unfinished else COMPLETE), unfinished


def segment_manifest_line(row: Mapping[str, object]) -> str:
    """One row of a case manifest (:data:`SEGMENT_MANIFEST_COLUMNS`) as a CSV line with its ``\\n``;
    ``seconds`` (float) written with ``repr``, the error flattened to one line."""
    row = dict(row)
    if row.get("error"):
        row["error"] = " ".join(str(row["error"]).split())
    return csv_text(SEGMENT_MANIFEST_COLUMNS, [row]).split("\n", 1)[1]


def start_segment_manifest(path: str | Path, rows: Iterable[Mapping[str, object]] = ()) -> Path:
    """Write a case manifest anew, atomically: the header and `rows` (:func:`segment_manifest_line`).
    Returns the file."""
    header = ",".join(SEGMENT_MANIFEST_COLUMNS) + "\n"
    return _write_text(path, header + "".join(segment_manifest_line(r) for r in rows))


def append_segment_manifest(path: str | Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Append rows to a case manifest in one write (:func:`atlasreg.data.io.append_text`: whole lines, a
    run killed around it leaves them all or none; flushed to the disk). The file must exist
    (:func:`start_segment_manifest`). Not for concurrent writers of one file (the caller holds a lock)."""
    from .data.io import append_text

    append_text(path, "".join(segment_manifest_line(r) for r in rows))


def read_segment_manifest(path: str | Path) -> list[dict]:
    """Rows of a case manifest (:data:`SEGMENT_MANIFEST` or a part's): ``case``, ``image``,
    ``status``, ``error`` as strings, ``seconds`` as float. An unfinished last line (no line end: a
    power loss during an append) is ignored. AtlasregError naming the file if it cannot be read, lacks
    a column or holds a status other than done, failed or skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise AtlasregError(f"cannot read the case manifest ({error.strerror or error})", path) from error
    except UnicodeDecodeError as error:
        raise AtlasregError(f"cannot read the case manifest ({error})", path) from None
    whole = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(whole))
    missing = [c for c in SEGMENT_MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise AtlasregError(f"case manifest lacks the column(s) {missing}", path)
    rows = []
    for line, record in enumerate(reader, start=2):
        status = record.get("status") or ""
        if status not in (DONE, FAILED, SKIPPED):
            raise AtlasregError(f"line {line}: status = {status!r} is not {DONE}, {FAILED} or {SKIPPED}", path)
        rows.append({"case": record.get("case") or "", "image": record.get("image") or "", "status": status,
                     "seconds": _float(record.get("seconds"), "seconds", line, path),
                     "error": record.get("error") or ""})
    return rows


def read_report_info(folder: str | Path) -> dict:
    """The :data:`REPORT_INFO` of a report folder, or ``{}`` when it has none. AtlasregError naming the
    file if it is unreadable, not YAML or not a mapping."""
    path = Path(folder) / REPORT_INFO
    return _read_yaml(path, "report information") if path.is_file() else {}


def write_report_info(folder: str | Path, evaluations: Sequence[str | Path], sensitivity: Sequence[str | Path],
                      provenance: Mapping | None = None) -> Path:
    """Write :data:`REPORT_INFO` (absolute folder paths; `provenance`, a YAML-safe mapping, under
    ``provenance`` when given). Returns the file."""
    info = {"evaluations": [str(Path(e).resolve()) for e in evaluations],
            "sensitivity": [str(Path(e).resolve()) for e in sensitivity]}
    if provenance is not None:
        info["provenance"] = dict(provenance)
    return _write_text(Path(folder) / REPORT_INFO, yaml.safe_dump(info, sort_keys=False, allow_unicode=True))


def write_template_info(folder: str | Path, info: Mapping) -> Path:
    """Write :data:`TEMPLATE_INFO` (a YAML-safe mapping, key order kept). Returns the file."""
    return _write_text(Path(folder) / TEMPLATE_INFO, yaml.safe_dump(dict(info), sort_keys=False, allow_unicode=True))


def read_template_info(folder: str | Path) -> dict:
    """The :data:`TEMPLATE_INFO` of a template folder, with ``labels`` as {int value: name} in the
    written order. AtlasregError naming the folder when it is no template folder (the file or the
    probabilities missing), naming the file when it is unreadable, not a mapping or its labels are not
    at least two {integer: name} entries."""
    folder = Path(folder)
    path = folder / TEMPLATE_INFO
    if not folder.is_dir():
        raise AtlasregError("template folder not found", folder)
    if not path.is_file() or not (folder / TEMPLATE_PROBABILITIES).is_file():
        raise AtlasregError(f"not a template folder (no {TEMPLATE_INFO} or {TEMPLATE_PROBABILITIES}; build one with "
                            "`atlasreg deepatlas template`)", folder)
    info = _read_yaml(path, "template information")
    labels = info.get("labels")
    if not isinstance(labels, Mapping) or len(labels) < 2:
        raise AtlasregError(f"labels = {labels!r} is not a mapping of at least two label values to names", path)
    try:
        info["labels"] = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise AtlasregError(f"labels = {labels!r}: a label value is not an integer", path) from None
    return info


def write_crop_info(case_dir: str | Path, info: Mapping) -> Path:
    """Write :data:`CROP_INFO` into a crop case folder (a YAML-safe mapping). Returns the file."""
    return _write_text(Path(case_dir) / CROP_INFO, yaml.safe_dump(dict(info), sort_keys=False))


def read_run_config(run_dir: str | Path) -> dict:
    """The :data:`RUN_CONFIG` of a training run folder as written (the validated config as a plain
    mapping, not validated again), or ``{}`` when the folder has none. AtlasregError naming the file if
    it is unreadable, not YAML or not a mapping."""
    path = Path(run_dir) / RUN_CONFIG
    return _read_yaml(path, "run configuration") if path.is_file() else {}


def write_evaluation_info(folder: str | Path, info: Mapping) -> Path:
    """Write :data:`EVALUATION_INFO` (a YAML-safe mapping, key order kept). Returns the file."""
    return _write_text(Path(folder) / EVALUATION_INFO, yaml.safe_dump(dict(info), sort_keys=False, allow_unicode=True))


def read_evaluation_info(folder: str | Path) -> dict:
    """The :data:`EVALUATION_INFO` of an evaluation folder, or ``{}`` when it has none. AtlasregError
    naming the file if it is unreadable, not YAML or not a mapping."""
    path = Path(folder) / EVALUATION_INFO
    return _read_yaml(path, "evaluation information") if path.is_file() else {}


# --------------------------------------------------------------------------------------------------
# CSV files


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> str:
    """CSV text with header `columns` and one line per row (a missing key is an empty cell); Python
    floats (and subclasses such as numpy.float64) written with ``repr``, everything else with ``str``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _float(text: str | None, column: str, line: int, path: Path) -> float:
    """A float cell: empty (or absent) is NaN; AtlasregError naming the file, line and column otherwise."""
    text = (text or "").strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise AtlasregError(f"line {line}: {column} = {text!r} is not a number", path) from None


def _int(text: str | None, column: str, line: int, path: Path) -> int:
    """An integer cell (``3`` or ``3.0``); AtlasregError naming the file, line and column otherwise."""
    value = _float(text, column, line, path)
    if not math.isfinite(value) or value != int(value):
        raise AtlasregError(f"line {line}: {column} = {(text or '').strip()!r} is not an integer", path)
    return int(value)


def _bool(text: str | None, column: str, line: int, path: Path) -> bool:
    """A boolean cell (``True``/``False``, as ``str(bool)`` writes; also ``1``/``0``)."""
    value = (text or "").strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise AtlasregError(f"line {line}: {column} = {(text or '').strip()!r} is not True or False", path)


def _str(text: str | None, column: str, line: int, path: Path) -> str:
    return text or ""


_Parser = Callable[[str | None, str, int, Path], object]


def _read_csv(path: str | Path, what: str, columns: Mapping[str, _Parser], rest: _Parser | None = None,
              optional: Sequence[str] = ()) -> list[dict]:
    """Rows of a CSV file with a header, each cell of `columns` parsed by its parser; other columns
    parsed by `rest` when given, else dropped. AtlasregError naming the file if it cannot be read, lacks
    one of `columns` (except those named in `optional`: parsed from empty cells, e.g. NaN) or holds a
    cell its parser rejects."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            missing = [c for c in columns if c not in header and c not in optional]
            if missing:
                raise AtlasregError(f"{what} file lacks the column(s) {missing}", path)
            raw = list(reader)
    except OSError as error:
        raise AtlasregError(f"cannot read {what} ({error.strerror or error})", path) from error
    except (csv.Error, UnicodeDecodeError) as error:
        raise AtlasregError(f"cannot read {what} ({error})", path) from None
    parsers = dict(columns)
    if rest is not None:
        parsers.update({c: rest for c in header if c not in columns and c is not None})
    return [{c: parse(record.get(c), c, line, path) for c, parse in parsers.items()}
            for line, record in enumerate(raw, start=2)]


def transform_metrics_csv(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Text of :data:`TRANSFORM_METRICS`: header :data:`TRANSFORM_METRIC_COLUMNS` and one row per
    transform; ``metrics``: transform name -> {column: value} (the columns after ``method``; a missing
    value is written empty). Floats are written with ``repr`` (full precision, ``nan`` for NaN)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TRANSFORM_METRIC_COLUMNS)
    for method, values in metrics.items():
        writer.writerow([method, *(repr(float(values[c])) if c in values else ""
                                   for c in TRANSFORM_METRIC_COLUMNS[1:])])
    return buffer.getvalue()


def write_transform_metrics(case_dir: str | Path, metrics: Mapping[str, Mapping[str, float]]) -> Path:
    """Write :func:`transform_metrics_csv` as the :data:`TRANSFORM_METRICS` of `case_dir`. Returns it."""
    return _write_text(Path(case_dir) / TRANSFORM_METRICS, transform_metrics_csv(metrics))


def read_transform_metrics(path: str | Path) -> list[dict[str, object]]:
    """Rows of a :data:`TRANSFORM_METRICS` file (give the file, not its folder): ``{"method": str,
    <metric>: float, ...}`` with the metric columns of :data:`TRANSFORM_METRIC_COLUMNS` (an empty cell
    is NaN; extra columns are ignored). Raises AtlasregError naming the file if it cannot be read,
    lacks a column or holds a non-numeric value."""
    columns = {c: _float for c in TRANSFORM_METRIC_COLUMNS}
    columns["method"] = _str
    return _read_csv(path, "transform metrics", columns)


_PER_CASE_TYPES: dict[str, _Parser] = {
    "case": _str, "method": _str, "label": _int, "structure": _str, "dice": _float, "hd": _float,
    "hd95": _float, "hd95_avg": _float, "asd": _float, "components": _int, "holes": _int, "reference_components": _int,
    "reference_holes": _int}
_QUALITY_TYPES: dict[str, _Parser] = {
    "case": _str, "dice_itn_refine": _float, "itn_outside_refine": _float, "qc_score": _float,
    "refine_dice": _float, "flagged": _bool}


def read_metrics_per_case(folder: str | Path) -> list[dict]:
    """Rows of an evaluation folder's :data:`METRICS_PER_CASE`: the columns of
    :data:`PER_CASE_COLUMNS`, ``case``, ``method`` and ``structure`` as strings, ``label`` and the
    component and hole counts as int, the metrics as float (an empty cell is NaN). Raises
    AtlasregError naming the folder when the file is missing (not an evaluation folder) and naming the
    file when it is malformed."""
    path = Path(folder) / METRICS_PER_CASE
    if not path.is_file():
        raise AtlasregError(f"not an evaluation folder (no {METRICS_PER_CASE})", folder)
    return _read_csv(path, "per-case metrics", _PER_CASE_TYPES, optional=("hd95_avg",))


def read_transforms_per_case(folder: str | Path) -> list[dict]:
    """Rows of an evaluation folder's :data:`TRANSFORMS_PER_CASE` (``[]`` when it has none): ``case``
    and ``method`` as strings, every other column (those of :data:`TRANSFORM_METRIC_COLUMNS`, and any
    other) as float. AtlasregError naming the file when it is malformed."""
    path = Path(folder) / TRANSFORMS_PER_CASE
    if not path.is_file():
        return []
    return _read_csv(path, "transforms per case", {"case": _str, "method": _str}, rest=_float)


def read_quality_control(folder: str | Path) -> list[dict]:
    """Rows of an evaluation folder's :data:`QUALITY_CONTROL` (``[]`` when it has none): ``case``
    (str), the scores (float) and ``flagged`` (bool). AtlasregError naming the file when malformed."""
    path = Path(folder) / QUALITY_CONTROL
    if not path.is_file():
        return []
    return _read_csv(path, "quality control", _QUALITY_TYPES)


def write_evaluation(folder: str | Path, per_case: Sequence[Mapping], summary: Sequence[Mapping],
                     transforms: Sequence[Mapping], quality: Sequence[Mapping], info: Mapping,
                     summary_md: str) -> EvaluationPaths:
    """Write an evaluation folder (created if needed), each file atomically: the rows of
    :data:`METRICS_PER_CASE`, :data:`SUMMARY_CSV` and :data:`TRANSFORMS_PER_CASE` (header only for no
    rows), :data:`QUALITY_CONTROL` when there are quality rows (an older one is removed when there are
    none), :data:`EVALUATION_INFO` and the Markdown `summary_md` as :data:`SUMMARY_MD`. Rows are
    mappings keyed by the columns of :data:`PER_CASE_COLUMNS`, :data:`SUMMARY_COLUMNS`,
    :data:`TRANSFORMS_PER_CASE_COLUMNS` and :data:`QUALITY_COLUMNS`. Returns the paths."""
    paths = evaluation_paths(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    _write_text(paths.metrics_per_case, csv_text(PER_CASE_COLUMNS, per_case))
    _write_text(paths.summary_csv, csv_text(SUMMARY_COLUMNS, summary))
    _write_text(paths.transforms_per_case, csv_text(TRANSFORMS_PER_CASE_COLUMNS, transforms))
    if quality:
        _write_text(paths.quality_control, csv_text(QUALITY_COLUMNS, quality))
    elif paths.quality_control.is_file():
        paths.quality_control.unlink()  # a stale file from an earlier evaluation into the same folder
    write_evaluation_info(folder, info)
    _write_text(paths.summary_md, summary_md)
    return paths
