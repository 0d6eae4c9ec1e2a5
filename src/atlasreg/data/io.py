"""Image and labelmap file I/O through SimpleITK (PNG, NIfTI .nii/.nii.gz, NRRD, MetaImage .mha/.mhd,
and DICOM: a folder of one series or one of its files, read with SimpleITK's GDCM series reader,
:func:`read_dicom`).

Every bad input raises :class:`~atlasreg.errors.AtlasregError` with a one-line message that names the
file and the problem. Writes are atomic: a reader never sees a half-written file or output folder.

Geometry follows ITK: ``size``, ``spacing`` and ``origin`` are in ITK order ``(x, y[, z])``;
spacing and origin are in world units (mm); ``direction`` is the row-major ``D x D`` direction
cosine matrix, flattened.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import secrets
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import AtlasregError

__all__ = [
    "read_image",
    "read_labelmap",
    "read_any",
    "read_dicom",
    "dicom_images",
    "DicomImage",
    "describe_dicom_images",
    "DICOM_EXTENSIONS",
    "is_dicom_file",
    "dicom_files",
    "holds_dicom",
    "verify_file",
    "read_transform_file",
    "check_dimension",
    "write_image",
    "atomic_directory",
    "atomic_file",
    "write_text",
    "append_text",
    "check_output_folder",
    "check_output_file",
    "remove_temporaries",
    "image_geometry",
    "same_geometry",
]

# Rec. 601 luma weights (as PIL's "L" conversion).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_INTEGER_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}
_FLOAT_IDS = {sitk.sitkFloat32, sitk.sitkFloat64}
_PNG_IDS = {sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkVectorUInt8, sitk.sitkVectorUInt16}


# --------------------------------------------------------------------------------------------------
# helpers


def _size_str(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _short_reason(exc: Exception) -> str:
    """One line out of SimpleITK's multi-line exception text."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "unrecognised or corrupt file format"
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown in SimpleITK"):
            continue
        line = re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*", "", line)
        line = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line)  # "PNGImageIO(0x55..): "
        line = re.sub(r"^\[\w+\]\s*", "", line)  # "[nrrd] "
        if line:
            lines.append(line)
    reason = lines[-1] if lines else (text.strip() or type(exc).__name__)
    return reason if len(reason) <= 200 else reason[:197] + "..."


def read_any(path) -> sitk.Image:
    """Read any image file, or a DICOM series (a folder, or one of its files: :func:`read_dicom`),
    mapping every failure to an AtlasregError naming ``path``; the bytes are verified first
    (:func:`verify_file`: truncated or corrupt NIfTI and MetaImage files)."""
    return _read_verified(path)[0]


def _read_verified(path) -> tuple[sitk.Image, bool]:
    """(image, True when a float NIfTI file stores NaN or +-Inf on disk): :func:`read_any`'s work."""
    p = Path(path)
    if not p.exists():
        raise AtlasregError("file not found", p)
    if p.is_dir():
        if not holds_dicom(p):
            raise AtlasregError("is a folder, not an image file (nor a folder of DICOM files)", p)
        return read_dicom(p), False
    if is_dicom_file(p):
        return read_dicom(p), False
    try:
        nonfinite = _verify_bytes(p)
        with _native_stderr_held():  # libpng prints its warnings and errors on a corrupt PNG
            return sitk.ReadImage(str(p)), nonfinite
    except RuntimeError as exc:
        raise AtlasregError(f"cannot read image: {_short_reason(exc)}", p) from None
    except OSError as exc:  # e.g. permission denied
        raise AtlasregError(f"cannot read image: {exc.strerror or exc}", p) from None


def verify_file(path) -> bool:
    """Check that an image file holds the data its header describes, before SimpleITK reads it: ITK's
    NIfTI reader fills a truncated .nii or .nii.gz with zeros and raises no error (issue 14), and its
    MetaImage reader prints to stderr and gives a misleading reason.

    NIfTI-1/2 (.nii, .nii.gz; gzip recognised by its magic number, so uncompressed bytes under
    .nii.gz are read as ITK does): the whole stream is decompressed (the gzip CRC-32 and length are
    checked) and the payload counted against ``prod(dim[1..dim[0]]) * bitpix / 8`` bytes after
    ``vox_offset`` (the header parsed by nibabel). MetaImage (.mha, .mhd): the data bytes (``ElementDataFile``, LOCAL or one file
    beside the header) against ``prod(DimSize) * ElementNumberOfChannels * sizeof(ElementType)``, or
    ``CompressedDataSize`` for compressed data. Other formats, and headers these checks do not
    understand, are left to SimpleITK (its NRRD and PNG readers report truncation themselves).

    Returns True when a float NIfTI payload holds NaN or +-Inf (which ITK 5 reads as 0).

    Raises AtlasregError (one line naming the file): "truncated: N of the M data bytes its header
    describes"; "corrupt gzip stream (<reason>)"; "cannot read image: <reason>" (e.g. permission)."""
    p = Path(path)
    try:
        return _verify_bytes(p)
    except OSError as exc:
        raise AtlasregError(f"cannot read image: {exc.strerror or exc}", p) from None


def _verify_bytes(path: Path) -> bool:
    """:func:`verify_file`; returns True when a float NIfTI payload holds NaN or +-Inf."""
    name = path.name.lower()
    if _is_nifti(path):
        return _verify_nifti(path)
    if name.endswith((".mha", ".mhd")):
        _verify_metaimage(path)
    return False


