"""Synthetic "letter B" data, following the recipe of Atlas-ISTN (Sinclair et al., MedIA 2022, Sec. 3.1).

The paper starts from a single binary 2D image of the letter B and generates warped instances of it
with random affine transformations composed with random B-spline deformations.  Each warped labelmap
gets an intensity image with additive Gaussian noise.  A "corrupt" variant adds random clutter to the
intensity image (blobs and missing pieces of the letter) while the labelmap stays the true letter.

This module reproduces that recipe without any external data, so that demos and tests can run
anywhere.  Its parameters were matched to the data published with the paper
(``biomedia-mira/atlas-istn``, ``data/synth2d``; 128x128 8-bit PNG):

* intensities: background 100, letter 150, additive white Gaussian noise with standard deviation
  25.5, clipped to [0, 255] and rounded to ``uint8`` (published: 100.0 / 150.0 / 25.5, no
  partial-volume blurring at the letter boundary, spatially uncorrelated noise);
* letter: one connected component with two holes (about 740 and 555 pixels), about 2090 pixels at
  128x128 with a stroke of about 9 pixels (published mean over 1000 cases: 2065 pixels, holes 726
  and 553);
* pose: rotation ~ N(0, 11 deg), isotropic scale ~ N(1, 0.05), mild anisotropy and shear,
  translation ~ U(-10, 10) pixels per axis about the image centre, composed with a smooth cubic
  B-spline deformation (6x6 mesh, control-point displacements ~ N(0, 5 px) clipped at 2.5 sigma);
  this gives a centroid spread of about 6 pixels per axis and a principal-axis angle spread of about
  14 deg (published: 5.9 pixels, 15 deg); the letter stays at least 6 pixels from the border;
* corrupt clutter: 3-12 bright near-circular blobs at the letter intensity, radius 2.5-10 pixels,
  anywhere in the image, and 1-3 pieces of the letter (discs of radius 3-9 pixels) erased to the
  background intensity; the labelmap is untouched.

All functions use the numpy array convention ``array[row, col]`` = ``array[y, x]``.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import SimpleITK as sitk

from .io import write_image

__all__ = [
    "BACKGROUND_INTENSITY",
    "FOREGROUND_INTENSITY",
    "NOISE_STD",
    "make_letter_b",
    "generate_case",
    "write_letter_b_dataset",
]

#: Mean intensity of the background in the generated 8-bit images (published data: 100.0).
BACKGROUND_INTENSITY = 100.0
#: Mean intensity of the letter in the generated 8-bit images (published data: 150.0).
FOREGROUND_INTENSITY = 150.0
#: Standard deviation of the additive white Gaussian noise (published data: 25.5).
NOISE_STD = 25.5

# Reference frame in which the glyph geometry is defined; everything scales with size / _REF.
_REF = 128.0

# Glyph geometry (in pixels of a 128x128 image; x to the right, y down).
_STROKE = 9.0
_LEFT = 42.5  # left edge of the vertical bar
_TOP = 29.0  # top of the letter
_BOTTOM = 103.0  # bottom of the letter
_MID = 64.5  # centre line of the middle stroke
_TOP_RIGHT = 88.5  # rightmost extent of the top bowl
_BOTTOM_RIGHT = 93.5  # rightmost extent of the bottom bowl
_TOP_RX = 19.0  # horizontal semi-axis of the rounded part of the top bowl
_BOTTOM_RX = 22.0  # horizontal semi-axis of the rounded part of the bottom bowl

# Pose / deformation distribution (pixels refer to a 128x128 image).
_ROT_STD_DEG = 11.0
_SCALE_STD = 0.05
_ANISO_STD = 0.04
_SHEAR_STD = 0.04
_TRANS_MAX = 10.0
_BSPLINE_MESH = 6
_BSPLINE_STD = 5.0
_MARGIN = 6  # minimum distance (pixels) between the warped letter and the image border
_MAX_TRIES = 50

# Corrupt clutter.
_N_BLOBS = (3, 12)  # inclusive range
_BLOB_RADIUS = (2.5, 10.0)
_N_MISSING = (1, 3)  # inclusive range
_MISSING_RADIUS = (3.0, 9.0)


def _d_shape(x: np.ndarray, y: np.ndarray, x0: float, y0: float, y1: float, x_right: float, rx: float) -> np.ndarray:
    """Boolean mask of a 'D' shape: a rectangle [x0, x_right - rx] x [y0, y1] closed on the right by a
    half ellipse with horizontal semi-axis ``rx`` and vertical semi-axis ``(y1 - y0) / 2``."""
    if y1 <= y0 or x_right <= x0:
        return np.zeros(np.broadcast(x, y).shape, dtype=bool)
    rx = min(rx, x_right - x0)
    xc = x_right - rx
    yc = 0.5 * (y0 + y1)
    ry = 0.5 * (y1 - y0)
    in_rect = (x >= x0) & (x <= xc) & (y >= y0) & (y <= y1)
    in_ell = (x >= xc) & (((x - xc) / rx) ** 2 + ((y - yc) / ry) ** 2 <= 1.0)
    return in_rect | in_ell


def _bowl(x: np.ndarray, y: np.ndarray, y0: float, y1: float, x_right: float, rx: float) -> np.ndarray:
    """A ring-shaped bowl of the B: outer D shape minus the inner D shape inset by the stroke."""
    t = _STROKE
    outer = _d_shape(x, y, _LEFT, y0, y1, x_right, rx)
    inner = _d_shape(x, y, _LEFT + t, y0 + t, y1 - t, x_right - t, rx - t)
    return outer & ~inner


@functools.lru_cache(maxsize=8)
def _base_letter(size: int) -> np.ndarray:
    """Cached, read-only rendering of the base letter (see :func:`make_letter_b`)."""
    ss = 4
    f = _REF / size
    # Supersampled pixel-centre coordinates in the 128-pixel reference frame.
    c = (np.arange(size * ss) + 0.5) / ss * f
    y, x = np.meshgrid(c, c, indexing="ij")
    t = _STROKE
    bar = (x >= _LEFT) & (x <= _LEFT + t) & (y >= _TOP) & (y <= _BOTTOM)
    top = _bowl(x, y, _TOP, _MID + t / 2, _TOP_RIGHT, _TOP_RX)
    bottom = _bowl(x, y, _MID - t / 2, _BOTTOM, _BOTTOM_RIGHT, _BOTTOM_RX)
    fine = (bar | top | bottom).astype(np.float32)
    coverage = fine.reshape(size, ss, size, ss).mean(axis=(1, 3))
    letter = (coverage >= 0.5).astype(np.uint8)
    letter.flags.writeable = False
    return letter


def make_letter_b(size: int = 128) -> np.ndarray:
    """Binary base image of the letter B (the single template the data are generated from).

    The glyph is built from geometric primitives (a vertical bar and two D-shaped bowls), so it needs
    no font file: one 8-connected and 4-connected component with exactly two holes.  It is rendered
    with 4x4 supersampling and thresholded at half coverage.

    Args:
        size: side length of the square image in pixels (the geometry scales with ``size / 128``;
            sizes below about 32 may lose the holes).

    Returns:
        ``np.ndarray`` of shape ``(size, size)``, dtype ``uint8``, values in {0, 1} (1 = letter).
        At ``size=128`` the letter covers about 2090 pixels, is 74 pixels high and 52 wide, and is
        roughly centred (centroid near row 66, column 64) (Atlas-ISTN paper, Sec. 3.1 / Fig. 5).
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    return _base_letter(size).copy()


