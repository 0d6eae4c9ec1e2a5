"""The public Python API (``import atlasreg``): load a trained model, segment images given as files,
SimpleITK images or NumPy arrays, and get labelmaps on each input's own grid with the transforms to
and from atlas space; evaluate a labelmap against a reference.

Example::

    import atlasreg
    model = atlasreg.load_model(checkpoint)   # the final checkpoint of `atlasreg train`; device="auto"
    result = model.segment("B901_img.png")                            # or a SimpleITK image / array
    refine = result.labelmap()                                        # SimpleITK image, input grid
    points_in_atlas = result.to_atlas.points(world_points)            # a Transform (mm)
    print(atlasreg.evaluate(refine, "B901_seg.png", model.labels))    # Dice, HD, HD95, ASD
    result.save("out/B901")                                           # the `atlasreg segment` folder
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .atlas_topology import fitted_atlas
from .config import validate_section
from .contracts import labelmap_extension
from .data.cases import Case, Preprocessing, case_from_image, load_case
from .errors import AtlasregError
from .export import native_outputs, write_outputs
from .models.registry import Method
from .models.registry import load_model as _load_method
from .predict import predict_cases
from .spatial.grid import Grid
from .spatial.transforms import Transform

__all__ = ["Model", "Segmentation", "load_model", "evaluate"]

#: Outputs in order of preference for :meth:`Segmentation.labelmap` with no name.
_FINAL = ("refine", "onepass", "itn")


@dataclass
class Segmentation:
    """One segmented image. labelmaps: output name ('itn', 'itn_lcc', 'onepass', 'refine', 'atlas';
    those the method has) -> SimpleITK labelmap of declared label values on the input's own grid.
    to_atlas / to_subject: the final registration as world transforms (mm; None where the method does
    not register): ``to_atlas`` maps input points to atlas points (resamples the atlas onto the
    input), ``to_subject`` atlas points to input points. deformed_atlas_image: the atlas image on the
    input grid. transform_metrics: inverse consistency and Jacobian statistics per transform."""

    name: str
    labelmaps: dict
    to_atlas: Transform | None = None
    to_subject: Transform | None = None
    deformed_atlas_image: sitk.Image | None = None
    transform_metrics: dict = field(default_factory=dict)
    _outputs: dict = field(default_factory=dict, repr=False)
    _case: Case | None = field(default=None, repr=False)

    def labelmap(self, name: str | None = None) -> sitk.Image:
        """The labelmap `name`, or the final one (refine, else 1-pass, else ITN). KeyError if absent."""
        if name is None:
            name = next(n for n in _FINAL if n in self.labelmaps)
        return self.labelmaps[name]

    def array(self, name: str | None = None) -> np.ndarray:
        """:meth:`labelmap` as a NumPy array in array order ((z,) y, x)."""
        return sitk.GetArrayFromImage(self.labelmap(name))

    def save(self, folder: str | Path) -> Path:
        """Write the outputs as one case folder of ``atlasreg segment`` (atomically); returns it."""
        ext = labelmap_extension(self._case.path if self._case is not None else None)
        return write_outputs(Path(folder), self._case, self._outputs, ext, self.transform_metrics)


class Model:
    """A trained atlasreg model (any registered method) for use from Python.

    Build it with :func:`load_model`. ``labels``: {label value: name}; ``grid``: the model (atlas)
    grid; ``atlas_labelmap`` / ``atlas_image``: the atlas as SimpleITK images on that grid (the saved
    atlas's geometry, so transforms apply to them as they are)."""

    def __init__(self, module: Method):
        self.module = module

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.module.config["data"]["labels"])

    @property
    def grid(self) -> Grid:
        return self.module.net.grid

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def atlas_image(self) -> sitk.Image:
        img = sitk.GetImageFromArray(self.module.atlas_image[0, 0].detach().cpu().numpy())
        self.grid.copy_information_to(img)
        return img

    @property
    def atlas_labelmap(self) -> sitk.Image:
        from .data.preprocessing import indices_to_values

        arg = self.module.atlas_labelmap[0].argmax(0).cpu().numpy()
        img = sitk.GetImageFromArray(indices_to_values(arg, list(self.labels)).astype(np.int32))
        self.grid.copy_information_to(img)
        return img

    def _case(self, image, name: str | None, spacing, origin, direction) -> Case:
        grid = self.grid
        config_spacing = self.module.config["data"].get("spacing")
        prep = Preprocessing.from_config(self.module.config)
        if isinstance(image, (str, Path)):
            return load_case(image, None, prep, name=name)
        if isinstance(image, np.ndarray):
            if image.ndim != grid.ndim:
                raise AtlasregError(f"array of shape {image.shape} is not a {grid.ndim}D image")
            image = sitk.GetImageFromArray(np.asarray(image, dtype=np.float32))
            image.SetSpacing(tuple(float(s) for s in (spacing or config_spacing or [1.0] * grid.ndim)))
            if origin is not None:
                image.SetOrigin(tuple(float(o) for o in origin))
            if direction is not None:
                image.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
        if not isinstance(image, sitk.Image):
            raise AtlasregError(f"cannot segment a {type(image).__name__}; give a file path, a SimpleITK "
                                "image or a NumPy array")
        return case_from_image(sitk.Cast(image, sitk.sitkFloat32), prep, name or "case")

    def segment_many(self, images: Iterable, names: Sequence[str] | None = None, refine: bool = True,
                     **refinement) -> list[Segmentation]:
        """Segment several images at once (refined together, each with its own STN copy; see
        :meth:`segment` for the arguments). Returns one :class:`Segmentation` per image, in order."""
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        cases = [self._case(img, n, None, None, None) for img, n in zip(images, names)]
        return self._run(cases, refine, refinement)

    def segment(self, image, name: str | None = None, spacing: Sequence[float] | None = None,
                origin: Sequence[float] | None = None, direction=None, refine: bool = True,
                **refinement) -> Segmentation:
        """Segment one image and register the atlas to it.

        image: a file path (NIfTI, NRRD, MHA, PNG, ...), a SimpleITK image, or a NumPy array in array
        order ((z,) y, x) with `spacing` (ITK order, mm; default: the model's ``data.spacing``, else
        1), `origin` and `direction`. refine=False skips test-time refinement (1-pass only);
        refinement overrides the model's settings (iterations, lr, beta, gamma, lambda).
        Raises AtlasregError for an unreadable file or an image of the wrong dimension."""
        case = self._case(image, name, spacing, origin, direction)
        return self._run([case], refine, refinement)[0]

    def register(self, image, **kwargs) -> Segmentation:
        """Register the atlas to an image (:meth:`segment`); the result's ``to_atlas`` and
        ``to_subject`` are the transforms, ``deformed_atlas_image`` the atlas on the image's grid."""
        return self.segment(image, **kwargs)

    def _run(self, cases: list[Case], refine: bool, refinement: dict) -> list[Segmentation]:
        module, labels = self.module, list(self.labels)
        results = []
        settings = validate_section("refinement", refinement or {}, module.config["refinement"])
        connected = settings.get("atlas_topology") == "connected"
        for pred in predict_cases(module, cases, refinement, refine):
            out = native_outputs(pred.case, labels, self.grid, pred.itn, pred.transforms,
                                 fitted_atlas(module, settings), module.atlas_image, connected)
            results.append(Segmentation(pred.case.name, out["labelmaps"], out.get("to_atlas"),
                                        out.get("to_subject"), out.get("deformed_atlas_image"),
                                        pred.transform_metrics, out, pred.case))
        return results