def _is_nifti(path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nifti_layout(hdr: bytes) -> tuple[np.dtype | None, int, int] | None:
    """(float dtype of the voxels or None, offset of the payload, payload bytes) from the first bytes
    of a NIfTI-1 or NIfTI-2 file (either byte order), parsed by nibabel's header classes; None when
    they are not a header we understand."""
    import nibabel as nib  # imported here: only NIfTI files need it

    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        if len(hdr) < klass.sizeof_hdr:
            continue
        try:
            # from the header block only (from_fileobj would read and judge the extensions too)
            header = klass(binaryblock=hdr[:klass.sizeof_hdr], check=False)
            if int(header["sizeof_hdr"]) != klass.sizeof_hdr:
                continue
            dims = [int(d) for d in header["dim"]]
            bitpix = int(header["bitpix"])
            dtype = header.get_data_dtype()
        except Exception:  # noqa: BLE001 - a header nibabel cannot parse: SimpleITK judges
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0 or bitpix % 8:
            return None
        vox_offset = float(header["vox_offset"])
        offset = max(int(vox_offset) if np.isfinite(vox_offset) else 0,
                     klass.sizeof_hdr + (4 if klass is nib.Nifti1Header else 0))
        nbytes = int(np.prod(dims[1:ndim + 1], dtype=object)) * (bitpix // 8)
        # float32, float64, and complex64 / complex128 read as pairs of their float parts
        if dtype.kind == "c":
            dtype = np.dtype(f"{dtype.byteorder}f{dtype.itemsize // 2}")
        return (dtype if dtype.kind == "f" and dtype.itemsize in (4, 8) else None), offset, nbytes
    return None


_CHUNK = 1 << 24


def _verify_nifti(path: Path) -> bool:
    """Decompress (when gzip) and count a NIfTI file's payload; True when a float payload holds NaN or
    +-Inf. Needed because ITK 5.x's NIfTI reader silently replaces non-finite voxels by 0 (fixed in
    ITK 6, InsightSoftwareConsortium/ITK#6683) and fills a truncated payload with zeros, so the check
    must look at the bytes on disk. Raises AtlasregError for a truncated file or a corrupt gzip stream."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    got, nbytes, nonfinite, layout = 0, 0, False, None
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            hdr = fh.read(544)
            layout = _nifti_layout(hdr)
            if layout is None:
                return False  # not a header we understand: SimpleITK judges
            dtype, offset, nbytes = layout
            if not compressed and dtype is None:  # nothing to decode: the file's size tells
                got = min(nbytes, max(0, path.stat().st_size - offset))
                pending, nbytes_to_read = b"", 0
            else:
                pending, nbytes_to_read = hdr[offset:], nbytes
            skip = max(0, offset - len(hdr)) if nbytes_to_read else 0
            while skip:
                n = len(fh.read(min(skip, _CHUNK)))
                if not n:
                    break
                skip -= n
            tail = b""
            while got < nbytes_to_read:
                buf = pending or fh.read(min(_CHUNK, nbytes - got))
                pending = b""
                if not buf:
                    break
                buf = buf[: nbytes - got]
                got += len(buf)
                if dtype is not None and not nonfinite:
                    buf = tail + buf
                    usable = len(buf) // dtype.itemsize * dtype.itemsize
                    tail = buf[usable:]
                    nonfinite = not np.all(np.isfinite(np.frombuffer(buf[:usable], dtype=dtype)))
            if compressed:
                while fh.read(_CHUNK):  # to the end of the stream: gzip checks its CRC-32 and length
                    pass
    except EOFError:
        if layout is None:  # the stream ends within the first 544 bytes: before the header was read
            raise AtlasregError("truncated: the gzip stream ends within its NIfTI header", path) from None
        raise AtlasregError(f"truncated: the gzip stream ends after {got} of the {nbytes} data bytes its "
                            "header describes", path) from None
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise AtlasregError(f"corrupt gzip stream ({exc})", path) from None
    if got < nbytes:
        raise AtlasregError(f"truncated: {got} of the {nbytes} data bytes its header describes", path)
    return nonfinite


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _verify_hdf5(path: Path) -> None:
    """Compare an HDF5 file's size with the end-of-file address its superblock records (formats 0-3;
    the superblock at offset 0 or after a user block of 512 * 2^k bytes). AtlasregError "truncated" when
    the file is shorter; files without a superblock we understand are left to the reader."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        offset = 0
        while offset + 64 <= size:
            fh.seek(offset)
            block = fh.read(64)
            if block[:8] == _HDF5_SIGNATURE:
                break
            offset = 512 if offset == 0 else 2 * offset
        else:
            return
    version = block[8]
    if version in (0, 1):
        n_offset, start = block[13], 24 if version == 0 else 28
    elif version in (2, 3):
        n_offset, start = block[9], 12
    else:
        return
    if n_offset not in (2, 4, 8) or start + 3 * n_offset > len(block):
        return
    fmt = {2: "<H", 4: "<I", 8: "<Q"}[n_offset]
    base = struct.unpack_from(fmt, block, start)[0]
    end = struct.unpack_from(fmt, block, start + 2 * n_offset)[0]
    undefined = 2 ** (8 * n_offset) - 1
    if base == undefined or end == undefined:
        return
    needed = base + end  # addresses are relative to the base address (absolute)
    if size < needed:
        raise AtlasregError(f"truncated: {size} of the {needed} bytes its HDF5 superblock describes", path)


_NATIVE_OUTPUT_AT_EXIT_SILENCED = False


def _silence_native_output_at_exit() -> None:
    """After a failed HDF5 read ITK leaves the file open, and the HDF5 library prints 'infinite loop
    closing library' and a line of its interfaces when the process exits (after our one-line error):
    point the stderr descriptor at /dev/null when Python has finished, once, only then."""
    global _NATIVE_OUTPUT_AT_EXIT_SILENCED
    if _NATIVE_OUTPUT_AT_EXIT_SILENCED:
        return
    _NATIVE_OUTPUT_AT_EXIT_SILENCED = True
    import atexit

    def silence():
        with contextlib.suppress(OSError, ValueError):
            import sys
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)

    atexit.register(silence)