def _random_transform(rng: np.random.Generator, size: int, reference: sitk.Image) -> sitk.Transform:
    """Random affine (rotation, scale, anisotropy, shear, translation about the image centre) composed
    with a random cubic B-spline deformation; pixel units with spacing 1."""
    f = size / _REF
    theta = np.deg2rad(rng.normal(0.0, _ROT_STD_DEG))
    scale = float(np.clip(rng.normal(1.0, _SCALE_STD), 0.8, 1.2))
    aniso = float(np.clip(rng.normal(0.0, _ANISO_STD), -0.12, 0.12))
    shear = float(np.clip(rng.normal(0.0, _SHEAR_STD), -0.12, 0.12))
    trans = rng.uniform(-_TRANS_MAX, _TRANS_MAX, size=2) * f
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.array([[cos, -sin], [sin, cos]])
    stretch = np.array([[scale * np.exp(aniso), shear], [0.0, scale * np.exp(-aniso)]])
    matrix = rot @ stretch
    centre = (size - 1) / 2.0

    affine = sitk.AffineTransform(2)
    affine.SetCenter((centre, centre))
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(trans.tolist())

    bspline = sitk.BSplineTransformInitializer(reference, [_BSPLINE_MESH, _BSPLINE_MESH], 3)
    n_params = len(bspline.GetParameters())
    disp = np.clip(rng.normal(0.0, _BSPLINE_STD, size=n_params), -2.5 * _BSPLINE_STD, 2.5 * _BSPLINE_STD) * f
    bspline.SetParameters(disp.tolist())

    # sitk.Resample maps output points to input points; the composite applies the B-spline first
    # (last added is applied first), then the affine.
    return sitk.CompositeTransform([affine, bspline])


