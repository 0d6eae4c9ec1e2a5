"""Shared test fixtures: small DICOM files written with SimpleITK (GDCM), as in SimpleITK's "DICOM series
from array" example: one file per slice with the tags of a series (SeriesInstanceUID, ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, SliceThickness, InstanceNumber), written with KeepOriginalImageUIDOn."""

from __future__ import annotations

import contextlib
import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: UID root of the test files (the one SimpleITK's example uses: GDCM's).
UID_ROOT = "1.2.826.0.1.3680043.2.1125"


@contextlib.contextmanager
def _locale_kept():
    """GDCM's writer leaves the process's C locale at "C" after writing a file that has
    ImagePositionPatient (measured with SimpleITK 2.5.7: Python's default text encoding turns ASCII, and
    later tests that read UTF-8 text fail); reading does not. Put the locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _decimal(values) -> str:
    """A DICOM multi-valued decimal string (VR DS, at most 16 characters a value)."""
    return "\\".join(f"{float(v):.10g}" for v in values)


def _tags(series_uid: str, rescale: tuple[float, float] | None, modality: str) -> dict[str, str]:
    tags = {"0008|0060": modality, "0020|000e": series_uid, "0020|000d": series_uid + ".0",
            "0008|103e": "atlasreg test"}
    if rescale is not None:  # a float array stored as 16-bit integers: value = slope * stored + intercept
        slope, intercept = rescale
        tags.update({"0028|1053": _decimal([slope]), "0028|1052": _decimal([intercept]), "0028|0100": "16",
                     "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
    return tags


def write_dicom_series(folder, array, spacing, origin, direction, series_uid: str = UID_ROOT + ".1",
                       thickness: float | None = None, names=None, rescale: tuple[float, float] | None = None,
                       positions=None) -> sitk.Image:
    """Write `array` (z, y, x; int16, or float with `rescale` = (slope, intercept)) as one DICOM file per
    slice in `folder` (created), with spacing (x, y, z) mm, origin (mm) and direction (row-major 3x3) of
    the volume. `thickness`: SliceThickness (default the z spacing); `names`: the file names, slice by
    slice (default ``slice<k>.dcm``); `positions`: ImagePositionPatient of each slice (default from
    the geometry). Returns the volume as a SimpleITK image with that geometry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.asarray(array))
    volume.SetSpacing(tuple(float(s) for s in spacing))
    volume.SetOrigin(tuple(float(o) for o in origin))
    volume.SetDirection(tuple(float(d) for d in np.asarray(direction, dtype=np.float64).ravel()))
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # also for file names without .dcm
    tags = _tags(series_uid, rescale, "CT")
    for k in range(volume.GetDepth()):
        slice_ = volume[:, :, k]
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        position = positions[k] if positions is not None else volume.TransformIndexToPhysicalPoint((0, 0, k))
        slice_.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")  # SOP Instance UID
        slice_.SetMetaData("0020|0032", _decimal(position))
        slice_.SetMetaData("0020|0037", _decimal([*d[:, 0], *d[:, 1]]))
        slice_.SetMetaData("0028|0030", _decimal([spacing[1], spacing[0]]))  # row spacing, column spacing
        slice_.SetMetaData("0018|0050", _decimal([thickness if thickness is not None else spacing[2]]))
        slice_.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / (names[k] if names is not None else f"slice{k:03d}.dcm")))
        with _locale_kept():
            writer.Execute(slice_)
    return volume


def write_dicom_image(path, array, spacing, origin=None, row=(1.0, 0.0, 0.0), column=(0.0, 1.0, 0.0),
                      series_uid: str = UID_ROOT + ".2", modality: str = "DX") -> Path:
    """Write the 2D `array` (y, x; uint16) as a single-frame DICOM file at `path` (a radiograph): pixel
    spacing (x, y) mm; with `origin` (3 values, mm), ImagePositionPatient = origin and
    ImageOrientationPatient = (`row`, `column`) direction cosines; without, neither tag (as many
    radiographs). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing))
    for key, value in _tags(series_uid, None, modality).items():
        image.SetMetaData(key, value)
    image.SetMetaData("0008|0018", series_uid + ".1")
    image.SetMetaData("0028|0030", _decimal([spacing[1], spacing[0]]))
    if origin is not None:
        image.SetMetaData("0020|0032", _decimal(origin))
        image.SetMetaData("0020|0037", _decimal([*row, *column]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # also for file names without .dcm
    writer.SetFileName(str(path))
    with _locale_kept():
        writer.Execute(image)
    return path