@contextlib.contextmanager
def _native_stderr_held(hdf5: bool = False) -> Iterator[None]:
    """Hold back what native libraries print to the stderr descriptor inside the block (libpng's
    "libpng warning: ..." / "libpng error: ..." lines, HDF5's error stack of tens of lines): dropped when
    the block raises (the caller's one-line AtlasregError says what went wrong), written out when it
    succeeds. hdf5: the block reads an HDF5 file (see :func:`_silence_native_output_at_exit`)."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr descriptor to hold: run as it is
        yield
        return
    held = tempfile.TemporaryFile()
    failed = True
    try:
        os.dup2(held.fileno(), 2)
        yield
        failed = False
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if failed:
            if hdf5:
                _silence_native_output_at_exit()
        else:
            held.seek(0)
            text = held.read()
            if text:
                os.write(2, text)
        held.close()


def read_transform_file(path) -> sitk.Transform:
    """``sitk.ReadTransform(path)`` for a file that exists, with the HDF5 file of a ``.h5`` transform
    checked against its superblock first (AtlasregError "truncated", naming the file) and what the
    HDF5 library prints to the stderr descriptor (its error stack) dropped when the read fails (the
    RuntimeError propagates, for the caller's one-line message)."""
    p = Path(path)
    hdf5 = p.suffix.lower() in (".h5", ".hdf5", ".hdf")
    if hdf5:
        try:
            _verify_hdf5(p)
        except OSError as exc:
            raise AtlasregError(f"cannot read transform: {exc.strerror or exc}", p) from None
    with _native_stderr_held(hdf5):
        return sitk.ReadTransform(str(p))


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _verify_metaimage(path: Path) -> None:
    """Compare a MetaImage's data bytes with its header (see :func:`verify_file`); headers with other
    layouts (HeaderSize, lists or patterns of data files, unknown element types) are left to SimpleITK."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    fields: dict[str, str] = {}
    offset = None
    pos = 0
    for line in head.split(b"\n"):
        pos += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            offset = pos
            break
    if offset is None or fields.get("HeaderSize", "0") != "0":
        return
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        itemsize = _MET_SIZES[fields["ElementType"]]
    except (KeyError, ValueError):
        return
    data = fields["ElementDataFile"]
    if data == "LOCAL":
        data_path, size = path, path.stat().st_size - offset
    else:
        if data.upper().startswith("LIST") or "%" in data or " " in data:
            return
        data_path = path.parent / data
        if not data_path.is_file():
            raise AtlasregError(f"data file {data} named by its header not found", path)
        size = data_path.stat().st_size
    if fields.get("CompressedData", "False").lower() == "true":
        expected = int(fields["CompressedDataSize"]) if fields.get("CompressedDataSize", "").isdigit() else 0
    else:
        expected = int(np.prod(dims, dtype=object)) * channels * itemsize
    if size < expected:
        raise AtlasregError(f"truncated: {size} of the {expected} data bytes its header describes", data_path)


def _scalar_from_array(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr, isVector=False)
    out.SetSpacing(like.GetSpacing())
    out.SetOrigin(like.GetOrigin())
    out.SetDirection(like.GetDirection())
    return out


def _close(a: Sequence[float], b: Sequence[float], tol: float, floor: float) -> bool:
    """Elementwise ``|a - b| <= tol * max(|a|, |b|, floor)``."""
    if len(a) != len(b):
        return False
    a_ = np.asarray(a, dtype=np.float64)
    b_ = np.asarray(b, dtype=np.float64)
    scale = np.maximum(floor, np.maximum(np.abs(a_), np.abs(b_)))
    return bool(np.all(np.abs(a_ - b_) <= tol * scale))


def _geometry_difference(a: sitk.Image, b: sitk.Image, tol: float) -> str | None:
    """Describe the first geometry difference between a and b (None when they agree).

    Relative tolerance ``tol``: spacing relative to its magnitude; origin relative to its magnitude
    but at least to the largest voxel spacing (so an origin near 0 is compared in voxels); direction
    cosines absolutely.
    """
    if a.GetSize() != b.GetSize():
        return f"size {_size_str(a.GetSize())} vs {_size_str(b.GetSize())}"
    spacing_scale = float(max(max(a.GetSpacing()), max(b.GetSpacing())))
    checks = (("spacing", a.GetSpacing(), b.GetSpacing(), 0.0),
              ("origin", a.GetOrigin(), b.GetOrigin(), spacing_scale),
              ("direction", a.GetDirection(), b.GetDirection(), 1.0))
    for what, va, vb, floor in checks:
        if not _close(va, vb, tol, floor):
            return f"{what} {_fmt(va)} vs {_fmt(vb)}"
    return None


# --------------------------------------------------------------------------------------------------
# DICOM

#: File name extensions of DICOM files (matched case-insensitively). A file without one of them is
#: DICOM when it carries the Part 10 preamble ("DICM" at byte 128), as most PACS exports (e.g. files
#: named by their SOP Instance UID) do.
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: Files that are never images: the index of a DICOM medium.
_NOT_IMAGE_NAMES = ("dicomdir",)
#: Image formats read without GDCM (their files are never taken for DICOM).
_OTHER_FORMATS = (".nii.gz", ".nii", ".png", ".nrrd", ".nhdr", ".mha", ".mhd", ".jpg", ".jpeg", ".bmp", ".tif",
                  ".tiff", ".h5", ".tfm")
#: The slices of a DICOM volume must be evenly spaced along the slice normal: every step between
#: neighbouring slices (ImagePositionPatient, mm) within this fraction of their mean step, and no step
#: moving across the slice plane by more than this fraction of it (SimpleITK's series reader gives a
#: volume the mean step as its slice spacing and cannot represent a shear).
DICOM_SPACING_TOLERANCE = 0.01
#: Positions (mm) closer than this are one position.
_SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class DicomImage:
    """One image of a folder of DICOM files: ``series``, its SeriesInstanceUID (0020,000E); ``files``,
    the files that make it, in the order of SimpleITK's series reader (GDCM: by position along the
    slice normal). Several files: the slices of a volume; one file: a 2D image (a radiograph, a single
    slice) or a multi-frame file."""

    series: str
    files: tuple[Path, ...]


def is_dicom_file(path) -> bool:
    """True for a visible file named ``*.dcm`` or ``*.dicom`` (:data:`DICOM_EXTENSIONS`, any case), or
    one with the DICOM Part 10 preamble ("DICM" at byte 128) whose name has none of the extensions of
    the other image formats; False for ``DICOMDIR`` (an index, not an image) and for what cannot be
    read. Says nothing of whether GDCM can read the file (:func:`dicom_images` does)."""
    p = Path(path)
    name = p.name.lower()
    if name.startswith(".") or name in _NOT_IMAGE_NAMES or name.endswith(_OTHER_FORMATS) or not p.is_file():
        return False
    if name.endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder) -> list[Path]:
    """The DICOM files directly in ``folder`` (:func:`is_dicom_file`; no subfolders), sorted by name;
    [] for a folder that cannot be listed."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    return [p for p in entries if is_dicom_file(p)]


