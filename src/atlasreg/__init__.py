"""atlasreg: atlas-based segmentation and registration (Atlas-ISTN, Sinclair et al. 2022)."""
__version__ = "0.1.0"
