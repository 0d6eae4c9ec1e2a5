"""Losses: label MSE (Atlas-ISTN Eqs. 10-12) and the segmentation loss L_s, regularisers (Eq. 13) and
image similarity losses for registration (MSE, LNCC, MIND-SSC, NGF, mutual information;
:mod:`atlasreg.losses.similarity`)."""
from .labels import cross_entropy_loss, label_dice, label_mse, segmentation_loss, soft_dice_loss
from .regularisers import bending_energy, diffusion_regulariser, DiffusionRegulariser, folding_penalty
from .similarity import (
    LNCC, MINDSSC, MSE, NGF, SIMILARITIES, MutualInformation, build_similarity, lncc, lncc_window, mind_loss,
    mind_ssc, mse, mutual_information, ngf, ngf_field,
)
__all__ = ["cross_entropy_loss", "label_dice", "label_mse", "segmentation_loss", "soft_dice_loss", "bending_energy", "diffusion_regulariser", "folding_penalty",
           "DiffusionRegulariser",
           "mse", "lncc", "lncc_window", "mind_ssc", "mind_loss", "ngf_field", "ngf", "mutual_information",
           "MSE", "LNCC", "MINDSSC", "NGF", "MutualInformation", "SIMILARITIES", "build_similarity"]