def holds_dicom(folder) -> bool:
    """True when ``folder`` is a folder with at least one DICOM file directly in it (:func:`is_dicom_file`)."""
    try:
        return Path(folder).is_dir() and any(is_dicom_file(p) for p in Path(folder).iterdir())
    except OSError:
        return False


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's warnings off inside the block (GDCM's "No Series were found", the series reader's "Non
    uniform sampling": :func:`dicom_images` checks and reports these itself, as one line)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


_DICOM_IMAGES: dict[tuple, list[DicomImage]] = {}
_DICOM_IMAGES_KEPT = 32


def dicom_images(folder) -> list[DicomImage]:
    """The DICOM images of ``folder`` (its own files, not subfolders), sorted by the name of their first
    file; [] when it holds no DICOM file.

    Files are grouped by SeriesInstanceUID and the slices of a series ordered by SimpleITK's series
    reader (``ImageSeriesReader.GetGDCMSeriesFileNames``). A series of several files is one volume when
    its slices lie at distinct positions (ImagePositionPatient), evenly spaced along the normal of one
    slice orientation (ImageOrientationPatient) within :data:`DICOM_SPACING_TOLERANCE`; a series whose
    files lie at one position or have no position (e.g. the two views of a chest radiograph) is one 2D
    image per file. The result is kept per folder while its files' names, sizes and times stay the same.

    Raises AtlasregError (one line): naming a DICOM file (:func:`is_dicom_file`) that GDCM cannot read
    ("corrupt, truncated or not a DICOM image": it belongs to no series), or whose header SimpleITK
    cannot read; naming the folder for a series that is no volume: files of several frames, slices
    without a position among slices with one, slices at repeated positions (several phases, echoes or
    acquisitions in one series), differing slice orientations, uneven slice steps (missing slices) or
    sheared slices (gantry tilt)."""
    folder = Path(folder)
    try:
        stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(folder) if e.is_file()))
    except OSError as exc:
        raise AtlasregError(f"cannot read folder: {exc.strerror or exc}", folder) from None
    key = (str(folder.resolve()), stamp)
    if key not in _DICOM_IMAGES:
        if len(_DICOM_IMAGES) >= _DICOM_IMAGES_KEPT:
            _DICOM_IMAGES.pop(next(iter(_DICOM_IMAGES)))
        _DICOM_IMAGES[key] = _find_dicom_images(folder)
    return list(_DICOM_IMAGES[key])


def _find_dicom_images(folder: Path) -> list[DicomImage]:
    """:func:`dicom_images` without its memory."""
    candidates = dicom_files(folder)
    if not candidates:
        return []
    reader = sitk.ImageSeriesReader
    try:
        with _itk_warnings_off(), _native_stderr_held():
            series = {uid: [Path(f) for f in reader.GetGDCMSeriesFileNames(str(folder), uid)]
                      for uid in reader.GetGDCMSeriesIDs(str(folder))}
    except RuntimeError as exc:
        raise AtlasregError(f"cannot read DICOM folder: {_short_reason(exc)}", folder) from None
    listed = {f.name for files in series.values() for f in files}
    unread = [f for f in candidates if f.name not in listed]
    if unread:
        more = f" (and {len(unread) - 1} more file(s) of this folder)" if len(unread) > 1 else ""
        raise AtlasregError(f"cannot read DICOM file: GDCM does not recognise it (corrupt, truncated or not a "
                            f"DICOM image){more}", unread[0])
    images = [image for uid, files in series.items() for image in _series_images(folder, uid, files)]
    return sorted(images, key=lambda image: image.files[0].name)