def load_model(checkpoint: str | Path, device: str = "auto") -> Model:
    """A trained model from a checkpoint written by ``atlasreg train`` (any method), on `device`
    ('auto': CUDA when available). Needs no config file. Raises AtlasregError naming the file."""
    return Model(_load_method(checkpoint, device))


def evaluate(prediction, reference, labels: dict | Sequence[int] | None = None) -> dict[int, dict[str, float]]:
    """Dice, HD, HD95 and ASD (world units, MONAI) per foreground label of a labelmap against a
    reference, both SimpleITK images or file paths on the same grid. labels: the label values to
    evaluate (a {value: name} dict or a list; default: every non-zero value in either). Returns
    {label value: {'dice', 'hd', 'hd95', 'asd'}}; distances are NaN (with a warning) where a label is
    empty. Raises AtlasregError for unreadable files or different grids."""
    from .data.io import read_any
    from .evaluation.metrics import segmentation_metrics

    pred = read_any(prediction) if isinstance(prediction, (str, Path)) else prediction
    ref = read_any(reference) if isinstance(reference, (str, Path)) else reference
    if pred.GetSize() != ref.GetSize() or not np.allclose(pred.GetSpacing(), ref.GetSpacing()):
        raise AtlasregError("prediction and reference are not on the same grid (size or spacing differ)")
    p, r = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref)
    if labels is None:
        values = [0] + sorted(int(v) for v in (set(np.unique(p)) | set(np.unique(r))) - {0})
    else:
        values = [0] + [int(v) for v in labels if int(v) != 0]
    return segmentation_metrics(p, r, values, ref.GetSpacing())
