"""``python -m ftn``: the same command line as the ``ftn`` script (useful where the package is
used from a source tree on ``PYTHONPATH`` rather than installed)."""

import sys

from .apps.cli import main

sys.exit(main())