def _dicom_header(path: Path) -> tuple[int, np.ndarray | None, np.ndarray]:
    """(frames, ImagePositionPatient in mm or None when the file has none, 3x3 direction) of one file."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        with _itk_warnings_off(), _native_stderr_held():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise AtlasregError(f"cannot read DICOM file: {_short_reason(exc)}", path) from None
    d = reader.GetDimension()
    frames = int(reader.GetSize()[2]) if d > 2 else 1
    direction = np.eye(3)
    direction[:d, :d] = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(d, d)
    position = np.zeros(3)
    position[:d] = reader.GetOrigin()
    return frames, (position if reader.HasMetaDataKey("0020|0032") else None), direction


def _series_images(folder: Path, uid: str, files: list[Path]) -> list[DicomImage]:
    """The images of one series (:func:`dicom_images`)."""
    if len(files) == 1:
        return [DicomImage(uid, tuple(files))]
    n = len(files)
    headers = [_dicom_header(f) for f in files]
    where = f"series {uid}"
    if any(frames > 1 for frames, _, _ in headers):
        raise AtlasregError(f"{where}: {n} files of which some hold several frames; give one file to read it alone",
                            folder)
    missing = sum(position is None for _, position, _ in headers)
    if missing == n:
        return [DicomImage(uid, (f,)) for f in files]  # 2D images without a place in space: one each
    if missing:
        raise AtlasregError(f"{where}: {missing} of its {n} files have no ImagePositionPatient (0020,0032)", folder)
    positions = np.stack([position for _, position, _ in headers])
    if np.all(np.linalg.norm(positions - positions[0], axis=1) <= _SAME_POSITION_MM):
        return [DicomImage(uid, (f,)) for f in files]  # 2D images at one place (e.g. two views): one each
    direction = headers[0][2]
    if any(not np.allclose(d, direction, atol=1e-4) for _, _, d in headers):
        raise AtlasregError(f"{where}: the slices' orientations (ImageOrientationPatient) differ", folder)
    normal = direction[:, 2]
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    distinct = 1 + int(np.sum(np.diff(np.sort(positions @ normal)) > _SAME_POSITION_MM))
    if distinct < n:
        raise AtlasregError(f"{where}: its {n} files lie at {distinct} positions (several phases, echoes or "
                            "acquisitions in one series?); put each in a folder of its own", folder)
    mean = float(along.mean())
    if np.any(along * mean <= 0) or np.max(np.abs(along - mean)) > DICOM_SPACING_TOLERANCE * abs(mean):
        low, high = np.abs(along).min(), np.abs(along).max()
        raise AtlasregError(f"{where}: slices are not evenly spaced (steps of {low:.4g} to {high:.4g} mm "
                            "along the slice normal; missing slices?)", folder)
    across = float(np.max(np.linalg.norm(steps - np.outer(along, normal), axis=1)))
    if across > DICOM_SPACING_TOLERANCE * abs(mean):
        raise AtlasregError(f"{where}: slices are sheared: a step of {abs(mean):.4g} mm along the slice normal "
                            f"moves {across:.4g} mm across the slice plane (gantry tilt?); resample it first",
                            folder)
    return [DicomImage(uid, tuple(files))]


def describe_dicom_images(images: Sequence[DicomImage]) -> str:
    """One line (without the folder) listing the images of a folder that holds more than one: their
    series' SeriesInstanceUID, number of files and first file, and how to pick one."""
    by_series: dict[str, list[DicomImage]] = {}
    for image in images:
        by_series.setdefault(image.series, []).append(image)
    if len(by_series) == 1:
        uid, shown = images[0].series, images[:5]
        names = ", ".join(image.files[0].name for image in shown) + (", ..." if len(images) > 5 else "")
        return (f"holds {len(images)} 2D DICOM images of series {uid} ({names}); give one of their files, or put "
                "each in a folder of its own")
    parts = []
    for uid, group in list(by_series.items())[:5]:
        count = sum(len(image.files) for image in group)
        parts.append(f"{uid} ({count} file{'s' if count > 1 else ''}, e.g. {group[0].files[0].name})")
    more = f" and {len(by_series) - 5} more" if len(by_series) > 5 else ""
    return (f"holds {len(by_series)} DICOM series (SeriesInstanceUID: {', '.join(parts)}{more}); give one file of "
            "a series to read that series, or put each series in a folder of its own")


