"""atlasreg: atlas-based segmentation and registration (Atlas-ISTN, Sinclair et al. 2022).

Public API (imported on first use, so ``import atlasreg`` stays light)::

    model = atlasreg.load_model(checkpoint)     # atlasreg.Model (the checkpoint `atlasreg train` wrote)
    result = model.segment("image.nii.gz")      # atlasreg.Segmentation: labelmaps on the input grid
    atlasreg.evaluate(result.labelmap(), "reference.nii.gz", model.labels)

The spatial core: ``atlasreg.Grid`` and the transforms in :mod:`atlasreg.spatial.transforms`
(``AffineTransform``, ``DisplacementField``, ``StationaryVelocityField``, ``Composite``), read and
written in ITK's formats by ``atlasreg.read_transform`` / ``atlasreg.write_transform``.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": "atlasreg.api", "Model": "atlasreg.api", "Segmentation": "atlasreg.api",
    "evaluate": "atlasreg.api",
    "Grid": "atlasreg.spatial.grid",
    "AffineTransform": "atlasreg.spatial.transforms", "DisplacementField": "atlasreg.spatial.transforms",
    "StationaryVelocityField": "atlasreg.spatial.transforms", "Composite": "atlasreg.spatial.transforms",
    "BSplineTransform": "atlasreg.spatial.transforms",
    "Transform": "atlasreg.spatial.transforms",
    "read_transform": "atlasreg.spatial.itk", "write_transform": "atlasreg.spatial.itk",
    "AtlasregError": "atlasreg.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atlasreg' has no attribute {name!r}")
