"""Finding image/labelmap file pairs on disk and selecting subsets of cases.

Three layouts are supported by :func:`find_pairs`:

* a CSV file with columns ``image``, ``label`` (optional) and ``name`` (optional);
* two folders ``images/`` and ``labels/`` paired by file name (optionally after stripping suffixes),
  e.g. JSRT ``images/X.png`` + ``labels/X.png``;
* one folder holding both, told apart by suffixes before the extension, e.g. Letter-B
  ``B12_img.png`` + ``B12_seg.png`` (``image_suffix="_img"``, ``label_suffix="_seg"``, case ``B12``).

DICOM images (:mod:`atlasreg.data.io`, :func:`~atlasreg.data.io.read_dicom`) are cases too: a
subfolder holding DICOM files is one case named after the subfolder (``images/<case>/*.dcm``, one
series each); DICOM files directly in the scanned folder are one case each when each is an image of
its own (2D radiographs: ``images/<case>.dcm``, the name without ``.dcm``); and a scanned images
folder that holds one DICOM image and no other image is itself one case, named after the folder
(``atlasreg segment path/to/series/``). A folder whose own DICOM files make a volume beside other
images is refused, naming the series.
"""

from __future__ import annotations

import csv as _csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AtlasregError
from .io import DICOM_EXTENSIONS, describe_dicom_images, dicom_images, holds_dicom, is_dicom_file

__all__ = ["CasePair", "EXTENSIONS", "find_pairs", "select_cases", "natural_key", "split_extension", "dicom_stem"]