def read_dicom(path) -> sitk.Image:
    """Read a DICOM image through SimpleITK (GDCM): ``path`` is a folder holding one DICOM image
    (:func:`dicom_images`: one series, read with ``ImageSeriesReader`` in its order), or one DICOM
    file, which stands for the image it belongs to in its folder (the whole volume for a slice of a
    series; so one of its files picks a series out of a folder holding several).

    Geometry from the series: spacing (mm; the slice spacing from the slices' positions, not the
    SliceThickness), origin (ImagePositionPatient of the first slice, mm) and direction
    (ImageOrientationPatient and the slice normal), in ITK's LPS world. Intensities have the rescale
    slope and intercept applied (e.g. Hounsfield units). A single-frame image (a radiograph, one
    slice: ``x * y * 1``) is returned as a 2D image, keeping its in-plane spacing; its origin and
    direction are the first two components of the 3D ones when the image lies in the patient's
    x-y plane (the in-plane 2x2 direction is a rotation or reflection), else the coordinates along its
    row and column directions (identity direction, origin projected on them).

    Returns the image as SimpleITK reads it (the pixel type of the file, or float when rescaled), 2D or 3D.

    Raises AtlasregError (one line naming the folder or file): a folder with no DICOM file; a folder
    with several images ("holds 2 DICOM series (SeriesInstanceUID: <uid> (12 files, e.g. a.dcm), ...)",
    naming each); the errors of :func:`dicom_images`; "cannot read DICOM file/series: <reason>"."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    images = dicom_images(folder)
    if p.is_dir():
        if not images:
            raise AtlasregError("holds no DICOM files", p)
        if len(images) > 1:
            raise AtlasregError(describe_dicom_images(images), p)
        image = images[0]
    else:
        image = next((im for im in images if any(f.name == p.name for f in im.files)), None)
        if image is None:
            raise AtlasregError("cannot read DICOM file: GDCM does not recognise it (corrupt, truncated or not a "
                                "DICOM image)", p)
    what = "series" if len(image.files) > 1 else "file"
    try:
        with _itk_warnings_off(), _native_stderr_held():
            if len(image.files) > 1:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames([str(f) for f in image.files])
            else:
                reader = sitk.ImageFileReader()
                reader.SetImageIO("GDCMImageIO")
                reader.SetFileName(str(image.files[0]))
            img = reader.Execute()
    except RuntimeError as exc:
        raise AtlasregError(f"cannot read DICOM {what}: {_short_reason(exc)}", p) from None
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = _drop_slice_axis(img)
    return img


def _drop_slice_axis(image: sitk.Image) -> sitk.Image:
    """A 3D image of one slice as a 2D image (:func:`read_dicom`)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    in_plane = direction[:2, :2]
    if np.allclose(in_plane.T @ in_plane, np.eye(2), atol=1e-6):
        direction2, origin2 = in_plane, origin[:2]
    else:
        direction2, origin2 = np.eye(2), direction[:, :2].T @ origin
    vector = image.GetNumberOfComponentsPerPixel() > 1
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[0], isVector=vector)
    out.SetSpacing(tuple(float(s) for s in image.GetSpacing()[:2]))
    out.SetOrigin(tuple(float(o) for o in origin2))
    out.SetDirection(tuple(float(d) for d in direction2.ravel()))
    return out


# --------------------------------------------------------------------------------------------------
# reading


def read_image(path) -> sitk.Image:
    """Read an intensity image (2D or 3D) from PNG, NIfTI, NRRD or MetaImage, or DICOM: a folder holding
    one series or one of its files (:func:`read_dicom`: geometry from the series, rescale slope and
    intercept applied, a single-frame image such as a radiograph read as 2D).

    RGB/RGBA images are converted to greyscale (Rec. 601 luminance, alpha ignored); a two-component
    image (grey + alpha) keeps its first channel.

    Returns a scalar ``sitkFloat32`` image with the file's size, spacing (mm), origin (mm) and
    direction.

    Raises AtlasregError (naming ``path``): "file not found"; "cannot read image: <reason>" for
    unreadable or corrupt files; "truncated: ..." or "corrupt gzip stream" (:func:`verify_file`);
    the DICOM errors of :func:`read_dicom` (naming the folder or file); unsupported component count;
    "contains NaN or infinite intensities".
    """
    img, nonfinite_on_disk = _read_verified(path)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise AtlasregError("has complex-valued pixels; expected a real intensity image", path)
    if ncomp == 1:
        out = sitk.Cast(img, sitk.sitkFloat32)
    else:
        arr = sitk.GetArrayViewFromImage(img)
        if ncomp in (3, 4):
            grey = arr[..., :3].astype(np.float64) @ _LUMA
        elif ncomp == 2:
            grey = arr[..., 0]
        else:
            raise AtlasregError(
                f"has {ncomp} components per pixel; expected greyscale, grey+alpha, RGB or RGBA", path)
        out = _scalar_from_array(np.ascontiguousarray(grey, dtype=np.float32), img)
    if img.GetPixelID() not in _INTEGER_IDS or ncomp in (3, 4):
        if not np.all(np.isfinite(sitk.GetArrayViewFromImage(out))) or nonfinite_on_disk:
            raise AtlasregError("contains NaN or infinite intensities", path)
    return out


