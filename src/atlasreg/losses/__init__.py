"""Losses: label MSE (Atlas-ISTN Eqs. 10-12) and regularisers (Eq. 13)."""
from .labels import label_mse, segmentation_loss, soft_dice_loss
from .regularisers import bending_energy, diffusion_regulariser, DiffusionRegulariser
__all__ = ["label_mse", "segmentation_loss", "soft_dice_loss", "bending_energy", "diffusion_regulariser", "DiffusionRegulariser"]
