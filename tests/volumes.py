"""Shared test fixtures: small synthetic 3D scans (nested ellipsoids) written as NIfTI with a chosen
header, for the geometry tests of preprocessing, placement, export and the command line."""

import math

import numpy as np
import SimpleITK as sitk

#: Declared labels of the synthetic scans: background and three nested structures.
LABELS = {0: "background", 1: "outer", 2: "middle", 3: "inner"}


def rotation_about(axis, degrees) -> np.ndarray:
    """(3, 3) rotation by `degrees` about the unit `axis` (Rodrigues' formula)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    a = math.radians(degrees)
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(a) * K + (1.0 - math.cos(a)) * K @ K


#: An oblique, flipped direction: 20 degrees about (1, 2, 3), times a flip of the y axis.
OBLIQUE = rotation_about((1.0, 2.0, 3.0), 20.0) @ np.diag([1.0, -1.0, 1.0])


def ellipsoids(size_xyz=(24, 20, 10), spacing=(0.9, 1.3, 3.5), seed=0, shift_mm=(1.5, -1.0, 2.0),
               radii_mm=(9.0, 10.0, 13.0)) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labelmap int16), array order (z, y, x): three nested ellipsoids in the scan's
    own axes (mm from the volume centre, shifted by `shift_mm`), each inner one off-centre so that
    no flip or axis swap maps the anatomy onto itself; the image is 100 + 60 label + a smooth ramp +
    noise (seeded)."""
    n = np.asarray(size_xyz)
    idx = np.indices(tuple(n[::-1]), dtype=np.float64)[::-1]  # ITK order (x, y, z), each array order
    p = [(idx[i] - (n[i] - 1) / 2.0) * spacing[i] - shift_mm[i] for i in range(3)]
    rx, ry, rz = radii_mm

    def inside(scale, centre):
        return sum(((p[i] - centre[i]) / (r * scale)) ** 2 for i, r in enumerate((rx, ry, rz))) <= 1.0

    lab = np.zeros(tuple(n[::-1]), np.int16)
    lab[inside(1.0, (0.0, 0.0, 0.0))] = 1
    lab[inside(0.6, (0.0, 2.0, 0.0))] = 2
    lab[inside(0.3, (3.0, 2.0, 1.0))] = 3
    rng = np.random.default_rng(seed)
    img = 100.0 + 60.0 * lab + 0.5 * p[0] - 0.3 * p[2] + rng.normal(0.0, 3.0, lab.shape)
    return img.astype(np.float32), lab


def write_scan(folder, name, image, labelmap, spacing=(0.9, 1.3, 3.5), origin=(12.0, -7.5, 30.0),
               direction=OBLIQUE) -> tuple:
    """Write `<name>.nii.gz` (image) and `<name>_seg.nii.gz` (labelmap) with SimpleITK and the given
    header; returns the two paths."""
    paths = []
    for array, suffix in ((image, ""), (labelmap, "_seg")):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetOrigin(tuple(float(o) for o in origin))
        img.SetDirection(tuple(np.asarray(direction, dtype=np.float64).ravel().tolist()))
        path = folder / f"{name}{suffix}.nii.gz"
        sitk.WriteImage(img, str(path))
        paths.append(path)
    return tuple(paths)


def write_identity_header_scan(folder, name, image, labelmap) -> tuple:
    """Write `<name>.nii.gz` and `<name>_seg.nii.gz` with nibabel and an identity affine (a NIfTI whose
    pixdim was lost, as ACDC's); returns the two paths."""
    import nibabel as nib

    paths = []
    for array, suffix in ((image, ""), (labelmap, "_seg")):
        path = folder / f"{name}{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.eye(4)), str(path))
        paths.append(path)
    return tuple(paths)
