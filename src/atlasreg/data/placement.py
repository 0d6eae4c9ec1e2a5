"""Where the model grid lies on a case: its centre, its axes (a canonical orientation, possibly
turned by a discrete orientation search) and the case's physical spacing.

The model grid placed on a case (:func:`place`) has the model's size and spacing, a centre in the
case's world space and a direction ``R = C @ P``: ``C`` the canonical orientation of the config
(``data.orientation``: 'native' keeps the file's own axes, as for 2D images; 'RAS' / 'LPS' etc. resample
every volume onto the same anatomical axes, from the header's direction), and ``P`` a signed
permutation chosen per case by :func:`search_orientation` (``data.orientation_search``), for data whose
headers do not tell the anatomy's orientation (ACDC: identity headers, in-plane axes swapped or flipped
between patients). A transform in model coordinates maps to the case's world space by the placed grid's
frame (:meth:`~atlasreg.spatial.grid.Grid.frame`), so every output is written back on the input's grid
with the orientation and centring undone exactly.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from ..spatial.grid import Grid

#: World axis each letter points to, in ITK's LPS world (x: right -> left, y: anterior -> posterior, z:
#: inferior -> superior). 'RAS' means the model's x, y, z axes point towards R, A and S.
_AXES = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}

ORIENTATION_SEARCH = ("none", "in_plane", "in_plane_flips", "axes")
CENTRES = ("image", "foreground", "labels")


def canonical_direction(code: str, ndim: int, native: np.ndarray) -> np.ndarray:
    """Direction matrix (D, D) of the model axes: `native` (the file's own direction) for 'native',
    else the orientation code (3 letters in 3D, 2 in 2D, e.g. 'RAS', 'LPS', 'LP'): column i is the
    world direction of model axis i. Raises ValueError for an unknown code."""
    if code == "native":
        return np.asarray(native, dtype=np.float64).reshape(ndim, ndim)
    code = code.upper()
    if len(code) != ndim or any(c not in _AXES for c in code) or len({_AXES[c][0] for c in code}) != ndim:
        raise ValueError(f"orientation {code!r}: expected 'native' or {ndim} letters of distinct axes "
                         "from R/L, A/P" + (", S/I" if ndim == 3 else "") + " (e.g. 'RAS')")
    out = np.zeros((ndim, ndim))
    for i, c in enumerate(code):
        axis, sign = _AXES[c]
        out[axis, i] = sign
    return out


def orientation_candidates(mode: str, ndim: int) -> list[np.ndarray]:
    """Signed permutation matrices P (D, D) tried by the orientation search: 'none' -> [I]; 'in_plane'
    -> the 4 rotations by multiples of 90 degrees about the slice axis z (x, y turn; proper rotations,
    so the anatomy's handedness is kept); 'in_plane_flips' -> all 8 flips and swaps of x and y
    (mirror images too, for data whose volumes may be transposed); 'axes' -> all 2^D D! signed
    permutations. The identity comes first. Raises ValueError for another mode."""
    if mode not in ORIENTATION_SEARCH:
        raise ValueError(f"orientation search {mode!r}: expected one of {ORIENTATION_SEARCH}")
    if mode == "none":
        return [np.eye(ndim)]
    if mode == "in_plane":
        return [P for P in orientation_candidates("in_plane_flips", ndim) if np.linalg.det(P) > 0]
    moving = 2 if mode == "in_plane_flips" else ndim
    out = []
    for perm in itertools.permutations(range(moving)):
        for signs in itertools.product((1.0, -1.0), repeat=moving):
            P = np.eye(ndim)
            P[:moving, :moving] = 0.0
            for i, (j, s) in enumerate(zip(perm, signs)):
                P[j, i] = s
            out.append(P)
    out.sort(key=lambda P: not np.array_equal(P, np.eye(ndim)))
    return out


def place(model: Grid, centre: Sequence[float], direction: np.ndarray) -> Grid:
    """The model grid (size, spacing) with its centre at world point `centre` (D,) and axes
    `direction` (D, D)."""
    direction = np.asarray(direction, dtype=np.float64)
    offset = np.asarray(model.spacing) * (np.asarray(model.size_xyz) - 1) / 2.0
    origin = np.asarray(centre, dtype=np.float64) - direction @ offset
    return Grid(model.size, model.spacing, tuple(origin.tolist()), tuple(direction.ravel().tolist()))


def mask_centroid(mask: np.ndarray, grid: Grid, weights: np.ndarray | None = None) -> np.ndarray | None:
    """World centroid (D,) of the voxels of `mask` (array order, on `grid`), optionally weighted;
    None for an empty mask."""
    w = mask.astype(np.float64) if weights is None else np.where(mask, weights, 0.0).astype(np.float64)
    total = w.sum()
    if total <= 0:
        return None
    idx = np.indices(mask.shape, dtype=np.float64)  # array order
    mean = np.array([(i * w).sum() / total for i in idx])[::-1]  # ITK order
    return grid.index_to_world(mean)


def overlap_score(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean soft Dice over the foreground channels of two (1, C, *S) probability maps on the same
    grid: the score of an orientation candidate."""
    a, b = candidate[:, 1:].flatten(2), reference[:, 1:].flatten(2)
    num = 2.0 * (a * b).sum(-1)
    den = a.sum(-1) + b.sum(-1)
    present = den > 0
    if not bool(present.any()):
        return 0.0
    return float((num[present] / den[present]).mean())
