"""Device selection for training, segmentation and refinement: ``auto`` (CUDA when available, else
the CPU), ``cpu``, ``cuda`` or ``cuda:<i>``."""

from __future__ import annotations

import torch

from .errors import AtlasregError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `spec`. Raises AtlasregError for a malformed name or a CUDA device that
    this machine does not have."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise AtlasregError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AtlasregError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AtlasregError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise AtlasregError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:<index>")
    return device


def lightning_accelerator(device: torch.device) -> tuple[str, list[int] | int]:
    """Lightning's (accelerator, devices) for one torch device."""
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    return "cpu", 1
