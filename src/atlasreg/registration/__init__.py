"""Image registration on atlasreg's spatial core (issue 12): global rigid initialisation."""
from .rigid import rigid_search

__all__ = ["rigid_search"]
