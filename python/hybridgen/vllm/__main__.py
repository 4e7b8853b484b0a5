"""``python -m hybridgen.vllm serve [MODEL] [vLLM serve options]``: see :mod:`hybridgen.vllm.serve`."""

import sys

from .serve import main

sys.exit(main())
