"""Test-time refinement of the STN weights (Atlas-ISTN Sec. 2.4, Eqs. 17-21).

Several cases are refined at once, each with its own copy of the trained STN (its own weight tensors,
so its own Adam state). Every iteration computes each case's STN, transform, loss and gradient in a
batch-1 graph of its own, with exactly the operations and tensor shapes of refining the case alone.
A case's refined transform and losses are therefore those of refining it alone, bit for bit,
whatever its batch neighbours, wherever the kernels are deterministic for a given shape and thread
count (CPU; not CUDA, whose grid_sample backward adds with atomics). Tested in 2D and in 3D with
anisotropic voxels (tests/test_refine.py).

Why not one batched computation (``torch.func.vmap`` over stacked copies, as before issue 11): the
batched convolutions become one grouped convolution, whose float32 round-off differs from that of a
batch-1 convolution, and per-case sums and fused Adam's vectorised loop round differently with the
batch too. These differences (1e-7 of a gradient at step 1) are then amplified by the refinement.
Adam's step lr m / (sqrt(v) + eps) answers a gradient change with a gain of lr / (sqrt(v) + eps),
up to lr / eps = 1e5 for weights whose gradient is about 0: in the first step such weights (gradient
1e-9) already differed by 1e-7; through the ReLUs the copies' trajectories then part (the summed
weight difference grew about 1.3x per step). `benchmarks/refine_batch_dependence.py` measured, for a
case alone against the case with neighbours, K = 50: 1.13 voxel (2.25 mm) for corrupt Letter-B
B903 with 15 neighbours (2D, the 300-epoch model), 0.11 voxel (0.29 mm) on an ACDC model (16 x 64 x 64
grid of 2.5 x 2.5 x 8 mm, 4 cases), 0.06 voxel on a synthetic 3D model; 0 with this computation. A
larger Adam eps is no cure: 1e-6 instead of 1e-8 took one synthetic case from 0.06 to 1e-5 voxel but
another from 6e-6 to 0.05 voxel. Bit-exact independence is the only guarantee, because the
refinement amplifies any round-off.

The price is speed when several cases are refined at once: batch-1 convolutions are slower per case
than one batched convolution on CPU (16 Letter-B cases at once, K = 50: about 2.5x the CPU time; a case
alone: 0.5-0.7x, since outside vmap the channels_last layout applies). Every call starts again from
the trained weights; the ITN and the network object are untouched.
"""

from __future__ import annotations

import copy

import torch

from ..config import REFINEMENT_STRUCTURES
from ..errors import AtlasregError
from ..spatial.transforms import AffineSVFTransform, compose_transform, warp
from .atlas_istn import AtlasISTN, deformation_losses
from .optim import adam


def refinement_target(logits: torch.Tensor, target: str = "logits") -> torch.Tensor:
    """What the deformed atlas labelmap is fitted to in L*_a2s (Eq. 17). logits: (B, C, *size) ITN
    output. target 'logits': the logits themselves (the paper); 'labelmap': the one-hot of their
    argmax (B, C, *size), i.e. the ITN's segmentation. Raises ValueError for another target.

    Why 'labelmap' exists: the ITN regresses its logits onto one-hot labels (Eq. 10), and where it is
    unsure it outputs less than 0.5 inside a structure (ACDC, a weak case: 0.39-0.45 on average inside
    its own argmax). An MSE against such a target then costs less for background than for the
    structure ((1 - 0.45)^2 > 0.45^2): the refinement gains by shrinking a structure or, where the
    loss is masked to the scan's field of view, by moving it out of the scan. On that case (ACDC
    patient080_frame02, seed-1 model) the refined RV kept Dice 0.06 with the ITN's own argmax
    (1-pass: 0.69) while its loss halved. Against the one-hot argmax, being right costs 0 and wrong
    costs 1 for either class, so L*_a2s measures the overlap with the ITN's segmentation; a sharpened
    softmax(10 x logits) gave the same Dice on the 8 ACDC validation volumes (docs/results.md)."""
    if target == "logits":
        return logits
    if target == "labelmap":
        return torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    raise ValueError(f"refinement target must be 'logits' or 'labelmap', got {target!r}")


