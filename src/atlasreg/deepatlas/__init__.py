"""DeepATLAS (Chang, "DeepATLAS: One-Shot Localization for Biomedical Data"; issue 15): self-supervised
anatomical coordinates and one-shot segmentation. The spatial core, one code path for 2D and 3D:

* :mod:`.coordinates`: coordinate maps (N, D, *spatial) in [-1, 1]^D, corner-aligned, ITK channel order;
  Jacobians; conversion to atlasreg's world coordinates.
* :mod:`.network`: the coordinate network (Secs. 2.2, 5.2.1-5.2.3) with staged multi-resolution heads.
* :mod:`.warps`: the explicit warp of a learnable atlas (Eqs. 3, 8, 13) and the implicit warp between
  two exams (Eqs. 1, 4-7).
* :mod:`.losses`: smoothness (Eqs. 10-11), feature NCC (Eq. 9), auxiliary channels (5.1.5), masks
  (5.1.6, 5.5.3).
* :mod:`.autoencoder`: the multi-resolution feature autoencoder (Sec. 5.3) and the CT intensity mapping.
* :mod:`.template`: the template mask (Eq. 14), propagation, the bounding-cube projection (5.2.4).
"""

from .autoencoder import FeatureAutoencoder, ct_contrast_mapping
from .coordinates import identity_coordinates, jacobian, sample_at
from .losses import (DeepAtlasSimilarity, SmoothnessLoss, auxiliary_channels, feature_ncc_loss, foreground_mask,
                     smoothness_loss)
from .network import CoordinateNet
from .template import crop, cube_affine, cube_vertices, propagate, template_mask
from .warps import Atlas, explicit_warp, implicit_warp, overlap_mask

__all__ = ["CoordinateNet", "FeatureAutoencoder", "ct_contrast_mapping", "identity_coordinates", "jacobian",
           "sample_at", "Atlas", "explicit_warp", "implicit_warp", "overlap_mask", "smoothness_loss",
           "SmoothnessLoss", "feature_ncc_loss", "auxiliary_channels", "foreground_mask", "DeepAtlasSimilarity",
           "template_mask", "propagate", "cube_affine", "cube_vertices", "crop"]
