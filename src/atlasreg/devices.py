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


def _glibc_malloc_trim():
    """glibc's ``malloc_trim`` through ctypes, or None where the C library is not glibc (macOS, musl,
    Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``; a no-op
    elsewhere). Why: a long batch segmentation frees every case's outputs, but glibc keeps freed
    memory between live blocks (SimpleITK/ITK writers, HDF5 and torch allocate and free MiBs per case
    in varying sizes), so the resident set crept up by about 0.1 MiB a case (docs/results.md,
    "Scale out"). Costs about a millisecond on a heap of a few hundred MiB."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
