"""``python -m hybridgen <command>``: the project's command-line entry points."""

from __future__ import annotations

import argparse
import sys

from . import demo, generate
from .eval import cli as eval_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridgen", description="CPU-GPU hybrid attention")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.build_parser(sub)
    eval_cli.build_parser(sub)
    demo.build_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
