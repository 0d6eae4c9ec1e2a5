"""The optimiser of training and refinement: Adam (Kingma 2015), as in Atlas-ISTN (Sec. 3.1).

PyTorch's fused Adam kernel is used where the parameters' device supports it: the same update rule as
the default per-tensor loop, but one kernel for all tensors. On the 2-core CPU, for the 52 weight
tensors (160k weights) of the Letter-B Atlas-ISTN, a step takes 1.3 ms instead of 5.7 ms, about 6% of
a training step (`benchmarks/letter_b_speed.py`).
"""

from __future__ import annotations

from typing import Iterable

import torch


def adam(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam over `params` (floating-point tensors, one device) with learning rate `lr`; the fused
    kernel when the device has one (CPU, CUDA), the default implementation otherwise."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):   # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)
