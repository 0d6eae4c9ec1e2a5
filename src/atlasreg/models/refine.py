"""Test-time refinement of the STN weights (Atlas-ISTN Sec. 2.4, Eqs. 17-21).

Several cases are refined at once, each with its own copy of the trained STN weights: the copies are
stacked along a leading dimension and the STN is evaluated with ``torch.func.vmap`` over
``functional_call``. The loss is the *sum* of the per-case losses, so each case's gradient depends on
its own copy only, and Adam (element-wise) updates every copy exactly as if the case were refined
alone. Every call starts again from the trained weights; the ITN and the network object are untouched.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from ..spatial.transforms import AffineSVFTransform, compose_transform
from .atlas_istn import AtlasISTN, deformation_losses
from .optim import adam


def refine_transforms(net: AtlasISTN, logits: torch.Tensor, atlas_labelmap: torch.Tensor,
                      iterations: int = 50, lr: float = 1e-3, beta: float = 1.0, gamma: float = 0.0,
                      lam: float = 0.126, use_affine: bool = True,
                      mask: torch.Tensor | None = None) -> tuple[AffineSVFTransform, torch.Tensor]:
    """Refine the STN per case so that the deformed atlas labelmap fits the ITN logits (Eq. 19:
    L* = beta L*_a2s + gamma L*_s2a + lambda L_reg), K = `iterations` Adam steps.

    logits: (B, C, *size) ITN output (the target, no gradient); atlas_labelmap: (1, C, *size).
    mask: (B, 1, *size) the scans' field of view on the model grid (padding does not count), or None.
    Returns the refined transforms Phi*, Phi*^-1 (batch B, Eq. 21) and the loss history (K + 1, B)
    (the last row is the loss of the returned transforms). Raises ValueError for negative K.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    logits = logits.detach()
    b = logits.shape[0]
    stn = net.stn
    weights = {k: v.detach().unsqueeze(0).repeat(b, *[1] * v.dim()).requires_grad_(True)
               for k, v in stn.named_parameters()}
    buffers = dict(stn.named_buffers())
    x = AtlasISTN.label_stn_input(logits, atlas_labelmap)

    # The parts this STN variant predicts (vmap returns tensors only): the SVF and/or the affine part.
    parts = (["svf"] if stn.has_svf else []) + (["A", "t"] if stn.has_affine and use_affine else [])

    def one_case(params, x_i):
        out = functional_call(stn, (params, buffers), (x_i.unsqueeze(0),), {"use_affine": use_affine})
        return tuple(out[k][0] for k in parts)

    batched = vmap(one_case)

    def loss_of(params):
        out = dict(zip(parts, batched(params, x)))
        tr = compose_transform(out.get("svf"), out.get("A"), out.get("t"), net.grid, net.steps)
        terms = deformation_losses(tr, logits, atlas_labelmap, reduction="per_case",
                                   with_s2a=gamma != 0.0, mask=mask)
        loss = beta * terms["a2s"] + lam * terms["reg"]
        if gamma != 0.0:
            loss = loss + gamma * terms["s2a"]
        return loss, tr

    opt = adam(weights.values(), lr)
    history = []
    with torch.enable_grad():
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_of(weights)
            loss.sum().backward()
            opt.step()
            history.append(loss.detach())
    with torch.no_grad():
        loss, tr = loss_of(weights)
    history.append(loss)
    return tr, torch.stack(history)
