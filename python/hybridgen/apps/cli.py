"""``python -m hybridgen <command>``: the project's command-line entry points."""

from __future__ import annotations

import argparse
import shlex
import sys

from . import bench, demo, generate
from ..eval import cli as eval_cli
from ..guard import HybridPathError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridgen", description="CPU-GPU hybrid attention")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.build_parser(sub)
    eval_cli.build_parser(sub)
    demo.build_parser(sub)
    bench.build_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = "python -m hybridgen " + shlex.join(argv)  # what a record says produced it
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad arguments or data: a message, not a traceback
        parser.exit(2, f"python -m hybridgen {args.command}: error: {e}\n")
    except HybridPathError as e:  # the run did not measure what it would report
        parser.exit(3, f"python -m hybridgen {args.command}: FAILED, hybrid attention did not run: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
