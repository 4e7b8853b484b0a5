"""``python -m hybridgen.eval <lm-eval arguments>``: lm-eval's own command line with the
``hybridgen`` model registered and the packaged tasks (``hybridgen_choice``, ...) on the task path.

lm-eval has no plugin mechanism for either, so this entry point registers the model by importing
:mod:`hybridgen.eval.harness` and then runs lm-eval's CLI (the three steps of
``lm_eval.__main__.cli_evaluate``), adding the packaged task directory to ``--include_path``
(after a directory given on the command line or in a ``--config`` file, which keeps its effect).

Examples::

    python -m hybridgen.eval --model hybridgen --model_args policy=scheduler,gpu_budget=512 \\
        --tasks hybridgen_choice
    python -m hybridgen.eval ls tasks
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

#: The packaged task YAMLs.
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def include_paths(args) -> list[str]:
    """The task directories for lm-eval: the user's (command line, else ``--config`` file) and
    the packaged one."""
    given = getattr(args, "include_path", None)
    if not given and getattr(args, "config", None):
        from lm_eval.config.evaluate_config import EvaluatorConfig

        given = EvaluatorConfig.load_yaml_config(args.config).get("include_path")
    paths = [] if not given else list(given) if isinstance(given, (list, tuple)) else [given]
    return [str(p) for p in paths] + [str(TASKS_DIR)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from . import harness  # noqa: F401  (registers --model hybridgen)

    # lm-eval's parser reads sys.argv itself (it inserts the default "run" subcommand there).
    sys.argv = ["python -m hybridgen.eval", *(sys.argv[1:] if argv is None else argv)]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if hasattr(args, "include_path"):  # the run, ls and validate subcommands
        args.include_path = include_paths(args)
    parser.execute(args)


if __name__ == "__main__":
    main()
