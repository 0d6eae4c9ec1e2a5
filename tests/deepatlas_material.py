"""Shared material of the DeepATLAS tests: tiny configs and image folders without labelmaps."""

from __future__ import annotations

import shutil
from pathlib import Path

from atlasreg.data.letter_b import write_letter_b_dataset

#: Declared labels of Letter-B.
LETTER_B_LABELS = {0: "background", 255: "letter"}


def letter_b_images(folder: Path, n: int, seed: int = 0, start: int = 1, size: int = 32) -> tuple[Path, Path]:
    """`n` Letter-B cases of `size` pixels: (folder of the images alone, B<i>.png; folder of their
    labelmaps, B<i>.png), paired by case name."""
    raw = folder / "raw"
    write_letter_b_dataset(raw, n, seed=seed, start_index=start, size=size)
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        shutil.copyfile(raw / f"B{i}_img.png", images / f"B{i}.png")
        shutil.copyfile(raw / f"B{i}_seg.png", labels / f"B{i}.png")
    shutil.rmtree(raw)
    return images, labels


def tiny_config(train: dict, ndim: int = 2, size=(32, 32), spacing=(1.0, 1.0), labels=None, batch_size: int = 4,
                augmentation: bool = False, **deepatlas) -> dict:
    """A DeepATLAS config small enough for a test: a 3-level network of 4-8 channels, 2 steps of the
    autoencoder, 2 per stage and per head warm-up (12 steps), one thread; `deepatlas` entries replace
    the section's (nested mappings merged one level deep)."""
    section = {"channels": [4, 8, 8], "head_channels": 8, "norm_groups": 4, "autoencoder": {"steps": 2},
               "steps_per_level": 2, "head_warmup_steps": 2, "lr_warmup_steps": 1, "checkpoint_every": 5}
    for key, value in deepatlas.items():
        section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    return {"name": "tiny-deepatlas",
            "data": {"train": train, "labels": labels or LETTER_B_LABELS, "cache": False,
                     "spacing": [1.0] * ndim if ndim == 2 else None},
            "model": {"method": "deepatlas", "ndim": ndim, "size": list(size), "spacing": list(spacing)},
            "training": {"batch_size": batch_size, "threads": 1, "seed": 0,
                         "augmentation": {"enabled": augmentation, "translation_voxels": 2, "rotation_degrees": 10,
                                          "scale": [0.9, 1.1]}},
            "deepatlas": section}
