"""``python -m hybridgen.flexgen``: see :mod:`hybridgen.flexgen.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