def read_labelmap(path, labels: Sequence[int], reference: sitk.Image | None = None, reference_path=None,
                  require_foreground: bool = True) -> sitk.Image:
    """Read an integer labelmap (2D or 3D) and check it.

    ``labels``: the declared label values; ``labels[0]`` is the background. A multi-component file
    (e.g. an RGB PNG) keeps its first channel. Float files are accepted when every value is an
    integer.

    ``reference``: the image this labelmap belongs to (``reference_path`` is its file, used in
    messages); its size and geometry (spacing, origin, direction; relative tolerance 1e-4) must
    match.

    Returns a scalar ``sitkUInt16`` image (``sitkInt32`` when a declared label is negative or above
    65535) with the file's geometry.

    Raises AtlasregError (naming ``path``): "file not found"; "cannot read image: <reason>";
    "truncated: ..." or "corrupt gzip stream" (:func:`verify_file`); non-integer or non-finite values; "label values [7, 9] are not in the declared label list
    [0, 1, 2, 3]"; "size 128x128 differs from image <reference_path> 256x256"; geometry mismatch
    (naming both files); "has no foreground (only label 0)" when ``require_foreground``.
    """
    labels = [int(v) for v in labels]
    if not labels:
        raise AtlasregError("the declared label list is empty", path)
    img, nonfinite_on_disk = _read_verified(path)
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise AtlasregError("has complex-valued pixels; expected integer labels", path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        img = sitk.VectorIndexSelectionCast(img, 0)

    if reference is not None:
        ref_name = reference_path if reference_path is not None else "the reference image"
        if img.GetSize() != reference.GetSize():
            raise AtlasregError(
                f"size {_size_str(img.GetSize())} differs from image {ref_name} "
                f"{_size_str(reference.GetSize())}", path)
        diff = _geometry_difference(img, reference, 1e-4)
        if diff is not None:
            raise AtlasregError(f"geometry differs from image {ref_name}: {diff}", path)

    arr = sitk.GetArrayViewFromImage(img)
    if img.GetPixelID() not in _INTEGER_IDS:
        if not np.all(np.isfinite(arr)) or nonfinite_on_disk:
            raise AtlasregError("contains NaN or infinite values; a labelmap must hold integer labels", path)
        frac = arr != np.round(arr)
        if np.any(frac):
            example = float(arr[frac].flat[0])
            raise AtlasregError(
                f"contains non-integer values (e.g. {example:g}); a labelmap must hold integer labels", path)

    values = [int(v) for v in np.unique(arr)]
    declared = set(labels)
    unknown = [v for v in values if v not in declared]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise AtlasregError(
            f"label values [{shown}] are not in the declared label list {labels}", path)
    if require_foreground and all(v == labels[0] for v in values):
        raise AtlasregError(f"has no foreground (only label {labels[0]})", path)

    out_id = sitk.sitkUInt16 if min(labels) >= 0 and max(labels) <= 65535 else sitk.sitkInt32
    return sitk.Cast(img, out_id)


NO_GEOMETRY_FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def has_no_spacing(image: sitk.Image, path) -> bool:
    """True when the file stores no spacing: a format without geometry (PNG, JPEG, BMP, TIFF), or a
    default header: unit spacing, zero origin and an identity affine (ITK reads a NIfTI identity
    affine as direction diag(-1, -1, 1), its RAS -> LPS flip; e.g. ACDC, whose pixdim was lost)."""
    if str(path).lower().endswith(NO_GEOMETRY_FORMATS):
        return True
    d = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(d, d)
    nifti_identity = np.diag([-1.0, -1.0] + [1.0] * (d - 2))
    return bool(np.allclose(image.GetSpacing(), 1.0) and np.allclose(image.GetOrigin(), 0.0)
                and (np.allclose(direction, np.eye(d)) or np.allclose(direction, nifti_identity)))


def check_dimension(image: sitk.Image, expected_ndim: int, path) -> None:
    """Raise AtlasregError naming ``path`` ("is 3D but the model is 2D (size ...)") when the image's
    number of spatial dimensions differs from ``expected_ndim``."""
    ndim = image.GetDimension()
    if ndim != int(expected_ndim):
        raise AtlasregError(
            f"image is {ndim}D but the model is {int(expected_ndim)}D (size {_size_str(image.GetSize())})",
            path)


# --------------------------------------------------------------------------------------------------
# writing


def _split_suffix(name: str) -> tuple[str, str]:
    """("case.nii.gz") -> ("case", ".nii.gz"); handles the double extension."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[:-7], name[-7:]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def write_image(image: sitk.Image, path, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically and return the path.

    The file is first written to a hidden temporary file beside the target (``.tmp-<random>-<name>``,
    keeping the real extension so SimpleITK picks the right writer) and then moved into place with
    ``os.replace`` after an fsync; MetaImage ``.mhd`` (header + data file) is written in a temporary folder and both
    files are moved, header last. Parent folders are created. ``compress`` enables the format's
    compression (gzip for NIfTI/NRRD/MetaImage, zlib level for PNG).

    Raises ValueError when writing anything but a 2D 8/16-bit unsigned integer image (scalar, RGB
    or RGBA) to ``.png``; AtlasregError (naming ``path``) when the file cannot be written.
    """
    path = Path(path)
    _, suffix = _split_suffix(path.name)
    if suffix.lower() == ".png":
        if image.GetDimension() != 2 or image.GetPixelID() not in _PNG_IDS:
            raise ValueError(
                f"{path}: PNG can only store 2D 8/16-bit unsigned integer images, got a "
                f"{image.GetDimension()}D {image.GetPixelIDTypeAsString()} image; cast it or write "
                ".nii.gz instead")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtlasregError(f"cannot create folder {path.parent}: {exc.strerror or exc}", path) from None

    token = secrets.token_hex(4)
    if suffix.lower() == ".mhd":
        _write_mhd(image, path, compress, token)
        return path
    tmp = path.with_name(f".tmp-{token}-{path.name}")
    try:
        sitk.WriteImage(image, str(tmp), bool(compress))
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except RuntimeError as exc:
        raise AtlasregError(f"cannot write image: {_short_reason(exc)}", path) from None
    except OSError as exc:
        raise AtlasregError(f"cannot write image: {exc.strerror or exc}", path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def _write_mhd(image: sitk.Image, path: Path, compress: bool, token: str) -> None:
    tmp_dir = path.with_name(f".tmp-{token}-{path.name}.d")
    try:
        tmp_dir.mkdir()
        sitk.WriteImage(image, str(tmp_dir / path.name), bool(compress))
        header = tmp_dir / path.name
        _fsync_tree(tmp_dir)
        for f in sorted(tmp_dir.iterdir()):  # data file(s) first, header last
            if f != header:
                os.replace(f, path.parent / f.name)
        os.replace(header, path)
        _fsync_folder(path.parent)
    except RuntimeError as exc:
        raise AtlasregError(f"cannot write image: {_short_reason(exc)}", path) from None
    except OSError as exc:
        raise AtlasregError(f"cannot write image: {exc.strerror or exc}", path) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (before it is renamed into place, so that a crash or
    power loss never leaves a renamed but empty or partial file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then the folders themselves (their entries)."""
    for root, _, files in os.walk(folder):
        for f in files:
            _fsync_file(Path(root) / f)
        _fsync_folder(Path(root))


def _fsync_folder(folder: Path) -> None:
    """fsync a folder's entries (a rename into it); ignored where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


#: Names of the temporary entries the atomic writers make (``.tmp-<8 hex>-<name>``) and of a folder
#: being replaced (``.old-<8 hex>-<name>``).
_TEMPORARY = re.compile(r"^\.(tmp|old)-[0-9a-f]{8}-(.+)$")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_folder(path) -> Path:
    """Check, before anything is read or written, that ``path`` can be a command's output folder: an
    existing writable folder, or a new one whose nearest existing parent is a writable folder.
    Creates nothing. Returns ``Path(path)``.

    Raises AtlasregError (one line naming the path): "exists and is not a folder"; "cannot be created:
    <parent> is a file, not a folder"; "is not writable (read-only file system or no permission)"."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AtlasregError("exists and is not a folder", path)
    _check_writable(path)
    return path


def check_output_file(path) -> Path:
    """Check, before anything is read or written, that the file ``path`` can be written (replaced
    atomically): not a folder, and its folder exists or can be created and is writable. Creates
    nothing. Returns ``Path(path)``. Raises AtlasregError as :func:`check_output_folder`, or "is a
    folder, not a file"."""
    path = Path(path)
    if path.is_dir():
        raise AtlasregError("is a folder, not a file", path)
    _check_writable(path.parent if str(path.parent) else Path("."))
    return path


def _check_writable(folder: Path) -> None:
    existing = _existing_ancestor(folder)
    if not existing.is_dir():
        raise AtlasregError(f"cannot be created: {existing} is a file, not a folder", folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == folder.absolute() else f"cannot be created: {existing} is not " \
            "writable"
        raise AtlasregError(f"{where} (read-only file system or no permission)", folder)


def remove_temporaries(folder, name: str | Collection[str] | None = None) -> list[Path]:
    """Clean what a killed run (SIGKILL, power loss) of an atomic writer left in ``folder`` and the
    folders below it: hidden ``.tmp-<8 hex>-<name>`` files and folders are removed; an
    ``.old-<8 hex>-<name>`` folder (a folder being replaced) is moved back to ``<name>`` when that is
    missing (the kill fell between the two renames of :func:`atomic_directory`), else removed.
    With ``name`` (one name, or a collection of names) only the temporaries of those entries of
    ``folder`` itself (a command whose outputs are some entries of a folder it shares: one file, or
    the case folders of one part of a sharded run). Call it only when no other run writes those
    entries. Returns the entries removed or restored (none when ``folder`` does not exist)."""
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    names = None if name is None else {name} if isinstance(name, str) else set(name)
    for root, dirs, files in os.walk(folder):
        for entry_name in sorted(dirs + files):
            m = _TEMPORARY.match(entry_name)
            if not m or (names is not None and m.group(2) not in names):
                continue
            entry = Path(root) / entry_name
            final = Path(root) / m.group(2)
            if m.group(1) == "old" and not final.exists():
                os.replace(entry, final)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            done.append(entry)
            if entry_name in dirs:
                dirs.remove(entry_name)
        if names is not None:
            break  # `folder` itself only
    return done


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Write a file all-or-nothing: yields a hidden temporary path beside ``path`` (same name, so
    the same suffixes) which is flushed to the disk (fsync) and moved onto ``path`` when the block
    succeeds and deleted when it raises. Creates parent folders. A run killed inside the block leaves
    the temporary file (:func:`remove_temporaries` cleans it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def append_text(path, text: str) -> Path:
    """Append `text` (whole lines) to the existing file `path` in one ``write`` call, then flush it to
    the disk (fsync): a process killed around it (SIGKILL) leaves all of it or none, so a log or
    manifest written this way holds whole lines only (a power loss may cut the last one; readers ignore
    a last line without its line end). OSError if the file cannot be opened or written. Returns the
    path."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        done = os.write(fd, data) if data else 0
        while done < len(data):  # a short write (a signal): the rest
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    """Write a file's bytes atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(final_dir) -> Iterator[Path]:
    """Build a folder all-or-nothing.

    Yields a new hidden temporary sibling folder (``.tmp-<random>-<name>``). When the ``with`` block
    succeeds its files are flushed to the disk (fsync) and it replaces ``final_dir`` (an existing
    ``final_dir`` is removed); when it raises, the
    temporary folder is deleted, any old ``final_dir`` is left untouched and the exception
    propagates.

    Raises AtlasregError (naming ``final_dir``) when it exists but is not a folder.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not final_dir.is_dir():
        raise AtlasregError("exists and is not a folder", final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = final_dir.with_name(f".tmp-{token}-{final_dir.name}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final_dir.with_name(f".old-{token}-{final_dir.name}")
    moved_old = False
    try:
        if final_dir.exists():
            os.replace(final_dir, old)
            moved_old = True
        os.replace(tmp, final_dir)
    except BaseException:
        if moved_old and not final_dir.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(final_dir.parent)
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# geometry


def image_geometry(image: sitk.Image) -> dict:
    """Geometry of a SimpleITK image as plain tuples, in ITK order:
    ``{"size": (x, y[, z]) voxels, "spacing": mm, "origin": mm, "direction": row-major D*D}``."""
    return {
        "size": tuple(int(s) for s in image.GetSize()),
        "spacing": tuple(float(s) for s in image.GetSpacing()),
        "origin": tuple(float(o) for o in image.GetOrigin()),
        "direction": tuple(float(d) for d in image.GetDirection()),
    }


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when a and b have the same size and, within relative tolerance ``tol``, the same
    spacing (``|x - y| <= tol * max(|x|, |y|)``), origin (same, but relative to at least the
    largest voxel spacing) and direction (absolute ``tol``)."""
    return _geometry_difference(a, b, tol) is None
