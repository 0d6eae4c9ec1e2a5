"""Segmentation of new images with a trained Atlas-ISTN: ITN, 1-pass and refined labelmaps, transforms
and the deformed atlas image, all written on each input's own grid and geometry.

Output contract: one case folder per case ``<out>/<case>/`` (written all or nothing: the labelmaps of
each output, the deformed atlas image, the transforms of the final registration as displacement
fields and ITK composites, the case information and the transform metrics), described with its file
names, units and geometry, readers and writers in :mod:`atlasreg.contracts`. Which files exist
depends on the model's method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from .contracts import (  # noqa: F401 - the case folder's names, re-exported
    DEFORMED_ATLAS_IMAGE, FORWARD_FIELD, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM, LABELMAP_OUTPUTS,
    TRANSFORM_OUTPUTS, transform_metrics_csv,
)
from .config import validate_section
from .data.cases import Preprocessing, case_name, load_case
from .data.dataset import find_pairs
from .errors import AtlasregError
from .export import world_transforms, write_case_outputs  # noqa: F401 - re-exported
from .models.registry import Method
from .predict import predict_cases, segment_cases, transform_statistics  # noqa: F401


def collect_inputs(inputs: Sequence[str | Path], image_suffix: str = "") -> list[tuple[str, Path]]:
    """(case name, image file) for a list of files and/or folders. In folders, every image file whose
    name ends with `image_suffix` before the extension (e.g. '_img'); the suffix is dropped from the
    case name. Raises AtlasregError for a missing path, no images, or colliding case names."""
    found: list[tuple[str, Path]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found.extend((p.name, p.image) for p in find_pairs(item, image_suffix=image_suffix))
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
    return found


def segment(module: Method, inputs: Iterable[str | Path], out_dir: str | Path,
            refinement: dict | None = None, progress: bool = True, image_suffix: str = "") -> list[Path]:
    """Segment every input image (files or folders) and write the outputs under out_dir.

    All inputs are read and checked before anything is written; a bad input raises AtlasregError
    naming the file. Cases are then read again `cases_at_once` at a time, so peak memory does not grow
    with the number of inputs. refinement: overrides of config['refinement'] (iterations, lr, beta, gamma,
    lambda, cases_at_once), validated as config values (ConfigError naming the key) before anything is
    read or written. Returns the case output folders."""
    cfg = module.config
    ref = validate_section("refinement", refinement or {}, cfg["refinement"])  # before anything is written
    labels = list(cfg["data"]["labels"].keys())
    grid = module.net.grid
    prep = Preprocessing.from_config(cfg)
    files = collect_inputs(list(inputs), image_suffix)

    def read(name, path):
        return load_case(path, None, prep, name=name)

    # Every input is read and checked before anything is written, but not kept: cases are read again
    # chunk by chunk below, so memory does not grow with the number of inputs (reading is about 2% of
    # the time of a refined case).
    for name, path in tqdm(files, desc="checking", disable=not progress, leave=False):
        read(name, path)
    out_dir = Path(out_dir)  # created with the first case folder (atomic_directory): none if the first fails
    written = []
    chunk = max(1, int(ref["cases_at_once"]))
    bar = tqdm(total=len(files), desc="segmenting", unit="case", disable=not progress)
    for i in range(0, len(files), chunk):
        group = [read(name, path) for name, path in files[i:i + chunk]]
        for pred in predict_cases(module, group, ref):
            written.append(write_case_outputs(out_dir, pred.case, labels, grid, pred.itn, pred.transforms,
                                              module.atlas_labelmap, module.atlas_image,
                                              transform_metrics=pred.transform_metrics))
        bar.update(len(group))
    bar.close()
    return written