def _warp_label(base: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Warp the base letter (linear interpolation, threshold at 0.5) -> bool array."""
    warped = sitk.Resample(base, base, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(warped) >= 0.5


def _disc(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    """Boolean mask of a filled ellipse with centre (cy, cx), semi-axes (ry, rx), rotated by angle."""
    h, w = shape
    y0, y1 = max(int(np.floor(cy - max(ry, rx))) - 1, 0), min(int(np.ceil(cy + max(ry, rx))) + 2, h)
    x0, x1 = max(int(np.floor(cx - max(ry, rx))) - 1, 0), min(int(np.ceil(cx + max(ry, rx))) + 2, w)
    mask = np.zeros(shape, dtype=bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    mask[y0:y1, x0:x1] = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return mask


def _add_clutter(rng: np.random.Generator, mean: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Corrupt a noise-free intensity image: erase pieces of the letter and add bright blobs."""
    size_y, size_x = mean.shape
    f = size_x / _REF
    out = mean.copy()
    # Missing pieces: discs centred on letter pixels, set to background intensity.
    ys, xs = np.nonzero(label)
    n_missing = int(rng.integers(_N_MISSING[0], _N_MISSING[1] + 1))
    for _ in range(n_missing):
        k = int(rng.integers(len(ys)))
        r = rng.uniform(*_MISSING_RADIUS) * f
        piece = _disc(out.shape, ys[k], xs[k], r, r, 0.0) & label
        out[piece] = BACKGROUND_INTENSITY
    # Bright blobs (near-circular ellipses at the letter intensity), anywhere in the image.
    n_blobs = int(rng.integers(_N_BLOBS[0], _N_BLOBS[1] + 1))
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, size_y), rng.uniform(0, size_x)
        r = rng.uniform(*_BLOB_RADIUS) * f
        ratio = rng.uniform(0.75, 1.0)
        angle = rng.uniform(0.0, np.pi)
        out[_disc(out.shape, cy, cx, r, r * ratio, angle)] = FOREGROUND_INTENSITY
    return out


