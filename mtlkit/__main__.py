"""``python -m mtlkit ...`` (and ``torchrun -m mtlkit ...``): the same command line as the ``mtlkit`` script."""

import sys

from mtlkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
