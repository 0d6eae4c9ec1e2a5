"""Losses: label MSE (Atlas-ISTN Eqs. 10-12) and regularisers (Eq. 13)."""
from .labels import label_mse
from .regularisers import bending_energy, diffusion_regulariser, DiffusionRegulariser
__all__ = ["label_mse", "bending_energy", "diffusion_regulariser", "DiffusionRegulariser"]