def generate_case(rng: np.random.Generator, size: int = 128, corrupt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Generate one (image, labelmap) pair of the letter-B data set (Atlas-ISTN paper, Sec. 3.1).

    The base letter (:func:`make_letter_b`) is warped by a random affine transform composed with a
    random B-spline deformation (SimpleITK, linear interpolation then threshold at 0.5); poses that
    would bring the letter within 6 pixels (at 128x128) of the image border are redrawn.  The
    intensity image is ``100 + 50 * label + N(0, 25.5^2)`` clipped to [0, 255] and rounded.

    With ``corrupt=True`` the same random draws are made first (so the labelmap and the noise field
    are identical to the clean case for an identically seeded ``rng``), then clutter is added to the
    noise-free image before the noise: 1-3 pieces of the letter are erased to background intensity
    and 3-12 bright blobs at letter intensity are placed anywhere.  The labelmap is unchanged.

    Args:
        rng: numpy random generator; it is advanced by the call.
        size: side length in pixels (the published data use 128).
        corrupt: add clutter to the image.

    Returns:
        ``(image, labelmap)``: both ``np.ndarray`` of shape ``(size, size)`` and dtype ``uint8``;
        the image spans 0..255 (mean about 100 outside the letter and 150 inside), the labelmap
        takes values in {0, 255} (255 = letter).
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    base_np = _base_letter(size)
    base = sitk.GetImageFromArray(base_np.astype(np.float32))
    margin = max(1, int(round(_MARGIN * size / _REF)))
    label = None
    for _ in range(_MAX_TRIES):
        transform = _random_transform(rng, size, base)
        cand = _warp_label(base, transform)
        inner = cand[margin:-margin, margin:-margin]
        if inner.sum() == cand.sum() and cand.sum() > 0.25 * base_np.sum():
            label = cand
            break
    if label is None:  # practically unreachable; fall back to the undeformed letter
        label = base_np.astype(bool)

    mean = np.where(label, FOREGROUND_INTENSITY, BACKGROUND_INTENSITY)
    noise = rng.normal(0.0, NOISE_STD, size=label.shape)
    if corrupt:
        mean = _add_clutter(rng, mean, label)
    image = np.clip(np.rint(mean + noise), 0, 255).astype(np.uint8)
    return image, label.astype(np.uint8) * np.uint8(255)


def write_letter_b_dataset(
    out_dir,
    n_cases: int,
    seed: int = 0,
    corrupt: bool = False,
    start_index: int = 1,
    size: int = 128,
) -> list[pathlib.Path]:
    """Write a letter-B data set in the layout of the published Atlas-ISTN data (paper Sec. 3.1).

    For ``i = start_index, ..., start_index + n_cases - 1`` writes ``B{i}_img.png`` (8-bit greyscale
    intensity image) and ``B{i}_seg.png`` (8-bit labelmap, 0 background / 255 letter), both
    ``size x size`` pixels, into ``out_dir`` (created if needed).  Each file is written atomically
    (temporary file + ``os.replace``).  Case ``i`` is generated from
    ``np.random.default_rng([seed, i])``, so it depends only on ``(seed, i, corrupt, size)`` and not
    on ``n_cases`` or ``start_index``; with ``corrupt=True`` the labelmap of case ``i`` equals the clean
    one for the same seed (use a different seed or index range for an independent corrupt set, as in
    the published data where ``corrupt/B901..B1000`` are other letters than ``clean/B901..B1000``).

    Returns:
        The written paths, ``[B{i}_img.png, B{i}_seg.png, ...]`` in index order.
    """
    if n_cases < 0:
        raise ValueError(f"n_cases must be non-negative, got {n_cases}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[pathlib.Path] = []
    for i in range(int(start_index), int(start_index) + int(n_cases)):
        rng = np.random.default_rng([int(seed), i])
        image, label = generate_case(rng, size=size, corrupt=corrupt)
        img_path = out / f"B{i}_img.png"
        seg_path = out / f"B{i}_seg.png"
        write_image(sitk.GetImageFromArray(image), img_path)
        write_image(sitk.GetImageFromArray(label), seg_path)
        paths.extend([img_path, seg_path])
    return paths
