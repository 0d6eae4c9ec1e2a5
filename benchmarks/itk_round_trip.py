"""ITK round trip of the written transforms (run by hand; prints figures): for the 2D and 3D cases of
tests/test_itk.py (inputs with anisotropic spacing, a flipped axis, an oblique direction and a non-zero
origin), the largest difference inside the field of view between atlasreg's own map / warp of the
atlas and SimpleITK's, for the .h5 composite and the displacement-field NIfTI.

    python benchmarks/itk_round_trip.py

The test asserts bounds (0.01 voxel); this prints the measured values.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_itk import atlas_on, inside_fov, model_transform, native_grid  # noqa: E402

from atlasreg.atlas import save_atlas  # noqa: E402
from atlasreg.segment import world_transforms  # noqa: E402
from atlasreg.spatial.itk import write_transform  # noqa: E402


def main() -> None:
    for ndim in (2, 3):
        tmp = Path(tempfile.mkdtemp())
        phi, model = model_transform(ndim)
        native = native_grid(ndim)
        _, to_atlas = world_transforms(phi, native)
        img, lab = atlas_on(model)
        files = save_atlas(lab, img, [0, 1, 2], model, tmp / "atlas")
        atlas_img = sitk.ReadImage(str(files["atlas_image.nii.gz"]), sitk.sitkFloat64)
        write_transform(to_atlas, tmp / "i.h5")
        write_transform(to_atlas, tmp / "i.nii.gz", grid=native)
        ours_pts = to_atlas.on_grid(native)[0].double().numpy()
        inside = inside_fov(to_atlas, native, model).numpy()
        ours = to_atlas.warp(img, model, native)[0, 0].numpy()
        index = np.stack(np.meshgrid(*[np.arange(n) for n in native.size], indexing="ij"), -1)[..., ::-1]
        world = native.index_to_world(index)
        for name in ("i.h5", "i.nii.gz"):
            tx = (sitk.ReadTransform(str(tmp / name)) if name.endswith(".h5") else
                  sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp / name), sitk.sitkVectorFloat64)))
            theirs_pts = np.array([tx.TransformPoint(tuple(p)) for p in world.reshape(-1, ndim)]).reshape(world.shape)
            err = (np.abs(theirs_pts - ours_pts) / np.asarray(model.spacing))[inside].max()
            theirs = sitk.GetArrayFromImage(sitk.Resample(atlas_img, native.reference_image(), tx, sitk.sitkLinear, 0.0))
            diff = np.abs(theirs - ours)[inside].max() / np.abs(ours).max()
            print(f"{ndim}D {name:8s} max point difference {err:.1e} atlas voxels, max image difference "
                  f"{diff:.1e} of the range, over {inside.mean():.0%} of the input voxels")


if __name__ == "__main__":
    main()