#: Supported image file extensions (matched case-insensitively; ``.nii.gz`` before ``.nii``).
EXTENSIONS = (".nii.gz", ".nii", ".png", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class CasePair:
    """One case: its name, image file and labelmap file (None when there is none, e.g. at test time)."""

    name: str
    image: Path
    label: Path | None


def split_extension(filename: str) -> tuple[str, str] | None:
    """``"B12_img.nii.gz" -> ("B12_img", ".nii.gz")``; None when the extension is not supported."""
    lower = filename.lower()
    for ext in EXTENSIONS:
        if lower.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)], filename[-len(ext):]
    return None


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded integers numerically: ``B2 < B10``, ``case9 < case10``."""
    parts = re.split(r"(\d+)", name)
    key = tuple((int(p), "") if i % 2 else (0, p.lower()) for i, p in enumerate(parts))
    return key + ((0, name),)


def _sorted(pairs: list[CasePair]) -> list[CasePair]:
    return sorted(pairs, key=lambda p: natural_key(p.name))


def _check_folder(folder: Path, what: str) -> Path:
    if not folder.exists():
        raise AtlasregError(f"{what} folder not found", folder)
    if not folder.is_dir():
        raise AtlasregError(f"{what} folder is not a folder", folder)
    return folder


def dicom_stem(name: str) -> str:
    """A DICOM file's or folder's name without ``.dcm`` / ``.dicom`` (any case): ``"IM12.dcm" -> "IM12"``;
    other names (a folder, a file named by its SOP Instance UID) whole."""
    lower = name.lower()
    for ext in DICOM_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _scan(folder: Path, suffix: str, exclude_suffix: str = "", whole_folder: bool = False) -> dict[str, list[Path]]:
    """Case name -> files in ``folder`` whose stem ends with ``suffix`` (hidden files skipped).
    Files whose stem ends with ``exclude_suffix`` (when it is longer than or not matched by
    ``suffix``) are left out. DICOM (module docstring): subfolders holding DICOM files and DICOM files
    that are images of their own count as files, named by :func:`dicom_stem`; with ``whole_folder``
    a folder holding one DICOM image and no other image is itself the one case (its name, no suffix
    rule). AtlasregError naming the folder when its own DICOM files make a volume beside other
    images (and the errors of :func:`~atlasreg.data.io.dicom_images`)."""
    found: dict[str, list[Path]] = {}
    own_dicom = False

    def add(stem: str, path: Path) -> None:
        if exclude_suffix and stem.endswith(exclude_suffix) and (
                not suffix or not stem.endswith(suffix) or len(exclude_suffix) > len(suffix)):
            return
        if suffix and not stem.endswith(suffix):
            return
        name = stem[: len(stem) - len(suffix)] if suffix else stem
        if name:
            found.setdefault(name, []).append(path)

    others = 0
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            if holds_dicom(f):
                others += 1
                add(dicom_stem(f.name), f)
            continue
        if not f.is_file():
            continue
        split = split_extension(f.name)
        if split is not None:
            others += 1
            add(split[0], f)
        elif is_dicom_file(f):
            own_dicom = True
    if not own_dicom:
        return found
    images = dicom_images(folder)
    if whole_folder and len(images) == 1 and not others:
        return {folder.name: [folder]}
    volumes = [image for image in images if len(image.files) > 1]
    if volumes and len(images) > 1 and not others:
        raise AtlasregError(describe_dicom_images(images), folder)
    if volumes:
        v = volumes[0]
        raise AtlasregError(f"holds the DICOM series {v.series} ({len(v.files)} files, e.g. {v.files[0].name}) "
                            f"among {len(images) + others} images; a series needs a folder of its own (one case "
                            "per folder)", folder)
    for image in images:
        add(dicom_stem(image.files[0].name), image.files[0])
    return found


def _unique(found: dict[str, list[Path]], what: str, folder: Path) -> dict[str, Path]:
    for name, files in sorted(found.items()):
        if len(files) > 1:
            names = ", ".join(sorted(f.name for f in files))
            raise AtlasregError(f"more than one {what} for case {name!r}: {names}", folder)
    return {name: files[0] for name, files in found.items()}


def _no_images(folder: Path, suffix: str) -> AtlasregError:
    return AtlasregError(
        f"no images found (looked for *{suffix} with extensions {', '.join(EXTENSIONS)}, DICOM files and "
        "folders of DICOM files)", folder)


def find_pairs(images: str | Path | None = None, labels: str | Path | None = None,
               csv: str | Path | None = None, image_suffix: str = "", label_suffix: str = "") -> list[CasePair]:
    """Find the cases (image file + labelmap file) of a data set, sorted naturally by name.

    * ``csv`` given (``images``/``labels`` must then be None): a CSV file with a header holding an
      ``image`` column, optionally ``label`` and ``name``. Relative paths are relative to the CSV's
      folder. Without a ``name`` column the name is the image file name without extension and
      ``image_suffix``. A ``label`` column that is entirely empty means "no labelmaps".
    * ``images`` and a different ``labels`` folder: images and labelmaps are paired by case name =
      file name without extension(s) (``.nii.gz`` counts as one) and without
      ``image_suffix``/``label_suffix``. Extensions may differ between the two.
    * ``images`` only (or ``labels`` the same folder) with a ``label_suffix``: one folder holding
      both; files whose name ends in ``label_suffix`` (before the extension) are labelmaps, files
      ending in ``image_suffix`` the images.
    * ``images`` only and no ``label_suffix``: images only (``label`` None), e.g. at test time.

    Supported extensions: .png .nii .nii.gz .nrrd .mha .mhd, and DICOM (module docstring: a folder of
    one series per case, a file per 2D image, or the images folder itself holding one series). Hidden
    files are ignored.

    Raises AtlasregError: folder or CSV missing; "no images found"; "no labelmap for image <path>"
    when labelmaps are expected; two files for one case name; CSV without an ``image`` column;
    CSV rows naming missing files; duplicate case names.
    """
    if csv is not None:
        if images is not None or labels is not None:
            raise AtlasregError("give either a CSV file or image/label folders, not both", csv)
        return _sorted(_pairs_from_csv(Path(csv), image_suffix))
    if images is None:
        raise AtlasregError("no images folder or CSV file given")

    images_dir = _check_folder(Path(images), "images")
    separate = labels is not None and Path(labels).resolve() != images_dir.resolve()

    if separate:
        labels_dir = _check_folder(Path(labels), "labels")
        imgs = _unique(_scan(images_dir, image_suffix, whole_folder=True), "image", images_dir)
        labs = _unique(_scan(labels_dir, label_suffix), "labelmap", labels_dir)
    else:
        if labels is not None and not label_suffix:
            raise AtlasregError(
                "images and labelmaps share this folder: set label_suffix (and image_suffix) to tell "
                "them apart", images_dir)
        if label_suffix and label_suffix == image_suffix:
            raise AtlasregError(
                f"image_suffix and label_suffix are both {label_suffix!r}; they must differ when images "
                "and labelmaps share a folder", images_dir)
        labels_dir = images_dir
        imgs = _unique(_scan(images_dir, image_suffix, exclude_suffix=label_suffix, whole_folder=not label_suffix),
                       "image", images_dir)
        labs = (_unique(_scan(images_dir, label_suffix, exclude_suffix=image_suffix), "labelmap", images_dir)
                if label_suffix else None)

    if not imgs:
        raise _no_images(images_dir, image_suffix)
    if labs is None:
        return _sorted([CasePair(n, p, None) for n, p in imgs.items()])

    missing = sorted((n for n in imgs if n not in labs), key=natural_key)
    if missing:
        first = imgs[missing[0]]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AtlasregError(
            f"no labelmap for image {first}{more}: expected {missing[0]}{label_suffix}<ext> "
            f"in {labels_dir}")
    return _sorted([CasePair(n, p, labs[n]) for n, p in imgs.items()])


def _pairs_from_csv(csv_path: Path, image_suffix: str) -> list[CasePair]:
    if not csv_path.is_file():
        raise AtlasregError("CSV file not found", csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(_csv.reader(fh))
    except (OSError, UnicodeDecodeError, _csv.Error) as exc:
        raise AtlasregError(f"cannot read CSV: {exc}", csv_path) from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise AtlasregError("CSV is empty (expected a header with columns image[, label][, name])", csv_path)
    header = [c.strip().lower() for c in rows[0]]
    if "image" not in header:
        raise AtlasregError(
            f"CSV has no 'image' column (header: {', '.join(rows[0])}); expected columns image[, label][, name]",
            csv_path)
    col = {k: header.index(k) for k in ("image", "label", "name") if k in header}
    body = rows[1:]
    if not body:
        raise AtlasregError("no images found: the CSV lists no cases", csv_path)

    def cell(row: list[str], key: str) -> str:
        i = col.get(key)
        return row[i].strip() if i is not None and i < len(row) else ""

    base = csv_path.parent
    has_labels = "label" in col and any(cell(r, "label") for r in body)
    pairs: list[CasePair] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(body, start=2):
        img_s = cell(row, "image")
        if not img_s:
            raise AtlasregError(f"row {lineno}: empty image entry", csv_path)
        img = Path(img_s) if Path(img_s).is_absolute() else base / img_s
        if not img.is_file() and not holds_dicom(img):
            raise AtlasregError(f"row {lineno}: image file {img} not found", csv_path)
        lab = None
        if has_labels:
            lab_s = cell(row, "label")
            if not lab_s:
                raise AtlasregError(f"row {lineno}: no labelmap for image {img}", csv_path)
            lab = Path(lab_s) if Path(lab_s).is_absolute() else base / lab_s
            if not lab.is_file():
                raise AtlasregError(f"row {lineno}: labelmap file {lab} not found", csv_path)
        name = cell(row, "name")
        if not name:
            split = split_extension(img.name)
            name = split[0] if split else dicom_stem(img.name) if img.is_dir() or is_dicom_file(img) else img.stem
            if image_suffix and name.endswith(image_suffix) and len(name) > len(image_suffix):
                name = name[: -len(image_suffix)]
        if name in seen:
            raise AtlasregError(f"row {lineno}: case name {name!r} already used in row {seen[name]}", csv_path)
        seen[name] = lineno
        pairs.append(CasePair(name, img, lab))
    return pairs


_RANGE = re.compile(r"^(.*?)(\d+)\s*-\s*(.*?)(\d+)$")


def select_cases(pairs: list[CasePair], spec) -> list[CasePair]:
    """Select a subset of cases.

    ``spec``:

    * None: all cases;
    * a range string ``"B1-B900"`` (also ``"B1-900"``): the cases named prefix + integer with the
      integer in the inclusive range (leading zeros allowed), in input order; an exact case name is
      also accepted as a string;
    * a list of names: those cases, in the list's order (duplicates dropped);
    * ``{"fraction": [a, b], "seed": s}`` (seed defaults to 0): a deterministic random split; the
      cases (sorted naturally by name) are shuffled with a permutation seeded by ``s`` and the slice
      ``[round(a n), round(b n))`` is taken, returned in input order. Specs with the same seed and
      adjoining fractions (``[0, 0.8]`` / ``[0.8, 1]``) are disjoint and together cover all cases.
      With ``"group": regex`` the fraction is taken of groups, not cases: cases whose names give the
      same match (its group 1 if it has one; e.g. ``'^patient\\d+'``) stay on one side of a split
      (both frames of a patient); a name that does not match is its own group.

    Raises AtlasregError: unknown names (listing up to 5); a range or fraction that selects no case;
    a malformed spec.
    """
    pairs = list(pairs)
    if spec is None:
        return pairs
    by_name = {p.name: p for p in pairs}

    if isinstance(spec, str):
        spec = spec.strip()
        if spec in by_name:
            return [by_name[spec]]
        m = _RANGE.match(spec)
        if m is None:
            raise AtlasregError(
                f"unknown case name {spec!r} (a range looks like 'B1-B900'; a list of names is also accepted)")
        prefix, lo, prefix2, hi = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if prefix2 not in ("", prefix):
            raise AtlasregError(f"case range {spec!r}: the two ends have different prefixes "
                                f"({prefix!r} and {prefix2!r})")
        if lo > hi:
            raise AtlasregError(f"case range {spec!r}: start {lo} is after end {hi}")
        pat = re.compile(re.escape(prefix) + r"(\d+)$")
        out = []
        for p in pairs:
            mm = pat.fullmatch(p.name)
            if mm and lo <= int(mm.group(1)) <= hi:
                out.append(p)
        if not out:
            raise AtlasregError(f"case range {spec!r} matches none of the {len(pairs)} cases")
        return out

    if isinstance(spec, dict):
        unknown_keys = set(spec) - {"fraction", "seed", "group"}
        if "fraction" not in spec or unknown_keys:
            raise AtlasregError(f"case selection {spec!r}: expected {{'fraction': [a, b], 'seed': s}}")
        frac = spec["fraction"]
        try:
            a, b = (float(x) for x in frac)
        except (TypeError, ValueError):
            raise AtlasregError(f"case selection fraction {frac!r}: expected two numbers [a, b]") from None
        if not (0.0 <= a <= b <= 1.0) or math.isnan(a) or math.isnan(b):
            raise AtlasregError(f"case selection fraction {frac!r}: need 0 <= a <= b <= 1")
        try:
            seed = int(spec.get("seed", 0))
        except (TypeError, ValueError):
            raise AtlasregError(f"case selection seed {spec.get('seed')!r}: expected an integer") from None
        group = spec.get("group")
        if group is None:
            keys = [p.name for p in pairs]
        else:
            try:
                pattern = re.compile(str(group))
            except re.error as e:
                raise AtlasregError(f"case selection group {group!r}: not a regular expression ({e})") from None
            keys = []
            for p in pairs:
                m = pattern.search(p.name)
                keys.append(p.name if m is None else (m.group(1) if pattern.groups else m.group(0)))
        units = sorted(set(keys), key=natural_key)
        n = len(units)
        perm = np.random.default_rng(seed).permutation(n)
        start, stop = int(round(a * n)), int(round(b * n))
        chosen_units = {units[int(j)] for j in perm[start:stop]}
        chosen = {i for i, k in enumerate(keys) if k in chosen_units}
        if not chosen:
            raise AtlasregError(f"case selection fraction {frac!r} of {n} cases selects no case")
        return [p for i, p in enumerate(pairs) if i in chosen]

    if isinstance(spec, (list, tuple)):
        names = [str(s) for s in spec]
        unknown = [s for s in names if s not in by_name]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise AtlasregError(f"unknown case names: {shown}")
        out, seen = [], set()
        for s in names:
            if s not in seen:
                seen.add(s)
                out.append(by_name[s])
        return out

    raise AtlasregError(f"case selection {spec!r}: expected None, a range 'B1-B900', a list of names or "
                        "{'fraction': [a, b], 'seed': s}")