def segmented_structures(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which structures the ITN segmented: (B, C) float, 1 where channel c wins the argmax of `logits`
    (B, C, *size) in at least one voxel (inside `mask` (B, 1, *size), the field of view, when given),
    else 0; the background (channel 0) always 1.

    Why (``refinement.structures: segmented``): the label terms of the refinement (Eqs. 17-18) pull the
    deformed atlas towards the ITN's output in every channel. Where the ITN misses a structure (the
    mouse-brain ITN segments a handful of the 37), that pull squeezes the atlas's structure away,
    undoing what the 1-pass transform got right. Counting only the segmented structures leaves a
    missed one to the deformation of its neighbours and the regulariser."""
    won = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1)
    if mask is not None:
        won = won * (mask > 0)
    present = won.flatten(2).amax(2).to(logits.dtype)
    present[:, 0] = 1
    return present


def refine_transforms(net: AtlasISTN, logits: torch.Tensor, atlas_labelmap: torch.Tensor,
                      iterations: int = 50, lr: float = 1e-3, beta: float = 1.0, gamma: float = 0.0,
                      lam: float = 0.126, use_affine: bool = True,
                      mask: torch.Tensor | None = None, images: torch.Tensor | None = None,
                      atlas_image: torch.Tensor | None = None, image_similarity: str | None = None,
                      image_weight: float = 0.0, target: str = "logits",
                      structures: str = "all", stn_atlas: torch.Tensor | None = None,
                      label_loss: str = "mse") -> tuple[AffineSVFTransform, torch.Tensor]:
    """Refine the STN per case so that the deformed atlas labelmap fits the ITN logits (Eq. 19:
    L* = beta L*_a2s + gamma L*_s2a + lambda L_reg), K = `iterations` Adam steps.

    Image-based refinement (issue 12 item 7; the paper's Sec. 4 found an MSE image term harmful on
    CT): with `image_similarity` ('lncc', 'mind', 'ngf', 'mi' or 'mse', :mod:`atlasreg.losses.similarity`
    on the model grid's spacing) and `image_weight` > 0, L* also holds ``image_weight *
    S(image_i, atlas_image o Phi*^-1)``: the deformed atlas image against the case's normalised image
    (images: (B, 1, *size); atlas_image: (1, 1, *size); the scan's field-of-view mask applies).

    logits: (B, C, *size) ITN output (no gradient); the target is :func:`refinement_target` of it
    (`target` 'logits', the paper's, or 'labelmap'); atlas_labelmap: (1, C, *size).
    structures: 'all' (the paper's) or 'segmented': the label terms count only the structures the ITN
    segmented in the case (:func:`segmented_structures`; the channels of the others are zeroed in both
    the target and the atlas, so the loss keeps its normalisation and lambda its meaning). The STN
    still sees every channel.
    stn_atlas: (1, C, *size) the atlas labelmap the STN sees in its input, when it differs from the one
    fitted (``refinement.atlas_topology: connected`` fits an atlas whose argmax is the repaired labelmap,
    while the STN was trained on the probabilistic atlas, :func:`atlasreg.atlas_topology.fitted_atlas`); None:
    `atlas_labelmap`.
    mask: (B, 1, *size) the scans' field of view on the model grid (padding does not count), or None.
    label_loss: 'mse' (the paper's) or 'dice' (:func:`~atlasreg.models.atlas_istn.deformation_losses`).
    Returns the refined transforms Phi*, Phi*^-1 (batch B, Eq. 21) and the loss history (K + 1, B)
    (the last row is the loss of the returned transforms). Case i's losses and STN outputs are those of
    refining case i alone, bit for bit on CPU (see the module docstring). Raises ValueError for
    negative K, an unknown target, structures or label_loss and for NaN or infinite logits, atlas or mask (NaN reaching grid_sample through the
    STN crashed the process with SIGSEGV, issue 14); AtlasregError when the refinement diverges (a NaN
    or infinite STN output, e.g. with too large a learning rate).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    for name, value in (("logits", logits), ("atlas", atlas_labelmap), ("mask", mask)):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"refine_transforms: the {name} are not finite (NaN or infinite values)")
    if structures not in REFINEMENT_STRUCTURES:
        raise ValueError(f"refinement structures must be one of {REFINEMENT_STRUCTURES}, got {structures!r}")
    keep = segmented_structures(logits.detach(), mask) if structures == "segmented" else None
    logits = refinement_target(logits.detach(), target)
    b = logits.shape[0]
    # What each case's label terms compare, fixed for the K iterations: with 'segmented', the channels of
    # the structures the ITN missed zeroed in both the target and the atlas.
    fitted = [logits[i:i + 1] for i in range(b)]
    atlases = [atlas_labelmap] * b
    if keep is not None:
        shape = (1, -1) + (1,) * (logits.dim() - 2)
        fitted = [f * keep[i].view(shape) for i, f in enumerate(fitted)]
        atlases = [atlas_labelmap * keep[i].view(shape) for i in range(b)]
    similarity = None
    if image_similarity and image_weight > 0:
        if images is None or atlas_image is None:
            raise ValueError("image-based refinement needs the images and the atlas image")
        from ..losses.similarity import build_similarity

        similarity = build_similarity(image_similarity, net.grid.spacing)
        images = images.detach()
    copies = [copy.deepcopy(net.stn) for _ in range(b)]
    weights = [w.requires_grad_(True) for stn in copies for w in stn.parameters()]
    x = AtlasISTN.label_stn_input(logits, atlas_labelmap if stn_atlas is None else stn_atlas)

    def case(i: int) -> tuple[torch.Tensor, dict]:
        """Case i's loss (1,) and STN outputs, computed as if it were refined alone."""
        out = copies[i](x[i:i + 1], use_affine=use_affine)
        if not all(bool(torch.isfinite(v).all()) for v in out.values() if v is not None):
            # NaN or Inf would reach grid_sample (SIGSEGV on CPU, issue 14)
            raise AtlasregError(f"the refinement diverged (NaN or infinite transform after {len(history)} of "
                                f"{iterations} iterations); lower refinement.lr (now {lr:g})")
        tr = compose_transform(out["svf"], out["A"], out["t"], net.grid, net.steps)
        terms = deformation_losses(tr, fitted[i], atlases[i], reduction="per_case", with_s2a=gamma != 0.0,
                                   mask=None if mask is None else mask[i:i + 1], label_loss=label_loss)
        loss = beta * terms["a2s"] + lam * terms["reg"]
        if gamma != 0.0:
            loss = loss + gamma * terms["s2a"]
        if similarity is not None:
            deformed = warp(atlas_image, tr.inverse_points(), net.grid)
            loss = loss + image_weight * similarity(images[i:i + 1], deformed,
                                                    None if mask is None else mask[i:i + 1]).reshape(1)
        return loss, out

    opt = adam(weights, lr)
    history = []
    with torch.enable_grad():
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            losses = []
            for i in range(b):  # one graph at a time: the gradient of the sum, with less memory
                loss = case(i)[0]
                loss.backward()
                losses.append(loss.detach())
            opt.step()
            history.append(torch.cat(losses))
    with torch.no_grad():
        losses, outs = zip(*(case(i) for i in range(b)))
        history.append(torch.cat(losses))
        parts = {k: None if outs[0][k] is None else torch.cat([o[k] for o in outs]) for k in ("svf", "A", "t")}
        tr = compose_transform(parts["svf"], parts["A"], parts["t"], net.grid, net.steps)
    return tr, torch.stack(history)
