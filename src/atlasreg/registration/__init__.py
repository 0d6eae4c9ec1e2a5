"""Image registration on atlasreg's spatial core (issue 12): global rigid initialisation
(:mod:`.rigid`), instance optimisation (:mod:`.instance`) and the rigid -> affine -> deformable
pipeline of `atlasreg register` (:mod:`.pipeline`)."""
from .instance import optimise
from .rigid import rigid_search

__all__ = ["optimise", "rigid_search"]
