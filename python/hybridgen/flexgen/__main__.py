"""``python -m hybridgen.flexgen``: the command line lives in :mod:`hybridgen.apps.flexgen.cli`."""

import sys

from ..apps.flexgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
