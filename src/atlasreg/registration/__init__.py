"""Image registration on atlasreg's spatial core (issue 12)."""
from .instance import optimise

__all__ = ["optimise"]
