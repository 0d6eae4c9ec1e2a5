"""``python -m atlasreg``: the command line (as ``atlasreg``); also ``torchrun ... -m atlasreg train ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
