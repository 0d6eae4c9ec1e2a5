"""DeepATLAS (Chang, "DeepATLAS: One-Shot Localization for Biomedical Data"; issue 15): self-supervised
anatomical coordinates and one-shot segmentation, one code path for 2D and 3D:

* :mod:`.coordinates`: coordinate maps (N, D, *spatial) in [-1, 1]^D, corner-aligned, ITK channel order;
  Jacobians; conversion to atlasreg's world coordinates.
* :mod:`.network`: the coordinate network (Secs. 2.2, 5.2.1-5.2.3) with staged multi-resolution heads.
* :mod:`.warps`: the explicit warp of a learnable atlas (Eqs. 3, 8, 13) and the implicit warp between
  two exams (Eqs. 1, 4-7).
* :mod:`.losses`: smoothness (Eqs. 10-11), feature NCC (Eq. 9), auxiliary channels (5.1.5), masks
  (5.1.6, 5.5.3).
* :mod:`.autoencoder`: the multi-resolution feature autoencoder (Sec. 5.3) and the CT intensity mapping.
* :mod:`.template`: the template mask (Eq. 14), propagation, the bounding-cube projection (5.2.4).
* :mod:`.method`: the registered method ``deepatlas`` (Lightning module: the autoencoder, then the staged
  coarse-to-fine training of Secs. 5.2.3-5.2.6) and :func:`~.method.pretrain`, its training run.
* :mod:`.files`: templates from labelled exam files, propagation and crops written on each input's own
  grid (the ``atlasreg deepatlas`` commands of :mod:`.cli`).

The names below are imported on first use (PEP 562), so that the command line's parser
(:mod:`.cli`) imports this package without torch.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "FeatureAutoencoder": "autoencoder", "ct_contrast_mapping": "autoencoder",
    "identity_coordinates": "coordinates", "jacobian": "coordinates", "sample_at": "coordinates",
    "DeepAtlasSimilarity": "losses", "SmoothnessLoss": "losses", "auxiliary_channels": "losses",
    "feature_ncc_loss": "losses", "foreground_mask": "losses", "smoothness_loss": "losses",
    "CoordinateNet": "network",
    "crop": "template", "cube_affine": "template", "cube_vertices": "template", "propagate": "template",
    "template_mask": "template",
    "Atlas": "warps", "explicit_warp": "warps", "implicit_warp": "warps", "overlap_mask": "warps",
}

__all__ = ["CoordinateNet", "FeatureAutoencoder", "ct_contrast_mapping", "identity_coordinates", "jacobian",
           "sample_at", "Atlas", "explicit_warp", "implicit_warp", "overlap_mask", "smoothness_loss",
           "SmoothnessLoss", "feature_ncc_loss", "auxiliary_channels", "foreground_mask", "DeepAtlasSimilarity",
           "template_mask", "propagate", "cube_affine", "cube_vertices", "crop"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_NAMES])
